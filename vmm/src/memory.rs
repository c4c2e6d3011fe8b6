//! Guest RAM: anonymous `MAP_NORESERVE` mappings (vm-memory), registered as KVM memory
//! slots. Pages are only backed when the guest touches them. Guest RAM is `MADV_DONTDUMP`
//! (not in VMM core dumps; `dd` in `/proc/PID/smaps`, which is how `podvisor bench density`
//! tells it from the VMM's own memory).
//!
//! Mapping knobs ([`MemoryKnobs`], part of the host settings; the shim and the CLI take them
//! from `PODVISOR_NORESERVE` and `PODVISOR_KSM`, which `podvisor bench density` sets): guest
//! RAM without `MAP_NORESERVE` (default: with), and `MADV_MERGEABLE` so the host's KSM may
//! merge identical guest pages across VMs (default: off).
//!
//! Snapshots: [`save`] writes guest RAM to a sparse file (regions one after the other, pages
//! of zeros left as holes); [`map_snapshot`] maps such a file `MAP_PRIVATE`, so a restored
//! VM reads the snapshot's pages from the page cache (shared by every VM restored from the
//! same file) and gets a private copy of a page only when it writes to it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::layout::ram_regions;

/// Errors of guest memory set-up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: {source}; lower --mem-mib or check the host's memory limits")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("{mib} MiB of guest memory do not fit this host's address space")]
    AddressSpace { mib: u64 },
    #[error("KVM refused guest memory slot {slot}: {source}")]
    RegisterSlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot write the memory snapshot {path}: {source}")]
    SaveFile {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("cannot read guest memory at {addr:#x} for the snapshot: {reason}")]
    SaveRead { addr: u64, reason: String },
    #[error("cannot map the memory snapshot {path}: {reason}")]
    MapFile {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// Where each RAM region is in a memory snapshot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// What [`save`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFile {
    pub regions: Vec<RegionLayout>,
    /// The file's length (the sum of the region sizes).
    pub size: u64,
    /// Pages with data (the rest are holes).
    pub data_pages: u64,
    /// CRC-32 (IEEE) of the whole file content, holes read as zeros.
    pub crc32: u32,
}

/// Page size of the sparse file's holes.
const PAGE: usize = 4096;
/// Guest memory is copied out in chunks of this size.
const CHUNK: usize = 1 << 20;

/// Guest memory type used throughout podvisor.
pub type GuestMem = GuestMemoryMmap<()>;

/// How guest RAM is mapped (density benchmarks switch these; defaults are the product's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryKnobs {
    /// `MAP_NORESERVE`: no swap/commit reservation for the whole size (default on).
    pub noreserve: bool,
    /// `madvise(MADV_MERGEABLE)` on guest RAM, for KSM (default off).
    pub ksm: bool,
}

impl Default for MemoryKnobs {
    fn default() -> Self {
        Self {
            noreserve: true,
            ksm: false,
        }
    }
}

/// Maps `mem_size` bytes of guest RAM laid out around the MMIO gap, as `knobs` say.
pub fn create(mem_size: u64, knobs: MemoryKnobs) -> Result<GuestMem, MemoryError> {
    let ranges = ram_regions(mem_size)
        .into_iter()
        .map(|(addr, size)| Some((addr, usize::try_from(size).ok()?)))
        .collect::<Option<Vec<_>>>()
        .ok_or(MemoryError::AddressSpace {
            mib: mem_size >> 20,
        })?;
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
    mark_guest_ram(&mem);
    if knobs.ksm {
        mark_mergeable(&mem);
    }
    if !knobs.noreserve {
        log::info!("guest RAM mapped without MAP_NORESERVE");
    }
    Ok(mem)
}

/// Registers every region of `mem` with KVM, one slot per region.
pub fn register(vm: &VmFd, mem: &GuestMem) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = u32::try_from(slot).expect("guest RAM has at most two regions");
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

