//! Reaping children without stealing exit statuses.
//!
//! The agent is PID 1 (guest) or a child subreaper (host test), so every orphan in the pod
//! becomes its child, and containers' init and exec processes are reparented to it when
//! libcontainer's intermediate process exits. One thread reaps them all with
//! `waitpid(-1, WNOHANG)` and hands the status to the [`Process`] registered for that pid;
//! unknown pids are orphans and are just collected.
//!
//! libcontainer itself calls `waitpid` on its intermediate process (and hook processes), so
//! a blind `waitpid(-1)` could steal those statuses. Every libcontainer call therefore runs
//! under [`Reaper::lock_spawn`], and the reaper only reaps while holding the same lock:
//! it blocks in `waitid(P_ALL, WEXITED | WNOWAIT)` (which sees a zombie without collecting
//! it), then takes the lock and collects. A process's pid is registered before the lock is
//! released, so no exit can be collected before its owner is known. Signals to processes go
//! through the same lock, so a pid is never signalled after it was reaped (and reused).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};

use crate::process::{exit_status, Process};

/// Errors of the reaper.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("cannot start the reaper thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cannot become a child subreaper: {0}")]
    Subreaper(#[source] nix::Error),
}

/// Collects exited children and routes their exit status.
#[derive(Default)]
pub struct Reaper {
    spawn: Mutex<()>,
    table: Mutex<HashMap<i32, Arc<Process>>>,
    /// Bumped after every spawn, so the reaper waits again when it had no child.
    generation: Mutex<u64>,
    spawned: Condvar,
}

/// Held while creating processes (libcontainer calls) or signalling them.
pub struct SpawnGuard<'a> {
    reaper: &'a Reaper,
    _lock: MutexGuard<'a, ()>,
}

impl SpawnGuard<'_> {
    /// Routes the exit of `pid` to `process`.
    pub fn register(&self, pid: i32, process: &Arc<Process>) {
        process.set_pid(pid);
        self.reaper.table().insert(pid, process.clone());
    }
}

impl Drop for SpawnGuard<'_> {
    fn drop(&mut self) {
        *self
            .reaper
            .generation
            .lock()
            .unwrap_or_else(|e| e.into_inner()) += 1;
        self.reaper.spawned.notify_all();
    }
}

impl Reaper {
    fn table(&self) -> MutexGuard<'_, HashMap<i32, Arc<Process>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the agent the reaper of orphans below it and starts the reaper thread.
    pub fn start(self: &Arc<Self>) -> Result<(), ReaperError> {
        // PID 1 is the reaper anyway; elsewhere this keeps container processes ours.
        nix::sys::prctl::set_child_subreaper(true).map_err(ReaperError::Subreaper)?;
        let reaper = self.clone();
        std::thread::Builder::new()
            .name("child-reaper".into())
            .stack_size(64 * 1024)
            .spawn(move || reaper.run())
            .map(drop)
            .map_err(ReaperError::Thread)
    }

    /// Blocks reaping until the guard is dropped.
    pub fn lock_spawn(&self) -> SpawnGuard<'_> {
        SpawnGuard {
            reaper: self,
            _lock: self.spawn.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    fn run(&self) {
        loop {
            let generation = *self.generation.lock().unwrap_or_else(|e| e.into_inner());
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(_) => {
                    let _guard = self.spawn.lock().unwrap_or_else(|e| e.into_inner());
                    self.reap_all();
                }
                Err(nix::Error::EINTR) => {}
                Err(nix::Error::ECHILD) => self.wait_for_children(generation),
                Err(err) => {
                    log::error!("waitid failed: {err}");
                    self.wait_for_children(generation);
                }
            }
        }
    }

    /// No child at all: sleep until something was spawned (or a second passed, for orphans
    /// that appear without a spawn of ours).
    fn wait_for_children(&self, seen: u64) {
        let generation = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        if *generation == seen {
            let _ = self
                .spawned
                .wait_timeout(generation, Duration::from_secs(1))
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn reap_all(&self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => return,
                Ok(status) => {
                    if let Some((pid, code)) = exit_status(status) {
                        match self.table().remove(&pid) {
                            Some(process) => process.set_exited(code),
                            None => log::debug!("reaped orphan {pid}: {code}"),
                        }
                    }
                }
                Err(nix::Error::EINTR) => {}
                Err(err) => {
                    log::error!("waitpid failed: {err}");
                    return;
                }
            }
        }
    }
}
