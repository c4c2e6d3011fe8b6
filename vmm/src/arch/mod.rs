//! x86_64 platform set-up: the guest physical layout, the boot protocols (PVH and the Linux
//! 64-bit boot protocol), the MP table, and the initial CPU state (CPUID, MSRs, registers).
//!
//! Everything here is plain data written into guest memory or into KVM structures, so most
//! of it is unit-tested without a VM.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod pagewalk;
pub mod regs;
