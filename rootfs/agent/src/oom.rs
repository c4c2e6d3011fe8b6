//! OOM events: one thread watches every container's `memory.events` with inotify (cgroup v2
//! sends a modify event when a counter changes) and queues the container id whenever its
//! `oom_kill` count grows. GetOOMEvent pops the queue, blocking until there is an event.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::cgroup::Cgroup;

/// Errors of OOM watching.
#[derive(Debug, thiserror::Error)]
pub enum OomError {
    #[error("cannot set up inotify for OOM events: {0}")]
    Init(#[source] nix::Error),
    #[error("cannot start the OOM watcher thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("no OOM event within the request's timeout; call GetOOMEvent again")]
    Timeout,
    #[error("the sandbox is being destroyed: no more OOM events")]
    Closed,
}

struct Watch {
    container_id: String,
    cgroup: Cgroup,
    oom_kills: u64,
}

#[derive(Default)]
struct State {
    watches: HashMap<WatchDescriptor, Watch>,
    queue: VecDeque<String>,
    closed: bool,
}

/// The OOM event queue and its inotify watches.
pub struct OomWatcher {
    inotify: Inotify,
    state: Mutex<State>,
    queued: Condvar,
}

impl OomWatcher {
    /// Creates the watcher and starts its thread.
    pub fn start() -> Result<Arc<Self>, OomError> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(OomError::Init)?;
        let watcher = Arc::new(Self {
            inotify,
            state: Mutex::new(State::default()),
            queued: Condvar::new(),
        });
        let thread_watcher = watcher.clone();
        std::thread::Builder::new()
            .name("oom-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || thread_watcher.run())
            .map_err(OomError::Thread)?;
        Ok(watcher)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts watching a container's cgroup. Without the memory controller there is
    /// nothing to watch; that is logged once per container.
    pub fn watch(&self, container_id: &str, cgroup: &Cgroup) {
        let Some(oom_kills) = cgroup.oom_kill_count() else {
            log::info!(
                "container {container_id}: no memory.events (memory controller not enabled): \
                 OOM events unavailable"
            );
            return;
        };
        match self
            .inotify
            .add_watch(&cgroup.memory_events_path(), AddWatchFlags::IN_MODIFY)
        {
            Ok(wd) => {
                self.state().watches.insert(
                    wd,
                    Watch {
                        container_id: container_id.to_string(),
                        cgroup: cgroup.clone(),
                        oom_kills,
                    },
                );
            }
            Err(err) => log::warn!("container {container_id}: cannot watch memory.events: {err}"),
        }
    }

    /// Stops watching a container (removal).
    pub fn unwatch(&self, container_id: &str) {
        let mut state = self.state();
        let wds: Vec<WatchDescriptor> = state
            .watches
            .iter()
            .filter(|(_, w)| w.container_id == container_id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            state.watches.remove(&wd);
            let _ = self.inotify.rm_watch(wd);
        }
    }

    /// Blocks until an OOM event is queued (or `timeout` passes) and returns its container.
    pub fn next(&self, timeout: Option<Duration>) -> Result<String, OomError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.state();
        loop {
            if let Some(id) = state.queue.pop_front() {
                return Ok(id);
            }
            if state.closed {
                return Err(OomError::Closed);
            }
            state = match deadline {
                None => self.queued.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(OomError::Timeout);
                    }
                    self.queued
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Wakes every waiter with [`OomError::Closed`] (sandbox destruction).
    pub fn close(&self) {
        self.state().closed = true;
        self.queued.notify_all();
    }

    fn run(&self) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(nix::Error::EINTR) => continue,
                Err(err) => {
                    log::error!("OOM watcher stopped: reading inotify failed: {err}");
                    return;
                }
            };
            let mut state = self.state();
            let mut fired = Vec::new();
            for event in events {
                let Some(watch) = state.watches.get_mut(&event.wd) else {
                    continue;
                };
                let Some(count) = watch.cgroup.oom_kill_count() else {
                    continue;
                };
                if count > watch.oom_kills {
                    watch.oom_kills = count;
                    fired.push(watch.container_id.clone());
                }
            }
            for id in fired {
                log::warn!("container {id}: OOM kill");
                state.queue.push_back(id);
                self.queued.notify_all();
            }
        }
    }
}
