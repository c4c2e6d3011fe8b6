//! Event-loop glue: the net device's subscriber. It watches the two queue kick event fds,
//! an internal wake-up fd and, while the device is active and the guest has receive
//! buffers, the tap fd (level-triggered `EPOLLIN`):
//!
//! * tap readable → [`rx::receive`] (frames into guest buffers);
//! * RX kick → the guest posted buffers: start watching the tap again, receive;
//! * TX kick → [`tx::transmit`] (chains to the tap);
//! * wake-up (activation, reset) → serve both queues, then fix the tap's registration.
//!
//! No busy polling: when the guest has no room the tap is taken off the epoll set (frames
//! wait in the tap's queue) until the next RX kick; when the TX budget runs out the handler
//! kicks itself so other devices on the loop get their turn first. An `EPOLLERR`/`EPOLLHUP`
//! on the tap (its interface was deleted) stops the NIC's receive side for good, with an
//! error in the log, instead of spinning.
//!
//! The subscriber is added to the VMM's event loop once, when the VM is built. Before
//! activation (and after a reset) kicks are drained and ignored and the tap is not watched.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::rx::{self, RxConfig, RxEnd};
use super::tap::Tap;
use super::tx::{self, TxEnd};
use super::{RateLimitedWarn, NUM_QUEUES, RXQ, RX_BUDGET, TXQ, TX_BUDGET};
use crate::virtio::{GuestMem, Interrupt, QueuePosition};

/// What exists only while the device is active.
pub(crate) struct Active {
    pub mem: GuestMem,
    pub interrupt: Arc<Interrupt>,
    /// rx, tx.
    pub queues: Vec<Queue>,
    /// The negotiated features.
    pub acked: u64,
    pub rx: RxConfig,
    /// The guest had no room for the next frame: the tap is not watched until an RX kick.
    pub rx_waiting: bool,
    /// The driver broke a queue: nothing more is done until a reset.
    pub broken: bool,
}

/// Frame counters since the device was created (for tests and logs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
}

/// The net device's event-loop subscriber.
pub struct NetHandler {
    kicks: Vec<EventFd>,
    wake: EventFd,
    tap: Arc<Tap>,
    tap_watched: bool,
    tap_failed: bool,
    active: Option<Active>,
    stats: NetStats,
    warn: RateLimitedWarn,
}

impl NetHandler {
    /// `kicks` are clones of the device's queue event fds (rx, tx).
    pub(crate) fn new(kicks: Vec<EventFd>, wake: EventFd, tap: Arc<Tap>) -> Self {
        debug_assert_eq!(kicks.len(), NUM_QUEUES);
        Self {
            kicks,
            wake,
            tap,
            tap_watched: false,
            tap_failed: false,
            active: None,
            stats: NetStats::default(),
            warn: RateLimitedWarn::new("virtio-net"),
        }
    }

