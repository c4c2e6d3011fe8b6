//! The VMM's event loop: one thread (`vmm-events`) running an `event-manager` epoll loop for
//! device work that is not on a vCPU thread: console input, the i8042 reset line, the virtio
//! queue kicks and back ends.
//!
//! The loop can be paused (for a snapshot: no device handler runs while device state is
//! read): [`EventLoop::pause`] makes the loop thread park inside a dispatch of its own gate
//! event, between two handlers, until [`EventLoop::resume`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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
    #[error(transparent)]
    Confine(#[from] devices::confine::ConfineError),
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

#[derive(Default)]
struct GateState {
    /// The controller wants the loop parked.
    closed: bool,
    /// The loop thread is parked.
    parked: bool,
}

/// Where the loop thread parks while paused.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        crate::lock(&self.state)
    }
}

/// Parks the loop thread when the gate event fires and the gate is closed.
struct GateWatcher {
    evt: EventFd,
    gate: Arc<Gate>,
}

impl MutEventSubscriber for GateWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            error!("event loop: cannot watch its pause event, it cannot pause: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        let mut st = self.gate.lock();
        while st.closed {
            st.parked = true;
            self.gate.changed.notify_all();
            st = self
                .gate
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
        st.parked = false;
        self.gate.changed.notify_all();
    }
}

/// The running event loop.
pub struct EventLoop {
    stop_evt: EventFd,
    gate_evt: EventFd,
    gate: Arc<Gate>,
    /// Gives the subscribers back when it ends: they are dropped on the thread that stops
    /// the loop, not on the confined loop thread (a device's drop may remove its socket
    /// file, which the loop's filter does not allow).
    thread: Option<JoinHandle<EventManager<Subscriber>>>,
}

impl EventLoop {
    /// Starts the loop thread with `subscribers`.
    pub fn start(subscribers: Vec<Subscriber>) -> Result<EventLoop, EventLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| EventLoopError::Create(format!("{e:?}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_evt =
            EventFd::new(EFD_NONBLOCK).map_err(|e| EventLoopError::Create(e.to_string()))?;
        let clone = |evt: &EventFd| {
            evt.try_clone()
                .map_err(|e| EventLoopError::Create(e.to_string()))
        };
        let watcher = StopWatcher {
            evt: clone(&stop_evt)?,
            stop: stop.clone(),
        };
        manager.add_subscriber(Arc::new(Mutex::new(watcher)));
        let gate_evt =
            EventFd::new(EFD_NONBLOCK).map_err(|e| EventLoopError::Create(e.to_string()))?;
        let gate = Arc::new(Gate::default());
        manager.add_subscriber(Arc::new(Mutex::new(GateWatcher {
            evt: clone(&gate_evt)?,
            gate: gate.clone(),
        })));
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let (confined_tx, confined_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                // Before the first event: the handlers parse guest-driven data.
                let confined = devices::confine::confine(devices::confine::Kind::EventLoop);
                let ok = confined.is_ok();
                let _ = confined_tx.send(confined);
                if !ok {
                    return manager;
                }
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        warn!("event loop: epoll wait failed: {e:?}");
                    }
                }
                manager
            })
            .map_err(EventLoopError::Spawn)?;
        match confined_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e.into());
            }
            Err(_) => {
                let _ = thread.join();
                return Err(EventLoopError::Create("the event loop thread died".into()));
            }
        }
        Ok(EventLoop {
            stop_evt,
            gate_evt,
            gate,
            thread: Some(thread),
        })
    }

    /// Parks the loop thread between two handlers; returns once it is parked (`false` if
    /// it did not park within `timeout`, e.g. a handler is stuck).
    pub fn pause(&self, timeout: Duration) -> bool {
        self.gate.lock().closed = true;
        if let Err(e) = self.gate_evt.write(1) {
            error!("event loop: cannot signal pause: {e}");
            return false;
        }
        let st = self.gate.lock();
        let (st, _) = self
            .gate
            .changed
            .wait_timeout_while(st, timeout, |s| !s.parked)
            .unwrap_or_else(|p| p.into_inner());
        st.parked
    }

    /// Lets a paused loop run again.
    pub fn resume(&self) {
        self.gate.lock().closed = false;
        self.gate.changed.notify_all();
    }

    /// Stops the loop and joins its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.resume();
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

    /// A subscriber whose drop removes a file, as the vsock device removes its socket.
    struct RemovesOnDrop {
        evt: EventFd,
        path: std::path::PathBuf,
    }

    impl MutEventSubscriber for RemovesOnDrop {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
    }

    impl Drop for RemovesOnDrop {
        fn drop(&mut self) {
            std::fs::remove_file(&self.path).unwrap();
        }
    }

    #[test]
    fn subscribers_are_dropped_outside_the_confined_loop_thread() {
        // Dropped on the loop thread, the removal would be a forbidden syscall there and
        // end this process with SIGSYS.
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("v.sock");
        std::fs::write(&path, "").unwrap();
        let sub = RemovesOnDrop {
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            path: path.clone(),
        };
        let lp = EventLoop::start(vec![Arc::new(Mutex::new(sub))]).unwrap();
        lp.stop();
        assert!(!path.exists());
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

    #[test]
    fn pauses_between_handlers_and_resumes() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let echo = Echo {
            evt: evt.try_clone().unwrap(),
            seen: tx,
        };
        let lp = EventLoop::start(vec![Arc::new(Mutex::new(echo))]).unwrap();
        assert!(lp.pause(Duration::from_secs(5)));
        evt.write(3).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "a paused loop dispatched"
        );
        lp.resume();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
        // Stopping a paused loop does not hang.
        assert!(lp.pause(Duration::from_secs(5)));
        lp.stop();
    }
}
