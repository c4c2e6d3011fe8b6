//! Guest RAM: anonymous `MAP_NORESERVE` mappings (vm-memory), registered as KVM memory
//! slots. Pages are only backed when the guest touches them.
//!
//! Later (templates), the same layout will be backed by a file mapped private, so that clones
//! share the template's pages copy-on-write.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout::ram_regions;

/// Errors of guest memory set-up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: {source}; lower --mem-mib or check the host's memory limits")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM refused guest memory slot {slot}: {source}")]
    RegisterSlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Guest memory type used throughout podvisor.
pub type GuestMem = GuestMemoryMmap<()>;

/// Maps `mem_size` bytes of guest RAM laid out around the MMIO gap.
pub fn create(mem_size: u64) -> Result<GuestMem, MemoryError> {
    let ranges: Vec<_> = ram_regions(mem_size)
        .into_iter()
        .map(|(addr, size)| (addr, size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map {
        mib: mem_size >> 20,
        source,
    })
}

/// Registers every region of `mem` with KVM, one slot per region.
pub fn register(vm: &VmFd, mem: &GuestMem) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region's host mapping lives in `mem`, which the VM keeps alive for as
        // long as the VM fd exists (both are dropped together, the mapping last).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|source| MemoryError::RegisterSlot { slot, source })?;
    }
    Ok(())
}

/// Host virtual address ranges of guest RAM (to tell guest pages from VMM pages in RSS).
pub fn host_ranges(mem: &GuestMem) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.as_ptr() as u64, r.len())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_regions_around_the_gap() {
        let mem = create(128 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(host_ranges(&mem)[0].1, 128 << 20);
    }
}
