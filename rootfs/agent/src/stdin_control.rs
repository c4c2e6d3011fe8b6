//! The control of a stdin pump (`crate::stream`): CloseStdin's byte count, the stop at
//! process exit, and the wake-up of a pump blocked reading its client connection. The
//! process record (`crate::process`) keeps one; the pump checks it after every read.

use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};

use nix::sys::socket::{shutdown, Shutdown};

#[derive(Default)]
struct StdinState {
    forwarded: u64,
    close_at: Option<u64>,
    stopped: bool,
}

/// Controls a stdin (or pty input) pump: CloseStdin and process exit end it.
pub struct StdinControl {
    /// The client connection, shut down for reading to wake a pump blocked in read.
    conn: OwnedFd,
    state: Mutex<StdinState>,
}

impl StdinControl {
    /// The control of a pump reading the client connection `conn`.
    pub fn new(conn: OwnedFd) -> Self {
        Self {
            conn,
            state: Mutex::new(StdinState::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, StdinState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_pump(&self) {
        // ENOTCONN once the client is gone: nothing to wake then.
        let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(&self.conn), Shutdown::Read);
    }

    /// CloseStdin: end stdin once `bytes` bytes (the client's total) were forwarded.
    pub fn close_after(&self, bytes: u64) {
        let mut state = self.state();
        state.close_at = Some(bytes);
        if state.forwarded >= bytes {
            self.wake_pump();
        }
    }

    /// Stops forwarding now (process exited or is being removed).
    pub fn stop(&self) {
        self.state().stopped = true;
        self.wake_pump();
    }

    /// Accounts `n` forwarded bytes; false when the pump should end.
    pub fn forwarded(&self, n: usize) -> bool {
        let mut state = self.state();
        state.forwarded += n as u64;
        !(state.stopped || state.close_at.is_some_and(|at| state.forwarded >= at))
    }

    /// Whether the pump should end (stopped, or CloseStdin's count reached).
    pub fn should_stop(&self) -> bool {
        let state = self.state();
        state.stopped || state.close_at.is_some_and(|at| state.forwarded >= at)
    }
}
