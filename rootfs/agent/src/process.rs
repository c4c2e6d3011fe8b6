//! One process the agent started (a container's init or an exec): its pid, its exit status
//! once the reaper collected it, whether its output streams are drained, its stdin control
//! and its pty. `wait` implements WaitProcess's guarantee: it returns only after the exit
//! status is known AND every output stream reached EOF and was written out (bounded by
//! [`DRAIN_TIMEOUT`] after exit, for background children that keep the pipe open).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::stdin_control::StdinControl;

/// How long WaitProcess waits for output to drain after the process exited. Only reached
/// when something outside the process (a daemonized child) still holds its stdout/stderr.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of process operations.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process {0} has no terminal: create it with terminal=true to resize it")]
    NoTerminal(String),
    #[error("resizing the terminal of process {name} failed: {source}")]
    Resize {
        name: String,
        #[source]
        source: nix::Error,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal number.
    pub status: i32,
    /// Unix time of the exit in nanoseconds.
    pub at_ns: i64,
    at: Instant,
}

#[derive(Default)]
struct State {
    exit: Option<Exit>,
    outputs_open: usize,
}

/// A process started by the agent.
pub struct Process {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pid: AtomicI32,
    state: Mutex<State>,
    changed: Condvar,
    stdin: Mutex<Option<Arc<StdinControl>>>,
    pty: Mutex<Option<OwnedFd>>,
    /// Runs once, right after the exit is recorded ([`Process::set_on_exit`]).
    on_exit: Mutex<Option<OnExit>>,
}

/// What to do when a process exits.
pub type OnExit = Box<dyn FnOnce() + Send>;

impl Process {
    pub fn new(container_id: &str, exec_id: &str) -> Arc<Self> {
        Arc::new(Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            pid: AtomicI32::new(0),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stdin: Mutex::new(None),
            pty: Mutex::new(None),
            on_exit: Mutex::new(None),
        })
    }

    /// "container/exec" or "container" for log and error messages.
    pub fn name(&self) -> String {
        if self.exec_id.is_empty() {
            self.container_id.clone()
        } else {
            format!("{}/{}", self.container_id, self.exec_id)
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pid, 0 before the process was created.
    pub fn pid(&self) -> i32 {
        self.pid.load(Ordering::Acquire)
    }

    pub fn set_pid(&self, pid: i32) {
        self.pid.store(pid, Ordering::Release);
    }

    /// Counts one more output stream to drain before WaitProcess may return.
    pub fn add_output(&self) {
        self.state().outputs_open += 1;
    }

    /// An output stream reached EOF and everything was written to the client.
    pub fn output_done(&self) {
        let mut state = self.state();
        state.outputs_open = state.outputs_open.saturating_sub(1);
        self.changed.notify_all();
    }

    pub fn set_stdin(&self, control: Arc<StdinControl>) {
        *self.stdin.lock().unwrap_or_else(|e| e.into_inner()) = Some(control);
    }

    pub fn stdin(&self) -> Option<Arc<StdinControl>> {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_pty(&self, master: OwnedFd) {
        *self.pty.lock().unwrap_or_else(|e| e.into_inner()) = Some(master);
    }

    /// Records the exit (called by the reaper) and stops stdin forwarding: nothing reads it
    /// any more.
    pub fn set_exited(&self, status: i32) {
        let at_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        {
            let mut state = self.state();
            if state.exit.is_some() {
                return;
            }
            state.exit = Some(Exit {
                status,
                at_ns,
                at: Instant::now(),
            });
            self.changed.notify_all();
        }
        log::info!(
            "process {} (pid {}) exited: {status}",
            self.name(),
            self.pid()
        );
        if let Some(stdin) = self.stdin() {
            stdin.stop();
        }
        let on_exit = self
            .on_exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = on_exit {
            f();
        }
    }

    /// Runs `f` once the process has exited (now, if it already has).
    pub fn set_on_exit(&self, f: OnExit) {
        let mut slot = self.on_exit.lock().unwrap_or_else(|e| e.into_inner());
        if self.exit().is_some() {
            drop(slot);
            f();
        } else {
            *slot = Some(f);
        }
    }

    /// The exit, if the process has exited.
    pub fn exit(&self) -> Option<Exit> {
        self.state().exit
    }

    /// Waits up to `timeout` for the exit (not the drain); true if the process exited.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        while state.exit.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Blocks until the process exited and its output was drained (see the module doc).
    pub fn wait(&self) -> Exit {
        let mut state = self.state();
        loop {
            if let Some(exit) = state.exit {
                if state.outputs_open == 0 {
                    return exit;
                }
                let waited = exit.at.elapsed();
                if waited >= DRAIN_TIMEOUT {
                    log::warn!(
                        "process {}: output still open {DRAIN_TIMEOUT:?} after exit \
                         (a background child holds it?); reporting the exit anyway",
                        self.name()
                    );
                    return exit;
                }
                state = self
                    .changed
                    .wait_timeout(state, DRAIN_TIMEOUT - waited)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            } else {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Sets the terminal size of a process created with a pty.
    pub fn resize(&self, rows: u16, columns: u16) -> Result<(), ProcessError> {
        let pty = self.pty.lock().unwrap_or_else(|e| e.into_inner());
        let master = pty
            .as_ref()
            .ok_or_else(|| ProcessError::NoTerminal(self.name()))?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: columns,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid for the call;
        // the fd is an open pty master owned by this process record.
        let ret = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if ret < 0 {
            return Err(ProcessError::Resize {
                name: self.name(),
                source: nix::Error::last(),
            });
        }
        Ok(())
    }

    /// Ends stdin forwarding and forgets the pty (container removal).
    pub fn release_io(&self) {
        if let Some(stdin) = self.stdin() {
            stdin.stop();
        }
        self.pty.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Exit status as containerd reports it: the exit code, or 128 + the signal number.
pub fn exit_status(status: nix::sys::wait::WaitStatus) -> Option<(i32, i32)> {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, signal, _) => Some((pid.as_raw(), 128 + signal as i32)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_returns_after_exit_and_drain() {
        let process = Process::new("c", "");
        process.add_output();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let process = process.clone();
            std::thread::spawn(move || tx.send(process.wait().status).unwrap())
        };
        process.set_exited(3);
        assert!(process.exit().is_some());
        // Still draining: the waiter must not return before output_done.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        process.output_done();
        assert_eq!(rx.recv().unwrap(), 3);
        waiter.join().unwrap();
    }

    #[test]
    fn first_exit_wins() {
        let process = Process::new("c", "e");
        process.set_exited(1);
        process.set_exited(2);
        assert_eq!(process.wait().status, 1);
        assert_eq!(process.name(), "c/e");
    }

    #[test]
    fn resize_without_terminal_fails() {
        let process = Process::new("c", "");
        assert!(matches!(
            process.resize(24, 80),
            Err(ProcessError::NoTerminal(_))
        ));
    }
}
