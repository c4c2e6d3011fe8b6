//! Event-loop glue: the block device's subscriber. It watches the queue's kick event fd,
//! pops descriptor chains, parses them and hands them to the I/O worker. It never does
//! file I/O itself, so a slow disk never blocks the event loop for other devices.
//!
//! The subscriber is added to the VMM's event loop once, when the VM is built. Until the
//! driver activates the device (and after a reset) kicks are drained and ignored. Kick,
//! wake-up and activation handling is the shared skeleton of [`common`](crate::virtio::common).

use std::sync::{Arc, Mutex};

use event_manager::EventOps;
use log::{debug, error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::request::{parse, DiskLimits};
use super::worker::{Job, Worker};
use crate::virtio::common::{impl_subscriber, ActiveState, HandlerCore, QueueHandler};
use crate::virtio::{lock, GuestMem, Interrupt, QueuePosition};

/// What exists only while the device is active.
pub(crate) struct Active {
    pub mem: GuestMem,
    pub queue: Arc<Mutex<Queue>>,
    pub interrupt: Arc<Interrupt>,
    pub limits: DiskLimits,
    pub worker: Worker,
}

impl ActiveState for Active {
    fn queue_positions(&self) -> Vec<QueuePosition> {
        vec![QueuePosition::of(&lock(&self.queue))]
    }
}

/// The block device's event-loop subscriber.
pub struct BlockHandler {
    core: HandlerCore<Active>,
}

impl BlockHandler {
    pub(crate) fn new(core: HandlerCore<Active>) -> Self {
        Self { core }
    }

    /// Serves what the driver made available (what a kick does, minus reading the kick).
    pub fn process_queue(&mut self) {
        let more = match self.core.active() {
            Some(active) => active.process_queue(),
            None => {
                debug!("virtio-blk: kick while the device is not active; ignored");
                false
            }
        };
        if more {
            self.core.rekick(0);
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

impl QueueHandler for BlockHandler {
    fn kicked(&mut self, _q: usize, _ops: &mut EventOps) {
        self.process_queue();
    }
}

impl_subscriber!(BlockHandler, Active);
