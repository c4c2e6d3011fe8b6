//! What podvisor's tests and benches share, so that each harness exists once.
//!
//! - [`vm_slots`]: host-wide VM slots, so that guest tests side by side never oversubscribe the cores;
//! - [`cni`]: a CNI bridge network for pods;
//! - [`threads`]: the confinement of a VMM process's threads, from `/proc`;
//! - [`containerd`]: a private containerd (or an existing one) driven with `ctr`;
//! - [`host_agent`]: the real guest agent on the host, in namespaces of its own, behind
//!   Unix sockets, with a busybox rootfs and a minimal OCI spec for its containers;
//! - [`image`]: the local busybox OCI image (no registry) that containerd imports;
//! - [`processes`]: shims of a containerd, descendants, signals, thread dumps;
//! - [`wait_for`]: polling a condition with a deadline (no sleeps as synchronization);
//! - [`run_bounded`]: a command that may hang, killed after a deadline with a thread dump.

pub mod cni;
pub mod containerd;
pub mod host_agent;
pub mod image;
pub mod processes;
pub mod threads;
pub mod vm_slots;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Polls `check` every 10 ms until it returns Some; panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` to completion within `timeout` (killed after, with what every process below
/// this one was doing appended to its stderr); returns (status, stdout, stderr).
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let collect = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = collect(child.stdout.take().map(|r| Box::new(r) as _));
    let err = collect(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + timeout;
    let mut timed_out = None;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            timed_out = Some(processes::descendant_threads());
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = err.join().unwrap();
    if let Some(threads) = timed_out {
        stderr += &format!("\n[killed after {timeout:?}; the processes then:]{threads}");
    }
    (status.code(), out.join().unwrap(), stderr)
}