    /// Frame counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether the tap is on the event loop's epoll set (it is not while the guest has no
    /// receive buffers).
    pub fn tap_watched(&self) -> bool {
        self.tap_watched
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Starts serving the queues (from the transport, at DRIVER_OK).
    pub(crate) fn activate(&mut self, active: Active) {
        self.active = Some(active);
        self.wake_up();
    }

    /// Stops touching guest memory (the driver reset the device).
    pub(crate) fn reset(&mut self) {
        self.active = None;
        // The tap leaves the epoll set on the loop thread.
        self.wake_up();
    }

    /// Positions in the queues (rx, tx), while active.
    pub(crate) fn queue_states(&self) -> Option<Vec<QueuePosition>> {
        let a = self.active.as_ref()?;
        Some(a.queues.iter().map(QueuePosition::of).collect())
    }

    fn wake_up(&self) {
        if let Err(e) = self.wake.write(1) {
            warn!("virtio-net: cannot wake the event loop: {e}");
        }
    }

    fn receive(&mut self) {
        let Some(a) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let result = rx::receive(
            &mut a.queues[RXQ],
            &a.mem,
            &self.tap,
            a.rx,
            RX_BUDGET,
            &mut self.warn,
        );
        match result {
            Ok((end, count)) => {
                self.stats.rx_frames += count.frames;
                self.stats.rx_dropped += count.dropped;
                if end == RxEnd::NoBuffers && !a.rx_waiting {
                    debug!("virtio-net: no receive buffers; waiting for the guest");
                }
                a.rx_waiting = end == RxEnd::NoBuffers;
                if count.used > 0 {
                    a.notify(RXQ);
                }
            }
            Err(why) => a.fail(&why),
        }
    }

    fn transmit(&mut self) {
        let Some(a) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let result = tx::transmit(
            &mut a.queues[TXQ],
            &a.mem,
            &self.tap,
            a.acked,
            TX_BUDGET,
            &mut self.warn,
        );
        match result {
            Ok((end, count)) => {
                self.stats.tx_frames += count.sent;
                self.stats.tx_dropped += count.dropped;
                if count.used > 0 {
                    a.notify(TXQ);
                }
                if end == TxEnd::Budget {
                    // Come back after the loop's other subscribers had their turn.
                    if let Err(e) = self.kicks[TXQ].write(1) {
                        warn!("virtio-net: cannot re-arm the tx kick: {e}");
                    }
                }
            }
            Err(why) => a.fail(&why),
        }
    }

    /// Watches the tap exactly while frames can go somewhere.
    fn sync_tap(&mut self, ops: &mut EventOps) {
        let want = !self.tap_failed
            && self
                .active
                .as_ref()
                .is_some_and(|a| !a.broken && !a.rx_waiting);
        let fd = self.tap.as_raw_fd();
        if let Err(e) = crate::set_watched(ops, fd, want, &mut self.tap_watched) {
            error!(
                "virtio-net: cannot {} the tap {} on the event loop: {e:?}",
                if want { "watch" } else { "unwatch" },
                self.tap.name()
            );
        }
    }
}

impl Active {
    /// Raises the used-buffer interrupt if the driver wants one.
    fn notify(&mut self, q: usize) {
        match self.queues[q].needs_notification(&self.mem) {
            Ok(false) => {}
            Ok(true) => self.interrupt.signal_used_queue(),
            Err(e) => {
                warn!("virtio-net: cannot read the driver's notification index: {e}");
                self.interrupt.signal_used_queue();
            }
        }
    }

    fn fail(&mut self, why: &str) {
        error!("virtio-net: {why}; the device needs a reset");
        self.broken = true;
        self.interrupt.set_needs_reset();
    }
}

fn drain(evt: &EventFd, what: &str) {
    if let Err(e) = evt.read() {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            warn!("virtio-net: cannot read the {what} event: {e}");
        }
    }
}

impl MutEventSubscriber for NetHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in self.kicks.iter().chain(std::iter::once(&self.wake)) {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                error!("virtio-net: cannot watch a queue event, the NIC will not work: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.tap.as_raw_fd() {
            if events
                .event_set()
                .intersects(EventSet::ERROR | EventSet::HANG_UP)
            {
                error!(
                    "virtio-net: tap {} failed (its interface was deleted?); the NIC receives nothing more",
                    self.tap.name()
                );
                self.tap_failed = true;
            } else {
                self.receive();
            }
        } else if fd == self.kicks[RXQ].as_raw_fd() {
            drain(&self.kicks[RXQ], "rx queue kick");
            if let Some(a) = self.active.as_mut() {
                a.rx_waiting = false;
            }
            self.receive();
        } else if fd == self.kicks[TXQ].as_raw_fd() {
            drain(&self.kicks[TXQ], "tx queue kick");
            self.transmit();
        } else if fd == self.wake.as_raw_fd() {
            drain(&self.wake, "wake-up");
            self.transmit();
            self.receive();
        }
        self.sync_tap(ops);
    }
}
