//! Event-loop glue: the block device's subscriber. It watches the queue's kick event fd,
//! pops descriptor chains, parses them and hands them to the I/O worker. It never does
//! file I/O itself, so a slow disk never blocks the event loop for other devices.
//!
//! The subscriber is added to the VMM's event loop once, when the VM is built. Until the
//! driver activates the device (and after a reset) kicks are drained and ignored.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::request::{parse, DiskLimits};
use super::worker::{Job, Worker};
use crate::virtio::{lock, GuestMem, Interrupt};

/// What exists only while the device is active.
pub(crate) struct Active {
    pub mem: GuestMem,
    pub queue: Arc<Mutex<Queue>>,
    pub interrupt: Arc<Interrupt>,
    pub limits: DiskLimits,
    pub worker: Worker,
}

/// Shared between the device (which fills and empties it) and the handler.
pub(crate) type ActiveSlot = Arc<Mutex<Option<Active>>>;

/// The block device's event-loop subscriber.
pub struct BlockHandler {
    kick: EventFd,
    active: ActiveSlot,
}

impl BlockHandler {
    pub(crate) fn new(kick: EventFd, active: ActiveSlot) -> Self {
        Self { kick, active }
    }

    /// Serves what the driver made available (what a kick does, minus reading the kick).
    pub fn process_queue(&mut self) {
        let slot = lock(&self.active);
        let more = match slot.as_ref() {
            Some(active) => active.process_queue(),
            None => {
                debug!("virtio-blk: kick while the device is not active; ignored");
                false
            }
        };
        if more {
            // Budget spent: come back after the loop's other subscribers had their turn.
            if let Err(e) = self.kick.write(1) {
                warn!("virtio-blk: cannot re-arm the queue kick event: {e}");
            }
        }
    }
}

/// Chains popped per wake-up before yielding to other devices on the event loop.
const CHAIN_BUDGET: usize = 1024;

impl Active {
    /// Pops, parses and queues available chains; `true` if it stopped on its budget with
    /// work left.
    fn process_queue(&self) -> bool {
        let mem = &self.mem;
        let mut queue = lock(&self.queue);
        let mut popped = 0usize;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                self.broken(&format!("cannot update the used ring flags: {e}"));
                return false;
            }
            let chains = match queue.iter(mem) {
                Ok(chains) => chains,
                Err(e) => {
                    self.broken(&format!("bad available ring: {e}"));
                    return false;
                }
            };
            for chain in chains {
                popped += 1;
                let head = chain.head_index();
                let job = match parse(head, chain, mem, &self.limits) {
                    Ok(req) => Job::Serve(req),
                    Err(failure) => {
                        match failure.status {
                            Some(_) => warn!(
                                "virtio-blk: bad request in chain {head}: {}; completing it with status {}",
                                failure.error,
                                failure.error.status()
                            ),
                            None => warn!(
                                "virtio-blk: bad descriptor chain {head}: {}; returning it unanswered",
                                failure.error
                            ),
                        }
                        Job::Fail {
                            head,
                            status: failure.status.map(|a| (a, failure.error.status())),
                        }
                    }
                };
                if !self.worker.submit(job) {
                    self.broken("the I/O worker has stopped");
                    return false;
                }
            }
            if popped >= CHAIN_BUDGET {
                return true;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => return false,
                Err(e) => {
                    self.broken(&format!("cannot update the used ring flags: {e}"));
                    return false;
                }
            }
        }
    }

    fn broken(&self, why: &str) {
        error!("virtio-blk: {why}; the device needs a reset");
        self.interrupt.set_needs_reset();
    }
}

impl MutEventSubscriber for BlockHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.kick, EventSet::IN)) {
            error!("virtio-blk: cannot watch the queue kick event, the disk will not work: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.kick.as_raw_fd() {
            return;
        }
        // The counter is drained before the queue is read: a kick that races with this
        // pass leaves the fd readable and brings us back.
        if let Err(e) = self.kick.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                warn!("virtio-blk: cannot read the queue kick event: {e}");
            }
        }
        self.process_queue();
    }
}
