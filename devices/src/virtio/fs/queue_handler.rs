//! Event-loop glue: the virtio-fs device's subscriber. It watches the kick event fds of both
//! queues and wakes the device's worker; it never touches a ring or a file, so a slow share
//! never blocks the event loop for other devices.
//!
//! The subscriber is added to the VMM's event loop once, when the VM is built. Until the
//! driver activates the device (and after a reset) kicks are drained and ignored. Kick,
//! wake-up and activation handling is the shared skeleton of [`common`](crate::virtio::common).

use std::sync::{Arc, Mutex};

use event_manager::EventOps;
use log::{debug, error};
use virtio_queue::Queue;

use super::worker::Worker;
use crate::virtio::common::{impl_subscriber, ActiveState, HandlerCore, QueueHandler};
use crate::virtio::{lock, Interrupt, QueuePosition};

/// What exists only while the device is active.
pub(crate) struct Active {
    pub queues: Vec<Arc<Mutex<Queue>>>,
    pub interrupt: Arc<Interrupt>,
    pub worker: Worker,
}

impl ActiveState for Active {
    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.queues
            .iter()
            .map(|q| QueuePosition::of(&lock(q)))
            .collect()
    }
}

/// The virtio-fs device's event-loop subscriber.
pub struct FsHandler {
    core: HandlerCore<Active>,
}

impl FsHandler {
    pub(crate) fn new(core: HandlerCore<Active>) -> Self {
        Self { core }
    }

    /// Wakes the worker (what a kick does, minus reading the kick fd).
    pub fn process_queues(&mut self) {
        match self.core.active() {
            Some(active) => {
                if !active.worker.kick() {
                    error!(
                        "{}: the worker has stopped; the device needs a reset",
                        self.core.name()
                    );
                    active.interrupt.set_needs_reset();
                }
            }
            None => debug!(
                "{}: kick while the device is not active; ignored",
                self.core.name()
            ),
        }
    }
}

impl QueueHandler for FsHandler {
    fn kicked(&mut self, _q: usize, _ops: &mut EventOps) {
        self.process_queues();
    }
}

impl_subscriber!(FsHandler, Active);
