//! Model-specific registers set before the first `KVM_RUN`.
//!
//! Only MSRs that this host's KVM lists in `KVM_GET_MSR_INDEX_LIST` are set: a nested host
//! refuses some (e.g. `IA32_ARCH_CAPABILITIES`), and asking for one aborts the whole batch.

use kvm_bindings::kvm_msr_entry;

pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

/// The MSR values a vCPU starts with (index, value).
pub const BOOT_MSRS: [(u32, u64); 11] = [
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_IA32_TSC, 0),
    (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
];

/// The boot MSR entries this host supports, and the indices it does not (to log).
pub fn boot_entries(supported: &[u32]) -> (Vec<kvm_msr_entry>, Vec<u32>) {
    let mut skipped = Vec::new();
    let entries = BOOT_MSRS
        .iter()
        .filter(|(index, _)| {
            let ok = supported.contains(index);
            if !ok {
                skipped.push(*index);
            }
            ok
        })
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    (entries, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_supported_msrs_are_set() {
        let supported = [MSR_IA32_TSC, MSR_LSTAR, MSR_IA32_MISC_ENABLE, 0x10a];
        let (entries, skipped) = boot_entries(&supported);
        let set: Vec<u32> = entries.iter().map(|e| e.index).collect();
        assert_eq!(set, vec![MSR_LSTAR, MSR_IA32_TSC, MSR_IA32_MISC_ENABLE]);
        assert_eq!(entries[2].data, MISC_ENABLE_FAST_STRING);
        assert_eq!(skipped.len(), BOOT_MSRS.len() - 3);
        assert!(skipped.contains(&MSR_MTRR_DEF_TYPE));
    }
}
