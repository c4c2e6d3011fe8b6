//! Whether a pod's shim still serves its socket, for `shim delete`.
//!
//! A connect that succeeds is not enough: when a shim is killed, the kernel releases the
//! dying process's files last-opened first, so containerd sees its connection for the
//! pod's first container close (and runs `shim delete`) while the listening socket, opened
//! earlier, is still open for a moment: long enough, after the VM's KVM files in between,
//! for `delete` to connect to it. `delete` then took the pod for alive and left its state
//! and mounts behind. So the listener's process (`SO_PEERCRED`) must also be running: not
//! a zombie and not exiting (`PF_EXITING` in `/proc/<pid>/stat`).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// `PF_EXITING` (include/linux/sched.h): the task is in `do_exit`.
const PF_EXITING: u64 = 0x4;

/// Whether a running process listens on `socket`.
pub fn shim_serving(socket: &Path) -> bool {
    let Ok(stream) = UnixStream::connect(socket) else {
        return false;
    };
    match peer_pid(&stream) {
        Some(pid) => {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            running(&stat)
        }
        // Unknown peer: assume a live shim (deleting a live pod's state is worse).
        None => true,
    }
}

/// The pid of the process that set up the listening end of `stream`.
fn peer_pid(stream: &UnixStream) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
        .expect("a ucred is a few bytes");
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live ucred of that size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

/// Whether `/proc/<pid>/stat` text describes a process that runs: present, not a zombie
/// or dead, not exiting.
fn running(stat: &str) -> bool {
    // After "pid (comm) ": state is the 1st field, flags the 7th.
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return false;
    };
    let fields: Vec<&str> = rest.split(' ').collect();
    let state = fields.first().copied().unwrap_or("X");
    let flags = fields
        .get(6)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    !matches!(state, "Z" | "X" | "x") && flags & PF_EXITING == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_of_a_running_process_serves() {
        let dir = std::env::temp_dir().join(format!("podvisor-liveness-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(shim_serving(&path), "this process listens");
        drop(listener);
        assert!(
            !shim_serving(&path),
            "a closed listener refuses connections"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zombies_and_exiting_processes_do_not_run() {
        let stat = |state: &str, flags: u64| {
            format!("42 (containerd-shim (x)) {state} 1 42 42 0 -1 {flags} 0 0 0 0 5 6")
        };
        assert!(running(&stat("S", 0x40_0100)));
        assert!(running(&stat("R", 0)));
        assert!(!running(&stat("Z", 0x40_0100)));
        assert!(!running(&stat("X", 0)));
        assert!(!running(&stat("D", 0x40_0104)), "PF_EXITING");
        assert!(!running(""), "no such process");
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(running(&own));
    }
}
