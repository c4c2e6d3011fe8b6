//! Guest RAM: anonymous `MAP_NORESERVE` mappings (vm-memory), registered as KVM memory
//! slots. Pages are only backed when the guest touches them. Guest RAM is `MADV_DONTDUMP`
//! (not in VMM core dumps; `dd` in `/proc/PID/smaps`, which is how `podvisor bench density`
//! tells it from the VMM's own memory).
//!
//! Density knobs (read from the environment, which containerd passes to the shim; set by
//! `podvisor bench density`, see [`DensityKnobs`]): `PODVISOR_NORESERVE=0` maps guest RAM
//! without `MAP_NORESERVE` (default: with), `PODVISOR_KSM=1` marks it `MADV_MERGEABLE` so
//! the host's KSM may merge identical guest pages across VMs.
//!
//! Later (templates), the same layout will be backed by a file mapped private, so that clones
//! share the template's pages copy-on-write.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

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

/// How guest RAM is mapped (density benchmarks switch these; defaults are the product's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DensityKnobs {
    /// `MAP_NORESERVE`: no swap/commit reservation for the whole size (default on).
    pub noreserve: bool,
    /// `madvise(MADV_MERGEABLE)` on guest RAM, for KSM (default off).
    pub ksm: bool,
}

impl Default for DensityKnobs {
    fn default() -> Self {
        Self {
            noreserve: true,
            ksm: false,
        }
    }
}

impl DensityKnobs {
    /// `PODVISOR_NORESERVE=0` and `PODVISOR_KSM=1`; anything else keeps the default.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_string());
        Self {
            noreserve: var("PODVISOR_NORESERVE").as_deref() != Some("0"),
            ksm: var("PODVISOR_KSM").as_deref() == Some("1"),
        }
    }
}

/// Maps `mem_size` bytes of guest RAM laid out around the MMIO gap, with the density knobs
/// of the environment ([`DensityKnobs::from_env`]).
pub fn create(mem_size: u64) -> Result<GuestMem, MemoryError> {
    create_with(mem_size, DensityKnobs::from_env())
}

/// [`create`] with explicit knobs.
pub fn create_with(mem_size: u64, knobs: DensityKnobs) -> Result<GuestMem, MemoryError> {
    let ranges: Vec<_> = ram_regions(mem_size)
        .into_iter()
        .map(|(addr, size)| (addr, size as usize))
        .collect();
    let map_err = |source| MemoryError::Map {
        mib: mem_size >> 20,
        source,
    };
    let mem = if knobs.noreserve {
        GuestMemoryMmap::from_ranges(&ranges).map_err(map_err)?
    } else {
        let mut regions = Vec::new();
        for &(addr, size) in &ranges {
            let mapping = MmapRegionBuilder::new(size)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE)
                .build()
                .map_err(|e| map_err(FromRangesError::MmapRegion(e)))?;
            regions.push(
                GuestRegionMmap::new(mapping, addr)
                    .ok_or(FromRangesError::InvalidGuestRegion)
                    .map_err(map_err)?,
            );
        }
        GuestMemoryMmap::from_regions(regions)
            .map_err(|e| map_err(FromRangesError::Collection(e)))?
    };
    for region in mem.iter() {
        // SAFETY: advice on a mapping this process owns (`mem`); MADV_DONTDUMP only keeps
        // guest RAM out of core dumps of the VMM. It also gives the mapping its own VMA
        // flag (`dd` in smaps), so the kernel never merges it with neighbouring anonymous
        // mappings (malloc arenas) and tools can tell guest RAM from the VMM's memory.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_DONTDUMP,
            )
        };
        if rc != 0 {
            log::warn!(
                "madvise(MADV_DONTDUMP) on guest RAM failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    if knobs.ksm {
        for region in mem.iter() {
            // SAFETY: advice on a mapping this process owns (`mem`); MADV_MERGEABLE never
            // changes its contents, only lets KSM share identical pages copy-on-write.
            let rc = unsafe {
                libc::madvise(
                    region.as_ptr().cast(),
                    region.len() as usize,
                    libc::MADV_MERGEABLE,
                )
            };
            if rc != 0 {
                log::warn!(
                    "madvise(MADV_MERGEABLE) on guest RAM failed: {} (KSM stays off for this VM)",
                    std::io::Error::last_os_error()
                );
            }
        }
        log::info!("guest RAM marked MADV_MERGEABLE (PODVISOR_KSM=1)");
    }
    if !knobs.noreserve {
        log::info!("guest RAM mapped without MAP_NORESERVE (PODVISOR_NORESERVE=0)");
    }
    Ok(mem)
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

    #[test]
    fn guest_ram_is_flagged_dontdump() {
        let mem = create_with(32 << 20, DensityKnobs::default()).unwrap();
        let (start, _) = host_ranges(&mem)[0];
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let header = format!("{start:x}-");
        let entry = smaps.split_once(header.as_str()).expect("mapping listed").1;
        let flags = entry.lines().find(|l| l.starts_with("VmFlags:")).unwrap();
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    #[test]
    fn density_knobs_map_usable_memory() {
        use vm_memory::{Bytes, GuestAddress};
        for knobs in [
            DensityKnobs::default(),
            DensityKnobs {
                noreserve: false,
                ksm: true,
            },
        ] {
            let mem = create_with(64 << 20, knobs).unwrap();
            mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
                .unwrap();
            assert_eq!(
                mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
                0xdead_beef
            );
        }
    }
}
