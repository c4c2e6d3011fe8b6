//! Event-loop glue: the vsock device's subscriber. It watches the three queue kick event
//! fds, an internal wake-up fd, the connection timer, the VM's listening socket and every
//! host socket of the [`Muxer`], and moves packets between the queues and the muxer:
//!
//! * TX (guest → host): every available chain is parsed with `virtio_vsock`'s
//!   `VsockPacket` and handed to the muxer, then returned to the guest (used length 0). A
//!   chain that does not parse is returned unread with a warning; if its header was readable
//!   the stream it names is reset.
//! * RX (host → guest): while the muxer owes the guest packets and the guest has posted
//!   receive buffers, a buffer is popped and filled. If the muxer had nothing after all the
//!   buffer is put back. Out of buffers, the device re-enables notifications and waits for
//!   the next RX kick.
//! * Event queue: kicks are only drained. The one event the device sends is the transport
//!   reset after a snapshot restore ([`VsockHandler::transport_reset`]), which keeps no
//!   streams: the guest resets its connected sockets and re-reads its CID.
//!
//! Everything runs on the event loop and all sockets are non-blocking; each pass is bounded
//! ([`BUDGET`] chains per queue), after which the handler wakes itself up again so other
//! devices get their turn. Fd registration changes go through `EventOps` at the end of
//! each event ([`Muxer::sync`]).
//!
//! The subscriber is added to the VMM's event loop once, when the VM is built. Before
//! activation (and after a reset) the queues are not touched, but the listening socket is
//! served: host clients can connect early, and their REQUEST reaches the guest once the
//! driver is up. Kick, wake-up and activation handling is the shared skeleton of
//! [`common`](crate::virtio::common).

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use log::{debug, error, warn};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::{FdRegistry, Muxer};
use super::packet::{Header, HEADER_LEN, HEADER_LEN_U32};
use super::{EVQ, MAX_PKT_DATA, RXQ, TXQ};
use crate::virtio::common::{impl_subscriber, ActiveQueues, HandlerCore, QueueHandler};
use crate::virtio::GuestMem;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.2 §5.10.6.4): `struct virtio_vsock_event
/// { le32 id; }`.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Chains handled per queue per wake-up before yielding to the loop's other subscribers.
pub const BUDGET: usize = 256;

/// What exists only while the device is active: memory, interrupt and the queues (rx, tx,
/// event).
pub(crate) type Active = ActiveQueues;

/// The vsock device's event-loop subscriber.
pub struct VsockHandler {
    core: HandlerCore<Active>,
    timer: TimerFd,
    timer_at: Option<Instant>,
    muxer: Muxer,
}

/// `EventOps` as the muxer's [`FdRegistry`].
struct Ops<'a, 'b>(&'a mut EventOps<'b>);

impl FdRegistry for Ops<'_, '_> {
    fn add(&mut self, fd: RawFd, set: EventSet) -> Result<(), String> {
        self.0
            .add(Events::new_raw(fd, set))
            .map_err(|e| format!("{e:?}"))
    }
    fn modify(&mut self, fd: RawFd, set: EventSet) -> Result<(), String> {
        self.0
            .modify(Events::new_raw(fd, set))
            .map_err(|e| format!("{e:?}"))
    }
    fn remove(&mut self, fd: RawFd) -> Result<(), String> {
        self.0
            .remove(Events::empty_raw(fd))
            .map_err(|e| format!("{e:?}"))
    }
}

impl VsockHandler {
    pub(crate) fn new(core: HandlerCore<Active>, timer: TimerFd, muxer: Muxer) -> Self {
        Self {
            core,
            timer,
            timer_at: None,
            muxer,
        }
    }

    /// Live streams.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Host clients that have not sent their `CONNECT` line yet.
    pub fn pending_client_count(&self) -> usize {
        self.muxer.pending_client_count()
    }

    /// Stops touching guest memory and forgets the streams (the driver reset the device).
    pub(crate) fn reset(&mut self) {
        self.core.reset();
        // Closed sockets leave the epoll set on the loop thread (woken by the reset).
        self.muxer.reset();
    }

