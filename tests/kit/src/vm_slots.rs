//! How many guest VMs the guest-tier tests run at once, across every test binary.
//!
//! A guest is CPU-bound while its kernel works (and on a nested PVM host every guest kernel
//! instruction is emulated), so VMs beyond the host's cores do not finish sooner: they
//! stretch every test's timeline instead. On a 2-core PVM host with 8 VMs at once (the
//! pod, guest-death and 5-clone template tests together) one container create took more
//! than the shim's 5-minute agent timeout. Each guest test therefore takes slots for the
//! VMs it runs; the host has as many slots as cores (`PODVISOR_TEST_VM_SLOTS` overrides),
//! and a test that needs more (the template test's clones) runs alone.
//!
//! The slots are host-wide, not per process: `make test` (scripts/run-tests.sh) runs the
//! test binaries side by side so that one binary's single VM does not leave the other cores
//! idle, and the binaries share these slots. A slot is an exclusive `flock` on
//! `$TMPDIR/podvisor-test-vm-slots/slot-N`; a taker holds `gate` while it looks for free
//! slots and takes all it wants or none, then polls again. A test that wants several slots
//! therefore never sits on a free one while it waits (which left a core idle for the whole
//! of a long single-VM test); it runs once enough slots are free at once, at worst after
//! the single-VM tests. The kernel drops the locks of a process that dies, so a crashed
//! test frees its slots.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

/// Slots of one test, given back on drop (closing the files drops their locks).
pub struct VmSlots {
    _held: Vec<File>,
}

/// The number of slots: `PODVISOR_TEST_VM_SLOTS`, else the host's cores.
fn capacity() -> usize {
    std::env::var("PODVISOR_TEST_VM_SLOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn dir() -> PathBuf {
    let dir = std::env::temp_dir().join("podvisor-test-vm-slots");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("vm slots: {}: {e}", dir.display()));
    dir
}

fn open(path: PathBuf) -> File {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("vm slots: {}: {e}", path.display()))
}

/// `flock(LOCK_EX)`, blocking unless `try_only`; whether it was taken.
fn lock(file: &File, try_only: bool) -> bool {
    let op = libc::LOCK_EX | if try_only { libc::LOCK_NB } else { 0 };
    loop {
        // SAFETY: flock on an fd this File owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return true;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if try_only => return false,
            _ => panic!("vm slots: flock: {err}"),
        }
    }
}

/// Waits until `vms` slots are free (all of them if `vms` exceeds the capacity) and takes
/// them.
pub fn take(vms: usize) -> VmSlots {
    let capacity = capacity();
    let want = vms.clamp(1, capacity);
    let dir = dir();
    let gate = open(dir.join("gate"));
    let step = Duration::from_millis(250);
    let mut waited = Duration::ZERO;
    loop {
        lock(&gate, false);
        let mut held = Vec::with_capacity(want);
        for n in 0..capacity {
            if held.len() == want {
                break;
            }
            let slot = open(dir.join(format!("slot-{n}")));
            if lock(&slot, true) {
                held.push(slot);
            }
        }
        let got = held.len() == want;
        // Partial takes go back before the gate opens: all or nothing.
        let taken = if got {
            Some(held)
        } else {
            drop(held);
            None
        };
        // SAFETY: flock on an fd the File owns; no memory is passed.
        unsafe { libc::flock(gate.as_raw_fd(), libc::LOCK_UN) };
        if let Some(held) = taken {
            return VmSlots { _held: held };
        }
        std::thread::sleep(step);
        waited += step;
        if waited.as_millis().is_multiple_of(120_000) {
            eprintln!(
                "vm slots: waiting {} s for {want} of {capacity} slots",
                waited.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_exclusive_across_open_files() {
        // Two opens of one slot file are two lock owners, as in two processes.
        let path = dir().join("slot-selftest");
        let a = open(path.clone());
        let b = open(path);
        assert!(lock(&a, true));
        assert!(!lock(&b, true), "a held slot cannot be taken again");
        drop(a);
        assert!(lock(&b, true), "a dropped slot is free");
    }
}
