//! The boot timer: one MMIO byte the guest writes when its init has started.
//!
//! Like Firecracker's boot timer, a guest write of [`BOOT_TIMER_MAGIC`] (123) at offset 0
//! marks "init started". The first such write is time-stamped; the VMM reports the time
//! from its first `KVM_RUN` to that mark, and may be woken through `notify`.
//! From the guest: `devmem 0xc0000000 8 123` (busybox), or a write through `/dev/mem`.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use log::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The value a guest writes to mark "init started".
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// Size of the boot timer's MMIO window.
pub const BOOT_TIMER_LEN: u64 = 0x1000;

/// The boot timer device.
pub struct BootTimer {
    marked: Arc<OnceLock<Instant>>,
    notify: Option<EventFd>,
}

impl BootTimer {
    /// A boot timer that records the mark into `marked` and, if given, signals `notify`.
    pub fn new(marked: Arc<OnceLock<Instant>>, notify: Option<EventFd>) -> Self {
        Self { marked, notify }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        if self.marked.set(Instant::now()).is_ok() {
            info!("boot timer: guest init started");
            if let Some(evt) = &self.notify {
                if let Err(e) = evt.write(1) {
                    warn!("boot timer: cannot notify the VMM: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn first_magic_write_marks_once() {
        let marked = Arc::new(OnceLock::new());
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = BootTimer::new(marked.clone(), Some(evt.try_clone().unwrap()));
        dev.write(0, &[1]);
        dev.write(4, &[BOOT_TIMER_MAGIC]);
        assert!(marked.get().is_none());
        dev.write(0, &[BOOT_TIMER_MAGIC]);
        let first = *marked.get().unwrap();
        dev.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(*marked.get().unwrap(), first);
        assert_eq!(evt.read().unwrap(), 1, "notified exactly once");
    }
}
