//! The pod's shared PID namespace (CRI's pod-level PID namespace, Kubernetes'
//! `shareProcessNamespace`): the containers that ask for it see each other's processes.
//!
//! With runc the pause container is that namespace's init. Here the agent makes it on first
//! use: a child cloned into a new PID namespace that does nothing but reap the orphans
//! reparented to it, as pause does. A container's spec names it with the path
//! [`POD_PID_NAMESPACE`]; [`resolve`] replaces that with `/proc/<holder>/ns/pid`, which
//! libcontainer joins. The holder is a fork of the multi-threaded agent, so it only makes
//! raw syscalls (no allocation, no lock); it lives until the VM stops. The agent keeps a
//! pidfd of it, so a holder that died is noticed (and replaced) and never confused with a
//! process that reused its pid.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::launcher::{clone3, CloneArgs};
pub use podvisor_agent_protocol::POD_PID_NAMESPACE;

/// The holder of the pod's PID namespace, once made.
static HOLDER: Mutex<Option<Holder>> = Mutex::new(None);

struct Holder {
    pid: i32,
    pidfd: OwnedFd,
}

/// The holder's whole life: no descriptors, SIGCHLD blocked and waited for, every child
/// reaped. Never returns.
fn holder_main() -> ! {
    // SAFETY: raw syscalls on values of this function only; no allocation, no lock.
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        libc::setsid();
        let name = b"pod-pid-ns\0";
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &chld, std::ptr::null_mut());
        loop {
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) > 0 {}
            // A blocked SIGCHLD stays pending even though its default is to ignore it.
            libc::sigwaitinfo(&chld, std::ptr::null_mut());
        }
    }
}

fn spawn() -> std::io::Result<Holder> {
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: (libc::CLONE_NEWPID | libc::CLONE_PIDFD) as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: the child runs `holder_main`, which only makes raw syscalls and never
    // returns.
    let pid = unsafe { clone3(&args) }?;
    if pid == 0 {
        holder_main();
    }
    // SAFETY: CLONE_PIDFD stored a new descriptor owned by nobody else.
    let pidfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd) };
    let pid = i32::try_from(pid).unwrap_or(i32::MAX);
    log::debug!("the pod's PID namespace is held by pid {pid}");
    Ok(Holder { pid, pidfd })
}

fn alive(holder: &Holder) -> bool {
    let mut pfd = libc::pollfd {
        fd: holder.pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd without waiting.
    (unsafe { libc::poll(&mut pfd, 1, 0) }) == 0
}

/// `/proc/<holder>/ns/pid`, making the holder if there is none (or it died).
fn namespace_path() -> std::io::Result<String> {
    let mut holder = HOLDER.lock().unwrap_or_else(|e| e.into_inner());
    if !holder.as_ref().is_some_and(alive) {
        *holder = Some(spawn()?);
    }
    let pid = holder.as_ref().map_or(0, |h| h.pid);
    Ok(format!("/proc/{pid}/ns/pid"))
}

/// Points a `pid` namespace entry whose path is [`POD_PID_NAMESPACE`] at the pod's PID
/// namespace; true if the spec joins it.
pub fn resolve(spec: &mut Spec) -> std::io::Result<bool> {
    let joins = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|nss| nss.iter().any(joins_pod));
    if !joins {
        return Ok(false);
    }
    let path = namespace_path()?;
    if let Some(nss) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.namespaces_mut().as_mut())
    {
        for ns in nss.iter_mut().filter(|ns| joins_pod(ns)) {
            ns.set_path(Some(path.clone().into()));
        }
    }
    Ok(true)
}

fn joins_pod(ns: &oci_spec::runtime::LinuxNamespace) -> bool {
    ns.typ() == LinuxNamespaceType::Pid
        && ns
            .path()
            .as_ref()
            .is_some_and(|p| p.as_os_str() == POD_PID_NAMESPACE)
}
