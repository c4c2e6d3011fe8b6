//! Signals to a container's init that is still starting up.
//!
//! The init of a PID namespace gets only the signals it has a handler for: the kernel drops
//! any other (but SIGKILL and SIGSTOP), even when it comes from the parent namespace. So a
//! signal that reaches a freshly started init before its program installed its handler is
//! lost, and CRI's StopContainer, which sends SIGTERM as soon as StartContainer answered,
//! then waits out its whole grace period. With runc the window is the microseconds between
//! `execve` and the program's first lines; in a VM whose guest kernel is slow (every page
//! fault of the dynamic loader is guest-kernel work) it can be a second.
//!
//! Rule: a signal other than SIGKILL/SIGSTOP to a container's init that is the init of its
//! own PID namespace, neither catches nor ignores that signal yet, and was started less than
//! [`HOLD_WINDOW`] ago, is held: a thread delivers it as soon as the init catches it, or at
//! the end of the window (when the kernel drops it, as it would have at once). Any other
//! signal is sent at once. The held signal goes through a pidfd, so it can never reach
//! another process that reused the pid.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// How long after StartContainer a signal to an init without a handler is held.
pub const HOLD_WINDOW: Duration = Duration::from_secs(10);
/// How often a held signal's target is checked (each check reads /proc/PID/status).
const POLL: Duration = Duration::from_millis(50);

/// What /proc/PID/status says about a process and one signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalView {
    /// The process is PID 1 of its own PID namespace (`NSpid` ends in 1 at depth > 1).
    pub namespace_init: bool,
    /// It catches or ignores the signal (`SigCgt` or `SigIgn` has its bit).
    pub handled: bool,
}

/// Reads `NSpid`, `SigCgt` and `SigIgn` of a `/proc/PID/status` text for `signal`.
pub fn parse_status(status: &str, signal: i32) -> Option<SignalView> {
    let bit = 1u64.checked_shl(u32::try_from(signal - 1).ok()?)?;
    let mut nspid = None;
    let mut handled = None::<bool>;
    let mut fields = 0;
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "NSpid" => {
                let ids: Vec<&str> = value.split_whitespace().collect();
                nspid = Some(ids.len() > 1 && ids.last() == Some(&"1"));
                fields += 1;
            }
            "SigCgt" | "SigIgn" => {
                let mask = u64::from_str_radix(value, 16).ok()?;
                handled = Some(handled.unwrap_or(false) || mask & bit != 0);
                fields += 1;
            }
            _ => {}
        }
        if fields == 3 {
            break;
        }
    }
    Some(SignalView {
        namespace_init: nspid?,
        handled: handled?,
    })
}

/// Whether an init started at `started` is still in its hold window.
pub fn young(started: Instant) -> bool {
    started.elapsed() < HOLD_WINDOW
}

/// Whether `signal` to a young container init whose status is `view` must be held: the
/// kernel would drop it now.
pub fn must_hold(signal: Signal, view: Option<SignalView>) -> bool {
    let dropped_by_kernel = view.is_some_and(|v| v.namespace_init && !v.handled);
    dropped_by_kernel && !matches!(signal, Signal::SIGKILL | Signal::SIGSTOP)
}

/// The status view of `pid` for `signal`, if the process can be read.
pub fn view(pid: i32, signal: Signal) -> Option<SignalView> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status(&status, signal as i32)
}

/// A pidfd for `pid` (call while the pid cannot have been reaped: under the reaper's lock,
/// with the process not yet exited).
pub fn pidfd(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: a descriptor just returned by pidfd_open, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind `pidfd` has exited (its pidfd polls readable).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd without waiting.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready != 0
}

fn send(pidfd: &OwnedFd, signal: Signal) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as i32,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Holds `signal` for the init behind `pidfd` (process `pid`, started at `started`) in a
/// thread until the init catches it or the window ends, then sends it.
pub fn hold(
    name: String,
    pid: i32,
    pidfd: OwnedFd,
    signal: Signal,
    started: Instant,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("held-signal".into())
        .spawn(move || {
            let deadline = started + HOLD_WINDOW;
            loop {
                if exited(&pidfd) {
                    return;
                }
                // Read, then check it still runs: a status read before the exit was its.
                let caught = view(pid, signal).is_some_and(|v| v.handled);
                if exited(&pidfd) {
                    return;
                }
                if caught || Instant::now() >= deadline {
                    if let Err(e) = send(&pidfd, signal) {
                        log::warn!("held {signal} for {name}: {e}");
                    }
                    log::debug!(
                        "held {signal} for {name} sent {} ms after its start ({})",
                        started.elapsed().as_millis(),
                        if caught {
                            "it catches it now"
                        } else {
                            "window over"
                        }
                    );
                    return;
                }
                std::thread::sleep(POLL);
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INIT_DEFAULT: &str = "Name:\ttop\nNSpid:\t57\t1\nSigBlk:\t0000000000000000\n\
        SigIgn:\t0000000000000000\nSigCgt:\t0000000000000000\n";
    const INIT_CATCHES_TERM: &str = "NSpid:\t57\t1\nSigIgn:\t0000000000000000\n\
        SigCgt:\t0000000000004000\n";
    const NOT_INIT: &str = "NSpid:\t58\t2\nSigIgn:\t0000000000000000\nSigCgt:\t0\n";
    const SAME_NAMESPACE: &str = "NSpid:\t58\nSigIgn:\t0\nSigCgt:\t0\n";

    #[test]
    fn status_views() {
        let term = Signal::SIGTERM as i32;
        assert_eq!(
            parse_status(INIT_DEFAULT, term),
            Some(SignalView {
                namespace_init: true,
                handled: false
            })
        );
        assert!(parse_status(INIT_CATCHES_TERM, term).unwrap().handled);
        // SigCgt 0x4000 is bit 14: SIGTERM (15), not SIGINT (2).
        assert!(
            !parse_status(INIT_CATCHES_TERM, Signal::SIGINT as i32)
                .unwrap()
                .handled
        );
        assert!(!parse_status(NOT_INIT, term).unwrap().namespace_init);
        assert!(!parse_status(SAME_NAMESPACE, term).unwrap().namespace_init);
        assert_eq!(parse_status("Name:\tx\n", term), None);
        assert_eq!(parse_status(INIT_DEFAULT, 0), None);
        assert_eq!(parse_status(INIT_DEFAULT, 65), None);
    }

    #[test]
    fn only_young_namespace_inits_without_a_handler_wait() {
        let bare = parse_status(INIT_DEFAULT, 15);
        let catches = parse_status(INIT_CATCHES_TERM, 15);
        assert!(must_hold(Signal::SIGTERM, bare));
        assert!(!must_hold(Signal::SIGKILL, bare));
        assert!(!must_hold(Signal::SIGTERM, catches));
        assert!(!must_hold(Signal::SIGTERM, parse_status(NOT_INIT, 15)));
        assert!(!must_hold(Signal::SIGTERM, None));
        assert!(young(Instant::now()));
        if let Some(old) = Instant::now().checked_sub(HOLD_WINDOW + Duration::from_secs(1)) {
            assert!(!young(old));
        }
    }
}