/// Writes guest RAM to `path` (created, or truncated) as a sparse file: regions in guest
/// address order, all-zero pages left as holes. The guest must not run meanwhile.
pub fn save(mem: &GuestMem, path: &Path) -> Result<MemoryFile, MemoryError> {
    let io_err = |source| MemoryError::SaveFile {
        path: path.to_path_buf(),
        source,
    };
    // Guest memory holds the guest's secrets: owner only.
    let file = std::os::unix::fs::OpenOptionsExt::mode(
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true),
        0o600,
    )
    .open(path)
    .map_err(io_err)?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut data_pages = 0u64;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let (start, len) = (region.start_addr(), region.len());
        regions.push(RegionLayout {
            guest_addr: start.raw_value(),
            size: len,
            file_offset: offset,
        });
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(CHUNK, |rest| rest.min(CHUNK));
            let chunk = &mut buf[..n];
            let addr = start.unchecked_add(done);
            mem.read_slice(chunk, addr)
                .map_err(|e| MemoryError::SaveRead {
                    addr: addr.raw_value(),
                    reason: e.to_string(),
                })?;
            crc.update(chunk);
            // Write runs of pages with data; zero pages stay holes.
            let mut page = 0;
            while page < n {
                if is_zero(&chunk[page..(page + PAGE).min(n)]) {
                    page += PAGE;
                    continue;
                }
                let run_start = page;
                while page < n && !is_zero(&chunk[page..(page + PAGE).min(n)]) {
                    page += PAGE;
                }
                let run = &chunk[run_start..page.min(n)];
                data_pages += run.len().div_ceil(PAGE) as u64;
                file.write_all_at(run, offset + done + run_start as u64)
                    .map_err(io_err)?;
            }
            done += n as u64;
        }
        offset += len;
    }
    file.set_len(offset).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    Ok(MemoryFile {
        regions,
        size: offset,
        data_pages,
        crc32: crc.finalize(),
    })
}

fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: any bytes are valid u128s; `align_to` gives aligned middle elements only.
    let (head, body, tail) = unsafe { bytes.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// CRC-32 of a memory snapshot file's content (what [`MemoryFile::crc32`] records).
pub fn file_crc32(path: &Path) -> io::Result<u32> {
    let file = File::open(path)?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let n = file.read_at(&mut buf, offset)?;
        if n == 0 {
            return Ok(crc.finalize());
        }
        crc.update(&buf[..n]);
        offset += n as u64;
    }
}

/// Maps a memory snapshot file as guest RAM, `MAP_PRIVATE` (copy-on-write: the file is
/// never written, its page-cache pages are shared by every VM mapping it). Of `knobs` only
/// KSM applies (a file mapping reserves no swap).
pub fn map_snapshot(
    path: &Path,
    layout: &MemoryFile,
    knobs: MemoryKnobs,
) -> Result<GuestMem, MemoryError> {
    let err = |reason: String| MemoryError::MapFile {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    if len != layout.size {
        return Err(err(format!(
            "it is {len} bytes, the snapshot says {}: the snapshot is incomplete or not this file's",
            layout.size
        )));
    }
    let mut regions = Vec::with_capacity(layout.regions.len());
    for r in &layout.regions {
        if r.file_offset
            .checked_add(r.size)
            .is_none_or(|end| end > len)
        {
            return Err(err(format!(
                "region at {:#x} ({} bytes at offset {}) is outside the file",
                r.guest_addr, r.size, r.file_offset
            )));
        }
        let fd = file.try_clone().map_err(|e| err(e.to_string()))?;
        let size = usize::try_from(r.size)
            .map_err(|_| err(format!("region at {:#x} is too large", r.guest_addr)))?;
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(fd, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| err(format!("region at {:#x} overflows", r.guest_addr)))?;
        regions.push(region);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))?;
    mark_guest_ram(&mem);
    // KSM merges the pages a clone wrote (anonymous copies); the template's own pages are
    // already shared through the page cache.
    if knobs.ksm {
        mark_mergeable(&mem);
    }
    Ok(mem)
}

