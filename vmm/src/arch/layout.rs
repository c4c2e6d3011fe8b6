//! The guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_6000  PVH start_info (+ module list)
//! 0x0000_7000  zero page / PVH memory map            0x0000_8ff0  boot stack
//! 0x0000_9000  PML4, PDPT, PD (identity map of the first 1 GiB, 64-bit boot only)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (EBDA), reserved up to 1 MiB
//! 0x0010_0000  RAM (the kernel loads at its ELF address, usually 16 MiB) .. initrd at the top
//! 0xc000_0000  MMIO gap (1 GiB): boot timer, virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 4 GiB, when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after `hvm_start_info`.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map; the Linux boot protocol's zero page uses the same page.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol "zero page" (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity map (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line x86 Linux accepts (`COMMAND_LINE_SIZE`), with its NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte of "high" memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Highest address (exclusive) for the initrd under the Linux boot protocol's default
/// `initrd_addr_max`.
pub const INITRD_MAX_END: u64 = 0x3800_0000;

/// Start of the 32-bit MMIO gap: no RAM from here to 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Boot timer MMIO byte (see `devices::legacy::boot_timer`).
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
/// Virtio-mmio device windows are allocated from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// End (exclusive) of the virtio-mmio window area.
pub const VIRTIO_MMIO_END: u64 = 0xfe00_0000;
/// The IOAPIC's MMIO window.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' MMIO window.
pub const APIC_START: u64 = 0xfee0_0000;

/// Number of IOAPIC pins (GSIs) KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u32 = 24;
/// First GSI free for devices beyond the legacy ISA ones (virtio-mmio uses 5..=23).
pub const FIRST_DEVICE_GSI: u32 = 5;

/// The RAM regions of a guest with `mem_size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
        ]
    }
}

/// End (exclusive) of the RAM below the MMIO gap.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

// The boot stack sits between the zero page and the page tables.
const _: () =
    assert!(BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000 && BOOT_STACK_POINTER < PML4_START);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        assert_eq!(low_ram_end(128 << 20), 128 << 20);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let regions = ram_regions(4 << 30);
        assert_eq!(
            regions,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
        assert_eq!(low_ram_end(4 << 30), MMIO_GAP_START);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (GDT_START, 0x20),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (PVH_MEMMAP_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, HIMEM_START - EBDA_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}