    /// Tells the guest that every stream is gone (after a snapshot restore): one
    /// transport-reset event on the event queue. Without a posted event buffer the guest
    /// is not told, which is logged.
    pub(crate) fn transport_reset(&mut self) {
        let Some(a) = self.core.active_mut() else {
            return;
        };
        let mem = &a.mem.clone();
        let head = match a.queues[EVQ].pop_descriptor_chain(mem) {
            Some(mut chain) => {
                let head = chain.head_index();
                match chain.find(|d| d.is_write_only() && d.len() >= 4) {
                    Some(d) => match mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr()) {
                        Ok(()) => Some((head, 4)),
                        Err(e) => {
                            warn!("virtio-vsock: cannot write the transport reset event: {e}");
                            Some((head, 0))
                        }
                    },
                    None => {
                        warn!("virtio-vsock: event buffer {head} has no room for an event");
                        Some((head, 0))
                    }
                }
            }
            None => None,
        };
        match head {
            Some((head, len)) => {
                a.add_used(EVQ, head, len);
                a.notify(EVQ);
                debug!("virtio-vsock: transport reset event sent");
            }
            None => warn!(
                "virtio-vsock: no event buffer posted; the guest is not told that its streams are gone"
            ),
        }
    }

    /// Serves the queues (TX only if `tx`); `true` if a budget ran out.
    fn pump(&mut self, tx: bool) -> bool {
        let Self { core, muxer, .. } = self;
        let Some(a) = core.active_mut() else {
            return false;
        };
        let more_tx = tx && !a.broken && process_tx(a, muxer);
        let more_rx = !a.broken && process_rx(a, muxer);
        more_tx || more_rx
    }

    /// Serves the queues (TX only if `tx`: only a kick or a wake-up brings TX work) and the
    /// muxer, then updates fd registrations and the timer.
    fn run(&mut self, ops: &mut EventOps, tx: bool) {
        if self.pump(tx) {
            self.core.wake_up();
        }
        self.muxer.sync(&mut Ops(ops));
        self.arm_timer();
    }

    fn arm_timer(&mut self) {
        let next = self.muxer.next_deadline();
        if next == self.timer_at {
            return;
        }
        let res = match next {
            Some(t) => {
                let wait = t.saturating_duration_since(Instant::now());
                // A zero duration would disarm the timer.
                self.timer.reset(wait.max(Duration::from_millis(1)), None)
            }
            None => self.timer.clear(),
        };
        match res {
            Ok(()) => self.timer_at = next,
            Err(e) => {
                error!("virtio-vsock: cannot arm the connection timer, timeouts will not fire: {e}")
            }
        }
    }
}

/// Moves guest packets from the TX queue to the muxer. `true` if the budget ran out.
fn process_tx(a: &mut Active, muxer: &mut Muxer) -> bool {
    let mem = &a.mem.clone();
    let mut used = false;
    let mut more = false;
    let mut handled = 0usize;
    loop {
        if let Err(e) = a.queues[TXQ].disable_notification(mem) {
            return a.fail(format_args!(
                "tx queue: cannot update the used ring flags: {e}"
            ));
        }
        let chains: Vec<DescriptorChain<&GuestMem>> = match a.queues[TXQ].iter(mem) {
            Ok(it) => it.take(BUDGET - handled).collect(),
            Err(e) => {
                return a.fail(format_args!("tx queue: bad available ring: {e}"));
            }
        };
        let progress = !chains.is_empty();
        for mut chain in chains {
            handled += 1;
            let head = chain.head_index();
            let raw = chain.clone();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let hdr = Header::of(&pkt);
                    muxer.send_pkt(&hdr, pkt.data_slice());
                }
                Err(e) => {
                    let hdr = peek_header(raw);
                    match &hdr {
                        Some(h) => warn!(
                            "virtio-vsock: malformed tx packet in chain {head}: {e}; dropped ({h})"
                        ),
                        None => warn!("virtio-vsock: malformed tx chain {head}: {e}; dropped"),
                    }
                    muxer.bad_packet(hdr.as_ref());
                }
            }
            a.add_used(TXQ, head, 0);
            used = true;
        }
        if handled >= BUDGET {
            more = true;
            break;
        }
        match a.queues[TXQ].enable_notification(mem) {
            // More arrived meanwhile (and the ring is readable: no progress means the
            // ring could not be read, and looping would spin).
            Ok(true) if progress => continue,
            Ok(_) => break,
            Err(e) => {
                return a.fail(format_args!(
                    "tx queue: cannot update the used ring flags: {e}"
                ));
            }
        }
    }
    if used {
        a.notify(TXQ);
    }
    more
}