/// The length of a region this process has mapped: it fits the address space.
fn mapped_len(region: &GuestRegionMmap) -> usize {
    usize::try_from(region.len()).expect("a mapped region fits the address space")
}

/// `madvise(MADV_MERGEABLE)` on guest RAM ([`MemoryKnobs::ksm`]): KSM may share identical
/// pages copy-on-write. A failure only logs (KSM stays off for this VM).
fn mark_mergeable(mem: &GuestMem) {
    for region in mem.iter() {
        // SAFETY: advice on a mapping this process owns (`mem`); MADV_MERGEABLE never
        // changes its contents, only lets KSM share identical pages copy-on-write.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                mapped_len(region),
                libc::MADV_MERGEABLE,
            )
        };
        if rc != 0 {
            log::warn!(
                "madvise(MADV_MERGEABLE) on guest RAM failed: {} (KSM stays off for this VM)",
                std::io::Error::last_os_error()
            );
            return;
        }
    }
    log::info!("guest RAM marked MADV_MERGEABLE (KSM)");
}

/// Marks guest RAM `MADV_DONTDUMP`: out of VMM core dumps, and its own VMA flag (`dd` in
/// smaps), so the kernel never merges it with neighbouring anonymous mappings (malloc
/// arenas) and tools can tell guest RAM from the VMM's memory.
fn mark_guest_ram(mem: &GuestMem) {
    for region in mem.iter() {
        // SAFETY: advice on a mapping this process owns (`mem`); MADV_DONTDUMP only keeps
        // guest RAM out of core dumps of the VMM. It also gives the mapping its own VMA
        // flag (`dd` in smaps), so the kernel never merges it with neighbouring anonymous
        // mappings (malloc arenas) and tools can tell guest RAM from the VMM's memory.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                mapped_len(region),
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
        let mem = create(128 << 20, MemoryKnobs::default()).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(host_ranges(&mem)[0].1, 128 << 20);
    }

    #[test]
    fn guest_ram_is_flagged_dontdump() {
        let mem = create(32 << 20, MemoryKnobs::default()).unwrap();
        let (start, _) = host_ranges(&mem)[0];
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let header = format!("{start:x}-");
        let entry = smaps.split_once(header.as_str()).expect("mapping listed").1;
        let flags = entry.lines().find(|l| l.starts_with("VmFlags:")).unwrap();
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    #[test]
    fn density_knobs_map_usable_memory() {
        for knobs in [
            MemoryKnobs::default(),
            MemoryKnobs {
                noreserve: false,
                ksm: true,
            },
        ] {
            let mem = create(64 << 20, knobs).unwrap();
            mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
                .unwrap();
            assert_eq!(
                mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
                0xdead_beef
            );
        }
    }

    #[test]
    fn snapshot_file_is_sparse_and_maps_copy_on_write() {
        use std::os::unix::fs::MetadataExt;

        let mem = create(64 << 20, MemoryKnobs::default()).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(40 << 20))
            .unwrap();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let saved = save(&mem, &path).unwrap();
        assert_eq!(saved.size, 64 << 20);
        assert_eq!(saved.data_pages, 4);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert_eq!(meta.mode() & 0o777, 0o600, "guest memory is owner-only");
        assert!(
            meta.blocks() * 512 <= 64 << 10,
            "sparse: {} blocks",
            meta.blocks()
        );
        assert_eq!(file_crc32(&path).unwrap(), saved.crc32);

        let a = map_snapshot(&path, &saved, MemoryKnobs::default()).unwrap();
        let b = map_snapshot(&path, &saved, MemoryKnobs::default()).unwrap();
        let mut buf = [0u8; 10];
        a.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page");
        a.write_slice(b"clone A", GuestAddress(0)).unwrap();
        b.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page", "clones do not see each other's writes");
        assert_eq!(file_crc32(&path).unwrap(), saved.crc32, "file untouched");

        let wrong = MemoryFile {
            size: saved.size + 1,
            ..saved.clone()
        };
        let e = map_snapshot(&path, &wrong, MemoryKnobs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("incomplete"), "{e}");
    }
}
