//! The CPUID table each vCPU sees.
//!
//! Starts from `KVM_GET_SUPPORTED_CPUID` (what this host's KVM can give a guest) and adjusts
//! per vCPU: APIC ids and topology (one core per vCPU, one thread per core), the hypervisor
//! bit, and, on hosts whose instruction emulator cannot run some instructions at CPL0 (see
//! [`crate::host`]), masks those features.

use kvm_bindings::kvm_cpuid_entry2;

/// Bits of CPUID leaf 1.
mod leaf1 {
    pub const ECX_CX16: u32 = 1 << 13;
    pub const ECX_POPCNT: u32 = 1 << 23;
    pub const ECX_XSAVE: u32 = 1 << 26;
    pub const ECX_OSXSAVE: u32 = 1 << 27;
    pub const ECX_HYPERVISOR: u32 = 1 << 31;
    pub const EDX_HTT: u32 = 1 << 28;
}
/// Bits of CPUID leaf 7, subleaf 0.
mod leaf7 {
    pub const EBX_SMAP: u32 = 1 << 20;
}
/// Bits of the KVM paravirtual feature leaf (0x4000_0001 EAX).
mod kvm_features {
    pub const PV_SEND_IPI: u32 = 1 << 11;
    pub const PV_SCHED_YIELD: u32 = 1 << 13;
}

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_EXT_FEATURES: u32 = 7;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

/// Topology level types of leaves 0xb / 0x1f (ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Feature masks to apply on top of what KVM reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidMasks {
    /// Nested-PVM host quirks: hide instructions its CPL0 emulator cannot execute
    /// (CMPXCHG16B, XSAVE, POPCNT, SMAP's `clac`/`stac`), and the KVM paravirtual IPI and
    /// sched-yield hypercalls (with them a second vCPU hangs in `__send_ipi_mask`).
    pub nested_pvm: bool,
}

/// Adjusts a copy of the supported-CPUID table for vCPU `cpu_id` of `cpu_count`.
pub fn adjust(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, cpu_count: u8, masks: CpuidMasks) {
    let core_bits = bits_for(u32::from(cpu_count));
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size in 8-byte units.
                e.ebx = (u32::from(cpu_id) << 24) | (u32::from(cpu_count) << 16) | (8 << 8);
                e.ecx |= leaf1::ECX_HYPERVISOR;
                if cpu_count > 1 {
                    e.edx |= leaf1::EDX_HTT;
                } else {
                    e.edx &= !leaf1::EDX_HTT;
                }
                if masks.nested_pvm {
                    e.ecx &= !(leaf1::ECX_CX16
                        | leaf1::ECX_POPCNT
                        | leaf1::ECX_XSAVE
                        | leaf1::ECX_OSXSAVE);
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 {
                    u32::from(cpu_count) - 1
                } else {
                    0
                };
                e.eax &= 0x3fff;
                e.eax |= ((u32::from(cpu_count) - 1) << 26) | (sharing << 14);
            }
            LEAF_EXT_FEATURES if e.index == 0 && masks.nested_pvm => {
                e.ebx &= !leaf7::EBX_SMAP;
            }
            LEAF_KVM_FEATURES if masks.nested_pvm => {
                e.eax &= !(kvm_features::PV_SEND_IPI | kvm_features::PV_SCHED_YIELD);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = u32::from(cpu_id);
                match e.index {
                    0 => {
                        e.eax = 0; // no SMT: thread id takes no bits
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = u32::from(cpu_count);
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index; // level type 0: invalid, ends the enumeration
                    }
                }
            }
            _ => {}
        }
    }
}

/// Number of bits needed to number `n` items (`ceil(log2(n))`).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    fn table() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(1, 0),
            entry(4, 0),
            entry(7, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(LEAF_KVM_FEATURES, 0),
        ]
    }

    #[test]
    fn topology_and_apic_ids() {
        let mut t = table();
        adjust(&mut t, 2, 4, CpuidMasks::default());
        let l1 = find(&t, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical count");
        assert_ne!(l1.ecx & leaf1::ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & leaf1::EDX_HTT, 0);
        assert_ne!(l1.ecx & leaf1::ECX_CX16, 0, "no masking on a normal host");
        assert_ne!(
            find(&t, LEAF_KVM_FEATURES, 0).eax & kvm_features::PV_SEND_IPI,
            0
        );
        assert_eq!(find(&t, 4, 0).eax >> 26, 3, "cores per package - 1");
        let smt = find(&t, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&t, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
        let end = find(&t, 0xb, 2);
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut t = table();
        adjust(&mut t, 0, 1, CpuidMasks::default());
        assert_eq!(find(&t, 1, 0).edx & leaf1::EDX_HTT, 0);
        assert_eq!(find(&t, 0xb, 1).eax, 0);
    }

    #[test]
    fn emulator_masks_hide_unemulatable_instructions() {
        let mut t = table();
        adjust(&mut t, 0, 1, CpuidMasks { nested_pvm: true });
        let l1 = find(&t, 1, 0);
        for bit in [
            leaf1::ECX_CX16,
            leaf1::ECX_POPCNT,
            leaf1::ECX_XSAVE,
            leaf1::ECX_OSXSAVE,
        ] {
            assert_eq!(l1.ecx & bit, 0);
        }
        assert_eq!(find(&t, 7, 0).ebx & leaf7::EBX_SMAP, 0);
        let kvm = find(&t, LEAF_KVM_FEATURES, 0).eax;
        assert_eq!(
            kvm & (kvm_features::PV_SEND_IPI | kvm_features::PV_SCHED_YIELD),
            0
        );
        assert_ne!(kvm, 0, "other KVM features stay");
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
