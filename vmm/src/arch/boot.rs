//! Boot information handed to the guest kernel: the e820 memory map, the command line, the
//! initrd placement, and the PVH `hvm_start_info` or the Linux `boot_params` zero page.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, GuestAddress, GuestMemory};

use super::layout::{
    low_ram_end, ram_regions, CMDLINE_START, EBDA_START, HIMEM_START, INITRD_MAX_END,
    PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

/// Errors of boot-information set-up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "the initrd ({initrd_size} bytes) does not fit in guest RAM above the kernel \
         (kernel ends at {kernel_end:#x}, usable RAM ends at {ram_end:#x}): give the guest more memory"
    )]
    InitrdDoesNotFit {
        initrd_size: u64,
        kernel_end: u64,
        ram_end: u64,
    },
    #[error("the {what} ({value:#x}) does not fit the boot protocol's 32-bit field")]
    Above32Bits { what: &'static str, value: u64 },
    #[error("cannot write the boot parameters into guest memory: {0}")]
    Configurator(#[from] linux_loader::configurator::Error),
}

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// `value` for a 32-bit boot-protocol field, or an error naming `what`.
fn field32(what: &'static str, value: u64) -> Result<u32, BootError> {
    u32::try_from(value).map_err(|_| BootError::Above32Bits { what, value })
}

/// One entry of the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map of a guest with `mem_size` bytes of RAM.
///
/// The first 1 MiB holds conventional memory up to the EBDA (the MP table lives there) and
/// the reserved BIOS area; RAM proper starts at 1 MiB and skips the MMIO gap.
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    // RAM proper: the part of the first region above 1 MiB, then anything above the gap.
    for (start, size) in ram_regions(mem_size) {
        let start = start.raw_value();
        let (from, to) = (start.max(HIMEM_START), start + size);
        if to > from {
            map.push(E820Entry {
                addr: from,
                size: to - from,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Where the initrd goes: page-aligned at the top of low RAM, below the kernel's
/// `initrd_addr_max`, and above the kernel image.
pub fn initrd_address(mem_size: u64, initrd_size: u64, kernel_end: u64) -> Result<u64, BootError> {
    let ram_end = low_ram_end(mem_size).min(INITRD_MAX_END);
    let err = || BootError::InitrdDoesNotFit {
        initrd_size,
        kernel_end,
        ram_end,
    };
    let start = ram_end.checked_sub(initrd_size).ok_or_else(err)? & !0xfff;
    if start < kernel_end {
        return Err(err());
    }
    Ok(start)
}

/// Writes the PVH `hvm_start_info`, module list and memory map.
pub fn write_pvh<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = memory_map(mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: u32::try_from(memmap.len()).expect("a memory map has at most 4 entries"),
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some((addr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<M>(&params, mem)?;
    Ok(())
}

/// Writes the Linux boot protocol's zero page. `header` is the bzImage's setup header, or
/// `None` for an ELF kernel entered at its 64-bit entry point.
pub fn write_linux_boot_params<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = field32("command line address", CMDLINE_START)?;
    params.hdr.cmdline_size = field32("command line size", cmdline_len as u64)?;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = field32("initrd address", addr)?;
        params.hdr.ramdisk_size = field32("initrd size", size)?;
    }
    let map = memory_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.type_ = e.kind;
    }
    params.e820_entries = u8::try_from(map.len()).expect("a memory map has at most 4 entries");
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn small_guest_memory_map() {
        let map = memory_map(128 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: EBDA_START,
                    size: HIMEM_START - EBDA_START,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: (128 << 20) - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn large_guest_memory_map_skips_the_gap() {
        let map = memory_map(5 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM_START,
                size: MMIO_GAP_START - HIMEM_START,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: MMIO_GAP_END,
                size: 2 << 30,
                kind: E820_RAM
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (5 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let addr = initrd_address(128 << 20, 3_000_000, 40 << 20).unwrap();
        assert_eq!(addr & 0xfff, 0);
        assert!(addr + 3_000_000 <= 128 << 20);
        assert!(addr >= (128 << 20) - 3_000_000 - 0x1000);
        // Big guests keep it under initrd_addr_max.
        let addr = initrd_address(8 << 30, 1 << 20, 40 << 20).unwrap();
        assert!(addr + (1 << 20) <= INITRD_MAX_END);
    }

    #[test]
    fn initrd_that_overlaps_the_kernel_is_refused() {
        assert!(matches!(
            initrd_address(64 << 20, 40 << 20, 40 << 20),
            Err(BootError::InitrdDoesNotFit { .. })
        ));
        assert!(initrd_address(1 << 20, 2 << 20, 0).is_err());
    }

    #[test]
    fn pvh_start_info_points_at_memmap_and_initrd() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
        write_pvh(&mem, 128 << 20, Some((0x700_0000, 0x1234))).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(
            (info.memmap_paddr, info.memmap_entries),
            (PVH_MEMMAP_START, 3)
        );
        assert_eq!(
            (info.nr_modules, info.modlist_paddr),
            (1, PVH_MODLIST_START)
        );
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x700_0000, 0x1234));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24))
            .unwrap();
        assert_eq!((last.addr, last.type_), (HIMEM_START, E820_RAM));
    }

    #[test]
    fn zero_page_has_cmdline_initrd_and_e820() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
        write_linux_boot_params(&mem, 128 << 20, None, 42, Some((0x700_0000, 0x1000))).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(u64::from(params.hdr.cmd_line_ptr), CMDLINE_START);
        assert_eq!({ params.hdr.cmdline_size }, 42);
        assert_eq!({ params.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!(params.e820_entries, 3);
    }
}
