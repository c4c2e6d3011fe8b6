//! An address bus: maps guest port-I/O or MMIO ranges to devices.
//!
//! The vCPU threads look up the device for an exit address here and call it with the offset
//! into the device's range. Ranges never overlap; lookups are `O(log n)`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that sits on a [`Bus`].
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of bus set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of zero length, or one that wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}: it must be non-empty and not wrap")]
    InvalidRange { base: u64, len: u64 },
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}: pick a free range")]
    Overlap { base: u64, len: u64, other: u64 },
}

/// A shared handle to a device on the bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Address → device map for one address space (port I/O or MMIO).
#[derive(Clone, Default)]
pub struct Bus {
    // Keyed by base address.
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // The closest device at or below the new range's last byte is the only one that can
        // overlap it (ranges on the bus do not overlap each other).
        if let Some((&other, entry)) = self.devices.range(..end).next_back() {
            if other + entry.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device whose range holds `addr`, with the offset of `addr` inside that range.
    pub fn resolve(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((&entry.device, offset))
    }

    /// Dispatches a guest read. Returns `false` if no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write. Returns `false` if no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device whose handler panicked on one
/// vCPU must not take every other vCPU down with it.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Scratch {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Scratch::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fa, &mut buf));
        assert_eq!(buf, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(a.lock().unwrap().last_write, Some((7, vec![9])));
        assert!(!bus.read(0x400, &mut buf));
        assert!(!bus.write(0x3f7, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Scratch::default())) as SharedDevice;
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x10f, 1),
            Err(BusError::Overlap { other: 0x100, .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0xf0, 0x11),
            Err(BusError::Overlap { other: 0x100, .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0x50, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(dev(), 0x110, 0x10).unwrap();
        bus.insert(dev(), 0xf0, 0x10).unwrap();
    }
}
