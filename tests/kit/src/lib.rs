//! What podvisor's tests and benches share, so that each harness exists once.
//!
//! - [`host_agent`]: the real guest agent on the host, in namespaces of its own, behind
//!   Unix sockets, with a busybox rootfs and a minimal OCI spec for its containers;
//! - [`image`]: the local busybox OCI image (no registry) that containerd imports;
//! - [`wait_for`]: polling a condition with a deadline (no sleeps as synchronization).

pub mod host_agent;
pub mod image;

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
