//! Guest virtual → physical translation by walking the guest's page tables, used to show the
//! instruction bytes at a failing RIP (the first thing to read when a guest trips KVM's
//! instruction emulator).

use vm_memory::{Bytes, GuestAddress, GuestMemory};

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates `vaddr` with the paging state (`cr0`, `cr3`, `cr4`, `efer`). Supports no
/// paging and 4-level long-mode paging (4 KiB, 2 MiB and 1 GiB pages).
pub fn translate<M: GuestMemory>(
    mem: &M,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    vaddr: u64,
) -> Option<u64> {
    if cr0 & CR0_PG == 0 {
        return Some(vaddr);
    }
    if efer & EFER_LMA == 0 || cr4 & CR4_PAE == 0 {
        return None; // 32-bit paging: not used by a 64-bit kernel after early boot
    }
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (vaddr >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        let is_leaf = level == 0 || (level < 3 && entry & PAGE_SIZE_BIT != 0);
        if is_leaf {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (vaddr & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn walks_4k_and_2m_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000; PD[1] = 2 MiB page at 0x20_0000,
        // PD[0] -> PT 0x4000 whose entry 5 maps to 0x7000.
        mem.write_obj(0x2000u64 | 3, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3000u64 | 3, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x4000u64 | 3, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0x20_0000u64 | 0x83, GuestAddress(0x3008))
            .unwrap();
        mem.write_obj(0x7000u64 | 3, GuestAddress(0x4000 + 5 * 8))
            .unwrap();
        let lm = |v| translate(&mem, CR0_PG, 0x1000, CR4_PAE, EFER_LMA, v);
        assert_eq!(lm(0x5123), Some(0x7123));
        assert_eq!(lm(0x20_1234), Some(0x20_1234));
        assert_eq!(lm(0x6000), None, "not present");
        assert_eq!(
            translate(&mem, 0, 0, 0, 0, 0x1234),
            Some(0x1234),
            "paging off"
        );
    }
}
