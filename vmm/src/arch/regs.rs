//! Initial vCPU register state for the two boot protocols.
//!
//! * PVH (ELF `vmlinux` with a `XEN_ELFNOTE_PHYS32_ENTRY` note): 32-bit protected mode,
//!   paging off, flat segments, `ebx` = address of `hvm_start_info`.
//! * Linux 64-bit boot protocol (bzImage, or ELF without the note): long mode with an
//!   identity map of the first 1 GiB, `rsi` = address of the zero page.
//!
//! The boot CPU gets these; application processors start in real mode through the INIT/SIPI
//! sequence the guest sends, so they need nothing but the LAPIC set-up.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{BOOT_STACK_POINTER, GDT_START, PDE_START, PDPTE_START, PML4_START};

/// Errors of register set-up.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT or page tables into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Which boot protocol the kernel is entered through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit entry, `hvm_start_info` in `ebx`.
    Pvh,
    /// Linux 64-bit boot protocol: `boot_params` in `rsi`.
    Linux64,
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// GDT entries (flags, base, limit) in descriptor encoding.
const GDT_NULL: u64 = 0;
const GDT_CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
const GDT_CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
const GDT_DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
const GDT_TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

/// Encodes a segment descriptor from its flags (access byte in bits 0..8, flags nibble in
/// bits 12..16), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0xf0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The `kvm_segment` a selector loads for descriptor `entry` at GDT index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) as u32) | (((entry >> 32) & 0x000f_0000) as u32);
    let g = ((entry >> 55) & 1) as u8;
    // With G set, the limit counts 4 KiB pages.
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The boot GDT for `protocol`: null, code, data, TSS.
pub fn gdt(protocol: BootProtocol) -> [u64; 4] {
    let code = match protocol {
        BootProtocol::Pvh => GDT_CODE32,
        BootProtocol::Linux64 => GDT_CODE64,
    };
    [GDT_NULL, code, GDT_DATA, GDT_TSS]
}

/// Writes the GDT (and for 64-bit boot, the identity page tables) and fills `sregs`.
pub fn setup_sregs<M: GuestMemory>(
    mem: &M,
    protocol: BootProtocol,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let table = gdt(protocol);
    for (i, entry) in table.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64))?;
    }
    let code = segment_from_gdt(table[1], 1);
    let data = segment_from_gdt(table[2], 2);
    let tss = segment_from_gdt(table[3], 3);

    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&table) - 1).expect("a 4-entry GDT");
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Linux64 => {
            setup_identity_map(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages (64-bit boot protocol only).
fn setup_identity_map<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | PRESENT_RW, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PAGE_SIZE_2M | PRESENT_RW,
            GuestAddress(PDE_START + i * 8),
        )?;
    }
    Ok(())
}

/// General-purpose registers at the kernel's entry point.
pub fn boot_regs(protocol: BootProtocol, entry: u64, boot_info: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Pvh => regs.rbx = boot_info,
        BootProtocol::Linux64 => {
            regs.rsi = boot_info;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    regs
}

/// x87/SSE control words at reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    // The register file is C `char`s: each one's byte, as it is.
    u32::from_le_bytes(std::array::from_fn(|i| {
        state.regs[offset + i].to_ne_bytes()[0]
    }))
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        state.regs[offset + i] = std::ffi::c_char::from_ne_bytes([b]);
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as a BIOS would.
pub fn setup_lint(state: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment_from_gdt(GDT_CODE64, 1);
        assert_eq!(
            (code64.base, code64.limit, code64.selector),
            (0, 0xffff_ffff, 8)
        );
        assert_eq!(
            (code64.type_, code64.l, code64.db, code64.s, code64.present),
            (0xb, 1, 0, 1, 1)
        );
        let code32 = segment_from_gdt(GDT_CODE32, 1);
        assert_eq!((code32.l, code32.db, code32.g), (0, 1, 1));
        let data = segment_from_gdt(GDT_DATA, 2);
        assert_eq!(
            (data.type_, data.selector, data.limit),
            (0x3, 16, 0xffff_ffff)
        );
        let tss = segment_from_gdt(GDT_TSS, 3);
        assert_eq!((tss.type_, tss.s, tss.selector), (0xb, 0, 24));
        let null = segment_from_gdt(GDT_NULL, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn gdt_entry_round_trips_base_and_limit() {
        let e = gdt_entry(0x4093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 5);
        assert_eq!((s.base, s.limit, s.g), (0x1234_5678, 0xabcde, 0));
    }

    #[test]
    fn pvh_state_is_flat_protected_mode_without_paging() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, BootProtocol::Pvh, &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_eq!(sregs.efer, 0);
        assert_eq!(sregs.cs.db, 1);
        let first: u64 = mem.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(first, GDT_CODE32);
        let regs = boot_regs(BootProtocol::Pvh, 0x100_0500, 0x6000);
        assert_eq!((regs.rip, regs.rbx, regs.rflags), (0x100_0500, 0x6000, 2));
    }

    #[test]
    fn long_mode_state_has_identity_map() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, BootProtocol::Linux64, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cs.l, 1);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * 511)).unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
        let regs = boot_regs(BootProtocol::Linux64, 0x100_0200, 0x7000);
        assert_eq!((regs.rsi, regs.rsp), (0x7000, BOOT_STACK_POINTER));
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut state = kvm_lapic_state::default();
        set_lapic_reg(&mut state, APIC_LVT0, 0x0001_0700);
        setup_lint(&mut state);
        assert_eq!(lapic_reg(&state, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&state, APIC_LVT1) >> 8 & 0x7, APIC_MODE_NMI);
    }
}
