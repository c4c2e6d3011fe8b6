//! How many guest VMs the tests of one test binary run at once.
//!
//! A guest is CPU-bound while its kernel works (and on a nested PVM host every guest kernel
//! instruction is emulated), so VMs beyond the host's cores do not finish sooner: they
//! stretch every test's timeline instead. On a 2-core PVM host with 8 VMs at once (the
//! pod, guest-death and 5-clone template tests together) one container create took more
//! than the shim's 5-minute agent timeout. Each guest test therefore takes slots for the
//! VMs it runs; the host has as many slots as cores, and a test that needs more (the
//! template test's clones) runs alone.

use std::sync::{Condvar, Mutex};

struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

static SLOTS: Slots = Slots {
    used: Mutex::new(0),
    freed: Condvar::new(),
};

/// Slots of one test, given back on drop.
pub struct VmSlots {
    taken: usize,
}

/// The host's cores: the number of slots.
fn capacity() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Waits until `vms` slots are free (all of them if `vms` exceeds the host's cores) and
/// takes them.
pub fn take(vms: usize) -> VmSlots {
    let want = vms.clamp(1, capacity());
    let mut used = SLOTS.used.lock().unwrap_or_else(|p| p.into_inner());
    while *used + want > capacity() {
        used = SLOTS.freed.wait(used).unwrap_or_else(|p| p.into_inner());
    }
    *used += want;
    VmSlots { taken: want }
}

impl Drop for VmSlots {
    fn drop(&mut self) {
        let mut used = SLOTS.used.lock().unwrap_or_else(|p| p.into_inner());
        *used -= self.taken;
        SLOTS.freed.notify_all();
    }
}
