//! One process of a container (its init or an exec) and the states it goes through.
//!
//! ```text
//! Created ──start──▶ Running ◀──resume── Paused
//!    │                  │ └────pause────▶ │
//!    │                  └──begin_exit──▶ Exiting ◀── (from Paused too)
//!    └──stop_unstarted──▶ Stopped ◀──exited─┘
//! ```
//! `Exiting` is the short time between the exit becoming known and TaskExit being
//! published: containerd wants the event before Wait returns, so Wait only returns at
//! `Stopped`, and exactly one caller (the exit waiter or the VM-death path) gets to publish.
//! A process can be deleted when `Created` or `Stopped`.

use std::process::Child;
use std::thread::JoinHandle;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::types::task::Status;

use crate::stdio::{StdinState, StdioPaths};

/// How a process ended, as containerd is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    pub status: u32,
    pub at: Timestamp,
}

/// Where a process is in its life.
#[derive(Debug, Clone, PartialEq)]
pub enum ProcState {
    Created,
    Running,
    Paused,
    Exiting,
    Stopped(Exit),
}

/// A transition the current state does not allow; the text completes "process X Y …".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub &'static str);

impl ProcState {
    /// containerd's view (`Exiting` is still running until TaskExit is out).
    pub fn status(&self) -> Status {
        match self {
            Self::Created => Status::CREATED,
            Self::Running | Self::Exiting => Status::RUNNING,
            Self::Paused => Status::PAUSED,
            Self::Stopped(_) => Status::STOPPED,
        }
    }

    /// The process runs or may still run in the guest.
    pub fn is_live(&self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::Exiting)
    }

    pub fn exit(&self) -> Option<&Exit> {
        match self {
            Self::Stopped(e) => Some(e),
            _ => None,
        }
    }

    pub fn start(&mut self) -> Result<(), Refused> {
        match self {
            Self::Created => {
                *self = Self::Running;
                Ok(())
            }
            _ => Err(Refused("is not in the created state")),
        }
    }

    pub fn pause(&mut self) -> Result<(), Refused> {
        match self {
            Self::Running => {
                *self = Self::Paused;
                Ok(())
            }
            _ => Err(Refused("is not running")),
        }
    }

    pub fn resume(&mut self) -> Result<(), Refused> {
        match self {
            Self::Paused => {
                *self = Self::Running;
                Ok(())
            }
            _ => Err(Refused("is not paused")),
        }
    }

    /// A started process ended: the caller publishes TaskExit, then calls [`Self::exited`].
    /// False when the exit is already being (or was) reported.
    pub fn begin_exit(&mut self) -> bool {
        match self {
            Self::Running | Self::Paused => {
                *self = Self::Exiting;
                true
            }
            _ => false,
        }
    }

    /// The end of [`Self::begin_exit`].
    pub fn exited(&mut self, exit: Exit) {
        if matches!(self, Self::Exiting) {
            *self = Self::Stopped(exit);
        }
    }

    /// A process that never started ends (its VM died, or a sandbox container was
    /// killed before Start): no TaskExit, as nothing ran. False if it had started.
    pub fn stop_unstarted(&mut self, exit: Exit) -> bool {
        match self {
            Self::Created => {
                *self = Self::Stopped(exit);
                true
            }
            _ => false,
        }
    }

    pub fn check_deletable(&self) -> Result<(), Refused> {
        match self {
            Self::Created | Self::Stopped(_) => Ok(()),
            _ => Err(Refused("is running: kill it first")),
        }
    }
}

/// What a process holds on the host for its stdio; dropped (and reaped) on Delete.
#[derive(Debug, Default)]
pub struct ProcessIo {
    /// Output copy threads; joined before TaskExit so that no output is lost.
    pub outputs: Vec<JoinHandle<()>>,
    pub stdin: Option<StdinState>,
    /// A `binary://` logger.
    pub logger: Option<Child>,
}

impl ProcessIo {
    /// Releases what the process held: ends the stdin copy (its client may never have
    /// opened the FIFO), closing the FIFO and the stream, and reaps the logger (its pipes
    /// closed with the output threads, so it ends by itself).
    pub fn release(&mut self) {
        if let Some(stdin) = self.stdin.take() {
            stdin.close();
        }
        if let Some(mut logger) = self.logger.take() {
            let _ = logger.wait();
        }
    }

    /// After a failed Create: the logger is stopped rather than waited for.
    pub fn abort(&mut self) {
        if let Some(mut logger) = self.logger.take() {
            let _ = logger.kill();
            let _ = logger.wait();
        }
    }
}

/// One process: a container's init (empty exec id) or an exec'd one.
#[derive(Debug)]
pub struct Process {
    pub state: ProcState,
    /// PID in the guest (the agent's PID namespace); 0 before it runs.
    pub guest_pid: u32,
    pub stdio: StdioPaths,
    pub io: ProcessIo,
    /// An exec process's OCI process JSON, until Start.
    pub spec: Vec<u8>,
}

impl Process {
    pub fn new(stdio: StdioPaths, spec: Vec<u8>) -> Self {
        Self {
            state: ProcState::Created,
            guest_pid: 0,
            stdio,
            io: ProcessIo::default(),
            spec,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(status: u32) -> Exit {
        Exit {
            status,
            at: Timestamp::new(),
        }
    }

    #[test]
    fn a_process_goes_created_running_paused_exiting_stopped() {
        let mut s = ProcState::Created;
        assert_eq!(s.check_deletable(), Ok(()));
        assert_eq!(s.pause(), Err(Refused("is not running")));
        s.start().unwrap();
        assert_eq!(s.start(), Err(Refused("is not in the created state")));
        assert!(s.check_deletable().is_err());
        s.pause().unwrap();
        assert_eq!(s.status(), Status::PAUSED);
        assert_eq!(s.pause(), Err(Refused("is not running")));
        // An exit while paused.
        assert!(s.begin_exit());
        assert!(!s.begin_exit(), "exactly one reporter");
        assert_eq!(s.status(), Status::RUNNING, "running until TaskExit is out");
        assert_eq!(s.resume(), Err(Refused("is not paused")));
        s.exited(exit(3));
        assert_eq!(s.exit().map(|e| e.status), Some(3));
        assert_eq!(s.check_deletable(), Ok(()));
        assert!(!s.begin_exit());
        assert!(!s.stop_unstarted(exit(1)));
    }

    #[test]
    fn an_unstarted_process_stops_without_an_exit_report() {
        let mut s = ProcState::Created;
        assert!(!s.begin_exit());
        assert!(s.stop_unstarted(exit(255)));
        assert_eq!(s.status(), Status::STOPPED);
        assert_eq!(s.start(), Err(Refused("is not in the created state")));
        // `exited` without `begin_exit` changes nothing.
        let mut r = ProcState::Running;
        r.exited(exit(0));
        assert_eq!(r, ProcState::Running);
    }
}
