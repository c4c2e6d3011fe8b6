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
//! Kick, wake-up and activation handling is the shared skeleton of
//! [`common`](crate::virtio::common).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use log::{debug, error};

use super::rx::{self, RxConfig, RxEnd};
use super::tap::Tap;
use super::tx::{self, TxEnd};
use super::{RateLimitedWarn, RXQ, RX_BUDGET, TXQ, TX_BUDGET};
use crate::virtio::common::{
    impl_subscriber, ActiveQueues, ActiveState, HandlerCore, QueueHandler,
};
use crate::virtio::QueuePosition;

/// What exists only while the device is active.
pub(crate) struct Active {
    /// Memory, interrupt and the queues (rx, tx).
    pub io: ActiveQueues,
    /// The negotiated features.
    pub acked: u64,
    pub rx: RxConfig,
    /// The guest had no room for the next frame: the tap is not watched until an RX kick.
    pub rx_waiting: bool,
}

impl ActiveState for Active {
    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.io.queue_positions()
    }
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
    core: HandlerCore<Active>,
    tap: Arc<Tap>,
    tap_watched: bool,
    tap_failed: bool,
    stats: NetStats,
    warn: RateLimitedWarn,
}

impl NetHandler {
    pub(crate) fn new(core: HandlerCore<Active>, tap: Arc<Tap>) -> Self {
        Self {
            core,
            tap,
            tap_watched: false,
            tap_failed: false,
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

    fn receive(&mut self) {
        let Some(a) = self.core.active_mut().filter(|a| !a.io.broken) else {
            return;
        };
        let result = rx::receive(
            &mut a.io.queues[RXQ],
            &a.io.mem,
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
                    a.io.notify(RXQ);
                }
            }
            Err(why) => {
                a.io.fail(why);
            }
        }
    }

    fn transmit(&mut self) {
        let Some(a) = self.core.active_mut().filter(|a| !a.io.broken) else {
            return;
        };
        let result = tx::transmit(
            &mut a.io.queues[TXQ],
            &a.io.mem,
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
                    a.io.notify(TXQ);
                }
                if end == TxEnd::Budget {
                    self.core.rekick(TXQ);
                }
            }
            Err(why) => {
                a.io.fail(why);
            }
        }
    }

    /// Watches the tap exactly while frames can go somewhere.
    fn sync_tap(&mut self, ops: &mut EventOps) {
        let want = !self.tap_failed
            && self
                .core
                .active()
                .is_some_and(|a| !a.io.broken && !a.rx_waiting);
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

impl QueueHandler for NetHandler {
    fn kicked(&mut self, q: usize, _ops: &mut EventOps) {
        if q == RXQ {
            // The guest posted buffers: watch the tap again.
            if let Some(a) = self.core.active_mut() {
                a.rx_waiting = false;
            }
            self.receive();
        } else if q == TXQ {
            self.transmit();
        }
    }

    /// Activation or reset: serve both queues; `after_event` fixes the tap's registration.
    fn woken(&mut self, _ops: &mut EventOps) {
        self.transmit();
        self.receive();
    }

    fn other_event(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.tap.as_raw_fd() {
            return;
        }
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
    }

    fn after_event(&mut self, ops: &mut EventOps) {
        self.sync_tap(ops);
    }
}

impl_subscriber!(NetHandler, Active);
