//! Loads the guest kernel and initrd into guest memory.
//!
//! An ELF `vmlinux` with a PVH note is entered through PVH (the fastest path: no
//! decompressor, which runs emulated on a nested host); an ELF without the note at its
//! 64-bit entry point; a `bzImage` at its 64-bit entry (load address + 0x200).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::arch::boot::{initrd_address, BootError};
use crate::arch::layout::HIMEM_START;
use crate::arch::regs::BootProtocol;

/// Errors of kernel and initrd loading.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a bootable x86_64 kernel ({source}): pass an ELF vmlinux or a bzImage \
         (`make guest-kernel` builds one)"
    )]
    NotAKernel {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error(
        "cannot load the kernel {path} into {mem_mib} MiB of guest memory ({source}): the image \
         is truncated or larger than the guest's RAM; give the guest more memory (--mem-mib) or \
         rebuild the kernel"
    )]
    DoesNotFit {
        path: PathBuf,
        mem_mib: u64,
        source: linux_loader::loader::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    InitrdPlacement(#[from] BootError),
    #[error("cannot copy initrd {path} into guest memory: {source}")]
    InitrdCopy {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
}

/// Where and how the loaded kernel is entered.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    pub protocol: BootProtocol,
    /// Guest physical address of the entry point.
    pub entry: u64,
    /// First byte after the kernel image in guest memory.
    pub kernel_end: u64,
    /// The bzImage setup header (bzImage only).
    pub setup_header: Option<setup_header>,
}

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel<M: GuestMemory>(mem: &M, path: &Path) -> Result<KernelEntry, LoaderError> {
    let open_err = |source| LoaderError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC;
    let mem_mib = (mem.last_addr().0 + 1) >> 20;
    let classify = |source: linux_loader::loader::Error| {
        use linux_loader::loader::Error as E;
        let path = path.to_path_buf();
        match &source {
            E::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
            | E::Bzimage(linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel)
            | E::MemoryOverflow => LoaderError::DoesNotFit {
                path,
                mem_mib,
                source,
            },
            _ => LoaderError::NotAKernel { path, source },
        }
    };
    if is_elf {
        let result =
            Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(classify)?;
        let (protocol, entry) = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (BootProtocol::Pvh, addr.0),
            _ => (BootProtocol::Linux64, result.kernel_load.0),
        };
        Ok(KernelEntry {
            protocol,
            entry,
            kernel_end: result.kernel_end,
            setup_header: None,
        })
    } else {
        let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(classify)?;
        Ok(KernelEntry {
            protocol: BootProtocol::Linux64,
            entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            kernel_end: result.kernel_end,
            setup_header: result.setup_header,
        })
    }
}

/// Loads the initrd at `path` at the top of low RAM; returns (address, size).
pub fn load_initrd<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), LoaderError> {
    let read_err = |source| LoaderError::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let addr = initrd_address(mem_size, size, kernel_end)?;
    let len = usize::try_from(size).expect("initrd_address placed it in guest RAM");
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| LoaderError::InitrdCopy {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("podvisor-loader-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let path = temp_file("garbage", &[0x55; 8192]);
        let err = load_kernel(&mem(), &path).unwrap_err();
        assert!(matches!(err, LoaderError::NotAKernel { .. }), "{err}");
        assert!(err.to_string().contains("make guest-kernel"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn missing_kernel_says_which_file() {
        let err = load_kernel(&mem(), Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn initrd_lands_at_the_top_of_ram() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i.to_le_bytes()[0]).collect();
        let path = temp_file("initrd", &data);
        let mem = mem();
        let (addr, size) = load_initrd(&mem, 64 << 20, &path, 20 << 20).unwrap();
        assert_eq!(size, data.len() as u64);
        assert!(addr + size <= 64 << 20 && addr & 0xfff == 0);
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, data);
        std::fs::remove_file(path).unwrap();
    }
}