/// Fills guest receive buffers with what the muxer owes the guest. `true` if the budget ran
/// out.
fn process_rx(a: &mut Active, muxer: &mut Muxer) -> bool {
    let mem = &a.mem.clone();
    let mut used = false;
    let mut handled = 0usize;
    let mut more = false;
    let mut rechecked = false;
    while muxer.has_pending_rx() {
        if handled >= BUDGET {
            more = true;
            break;
        }
        let next = match a.queues[RXQ].iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                return a.fail(format_args!("rx queue: bad available ring: {e}"));
            }
        };
        let Some(mut chain) = next else {
            // Out of buffers: ask for a kick when the guest adds some.
            match a.queues[RXQ].enable_notification(mem) {
                // Buffers arrived meanwhile; once only, in case the ring is unreadable.
                Ok(true) if !rechecked => {
                    rechecked = true;
                    continue;
                }
                Ok(_) => break,
                Err(e) => {
                    return a.fail(format_args!(
                        "rx queue: cannot update the used ring flags: {e}"
                    ));
                }
            }
        };
        handled += 1;
        rechecked = false;
        let head = chain.head_index();
        let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(pkt) => pkt,
            Err(e) => {
                warn!("virtio-vsock: unusable rx buffer in chain {head}: {e}; returned empty");
                a.add_used(RXQ, head, 0);
                used = true;
                continue;
            }
        };
        let data = match pkt.data_slice() {
            Some(d) if !d.is_empty() => *d,
            _ => {
                warn!(
                    "virtio-vsock: rx buffer in chain {head} has no room for data; returned empty"
                );
                a.add_used(RXQ, head, 0);
                used = true;
                continue;
            }
        };
        let Some(hdr) = muxer.fill_rx(&data) else {
            // Nothing after all: the buffer stays the guest's next one.
            a.queues[RXQ].go_to_previous_position();
            break;
        };
        let len = match pkt.set_header_from_raw(&hdr.to_bytes()) {
            Ok(()) => HEADER_LEN_U32 + hdr.len,
            Err(e) => {
                warn!("virtio-vsock: cannot write a packet header into rx chain {head}: {e}");
                0
            }
        };
        debug!("virtio-vsock: to guest: {hdr}");
        a.add_used(RXQ, head, len);
        used = true;
    }
    if used {
        a.notify(RXQ);
    }
    more
}

/// Reads a tx chain's header, if its first descriptor holds one (for logs and to reset the
/// stream of a malformed packet).
fn peek_header(mut chain: DescriptorChain<&GuestMem>) -> Option<Header> {
    let desc = chain.next()?;
    if (desc.len() as usize) < HEADER_LEN || desc.is_write_only() {
        return None;
    }
    let mut b = [0u8; HEADER_LEN];
    chain.memory().read_slice(&mut b, desc.addr()).ok()?;
    Header::from_bytes(&b)
}

impl QueueHandler for VsockHandler {
    /// Only a TX kick brings TX work; an RX kick (new buffers) or an event queue kick is
    /// served by the RX pass every event ends with.
    fn kicked(&mut self, q: usize, ops: &mut EventOps) {
        self.run(ops, q == TXQ);
    }

    fn woken(&mut self, ops: &mut EventOps) {
        self.run(ops, true);
    }

    fn other_event(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.timer.as_raw_fd() {
            // Non-blocking: a timer re-armed since it fired reads EAGAIN, not a hang.
            if let Err(e) = self.timer.wait() {
                if e.errno() != libc::EAGAIN {
                    warn!("virtio-vsock: cannot read the connection timer: {e}");
                }
            }
            self.timer_at = None;
            self.muxer.sweep(Instant::now());
        } else if !self.muxer.handle_event(fd, events.event_set()) {
            debug!("virtio-vsock: event for fd {fd}, which is no longer watched");
        }
        self.run(ops, false);
    }

    fn watch_more(&mut self, ops: &mut EventOps) {
        let fd = self.timer.as_raw_fd();
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            error!(
                "virtio-vsock: cannot watch the connection timer, timeouts will not fire: {e:?}"
            );
        }
        self.muxer.sync(&mut Ops(ops));
    }
}

impl_subscriber!(VsockHandler, Active);
