//! The VMM's event loop: one thread (`vmm-events`) running an `event-manager` epoll loop for
//! device work that is not on a vCPU thread: console input, the i8042 reset line, and later
//! the virtio queue kicks and backends.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{error, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A subscriber the loop owns.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the event loop: {0}")]
    Create(String),
    #[error("cannot start the event loop thread: {0}")]
    Spawn(std::io::Error),
}

/// Stops the loop when its event fd fires.
struct StopWatcher {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            error!("event loop: cannot watch its stop event: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.evt.as_raw_fd() {
            let _ = self.evt.read();
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// The running event loop.
pub struct EventLoop {
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the loop thread with `subscribers`.
    pub fn start(subscribers: Vec<Subscriber>) -> Result<EventLoop, EventLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| EventLoopError::Create(format!("{e:?}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_evt =
            EventFd::new(EFD_NONBLOCK).map_err(|e| EventLoopError::Create(e.to_string()))?;
        let watcher = StopWatcher {
            evt: stop_evt
                .try_clone()
                .map_err(|e| EventLoopError::Create(e.to_string()))?,
            stop: stop.clone(),
        };
        manager.add_subscriber(Arc::new(Mutex::new(watcher)));
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let thread = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        warn!("event loop: epoll wait failed: {e:?}");
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(EventLoop {
            stop_evt,
            thread: Some(thread),
        })
    }

    /// Stops the loop and joins its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop_evt.write(1) {
                error!("event loop: cannot signal stop: {e}");
                return;
            }
            if thread.join().is_err() {
                error!("event loop thread panicked");
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Echo {
        evt: EventFd,
        seen: mpsc::Sender<u64>,
    }

    impl MutEventSubscriber for Echo {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.seen.send(self.evt.read().unwrap());
        }
    }

    #[test]
    fn dispatches_events_and_stops() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let echo = Echo {
            evt: evt.try_clone().unwrap(),
            seen: tx,
        };
        let lp = EventLoop::start(vec![Arc::new(Mutex::new(echo))]).unwrap();
        evt.write(7).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            7
        );
        lp.stop();
    }
}
