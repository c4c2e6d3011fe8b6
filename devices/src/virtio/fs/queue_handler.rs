//! Event-loop glue: the virtio-fs device's subscriber. It watches the kick event fds of both
//! queues and wakes the device's worker; it never touches a ring or a file, so a slow share
//! never blocks the event loop for other devices.
//!
//! The subscriber is added to the VMM's event loop once, when the VM is built. Until the
//! driver activates the device (and after a reset) kicks are drained and ignored.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::worker::Worker;
use crate::virtio::{lock, Interrupt};

/// What exists only while the device is active.
pub(crate) struct Active {
    pub queues: Vec<Arc<Mutex<Queue>>>,
    pub interrupt: Arc<Interrupt>,
    pub worker: Worker,
}

/// Shared between the device (which fills and empties it) and the handler.
pub(crate) type ActiveSlot = Arc<Mutex<Option<Active>>>;

/// The virtio-fs device's event-loop subscriber.
pub struct FsHandler {
    tag: String,
    kicks: Vec<EventFd>,
    active: ActiveSlot,
}

impl FsHandler {
    pub(crate) fn new(tag: String, kicks: Vec<EventFd>, active: ActiveSlot) -> Self {
        Self { tag, kicks, active }
    }

    /// Wakes the worker (what a kick does, minus reading the kick fd).
    pub fn process_queues(&mut self) {
        let slot = lock(&self.active);
        match slot.as_ref() {
            Some(active) => {
                if !active.worker.kick() {
                    error!(
                        "virtio-fs {}: the worker has stopped; the device needs a reset",
                        self.tag
                    );
                    active.interrupt.set_needs_reset();
                }
            }
            None => debug!(
                "virtio-fs {}: kick while the device is not active; ignored",
                self.tag
            ),
        }
    }
}

impl MutEventSubscriber for FsHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for (q, kick) in self.kicks.iter().enumerate() {
            if let Err(e) = ops.add(Events::new(kick, EventSet::IN)) {
                error!(
                    "virtio-fs {}: cannot watch the kick event of queue {q}, the share will not work: {e:?}",
                    self.tag
                );
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Some(kick) = self.kicks.iter().find(|k| k.as_raw_fd() == events.fd()) else {
            return;
        };
        // Drained before the worker reads the rings: a kick that races with its pass leaves
        // the fd readable and brings us back.
        if let Err(e) = kick.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                warn!(
                    "virtio-fs {}: cannot read a queue kick event: {e}",
                    self.tag
                );
            }
        }
        self.process_queues();
    }
}
