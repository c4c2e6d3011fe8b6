//! What kind of KVM host this is, and the quirks that follow.
//!
//! On a real VMX/SVM host nothing here applies. On a nested "PVM" host (`kvm_pvm` module:
//! KVM without hardware virtualization, guest kernel code run by KVM's instruction
//! emulator) some instructions cannot be emulated at CPL0 and guest processes share AVX
//! state; podvisor then:
//! * masks CX16/XSAVE/POPCNT/SMAP and KVM's PV IPI / sched-yield in the CPUID table (see
//!   [`crate::arch::cpuid`]; with PV IPIs a second vCPU hangs in the IPI hypercall),
//! * adds `noxsave clearcpuid=smap,popcnt` to the kernel command line (these features
//!   leak into the guest whatever the CPUID table says) and suppresses RCU stall reports
//!   (emulated kernel code trips them, and their NMI backtrace runs an instruction the
//!   emulator cannot),
//! * puts `GLIBC_TUNABLES` (no AVX dispatch) into PID 1's environment via the command
//!   line, so concurrent guest programs do not corrupt each other's vector registers.
//!
//! Detection: `/sys/module/kvm_pvm` exists. `PODVISOR_HOST_QUIRKS=pvm|none` overrides it.

use std::path::Path;

use crate::arch::cpuid::CpuidMasks;

/// Environment variable that overrides host detection (`pvm`, `none`, or `auto`).
pub const HOST_QUIRKS_ENV: &str = "PODVISOR_HOST_QUIRKS";

/// glibc tunable that keeps guest programs off AVX/AVX-512 code paths.
pub const GLIBC_NO_AVX_TUNABLES: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,\
-AVX512DQ,-AVX512CD,-FMA,-EVEX";

/// The kind of KVM host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKind {
    /// Hardware virtualization (Intel VMX / AMD SVM): no quirks.
    Native,
    /// Nested KVM through the `kvm_pvm` module: guest CPL0 code is emulated.
    NestedPvm,
}

impl HostKind {
    /// Detects the host kind (see the module docs).
    pub fn detect() -> HostKind {
        match std::env::var(HOST_QUIRKS_ENV).as_deref() {
            Ok("pvm") => HostKind::NestedPvm,
            Ok("none") => HostKind::Native,
            _ => Self::detect_from(Path::new("/sys/module")),
        }
    }

    /// Detection against a sysfs module directory (for tests).
    pub fn detect_from(sys_module: &Path) -> HostKind {
        if sys_module.join("kvm_pvm").exists() {
            HostKind::NestedPvm
        } else {
            HostKind::Native
        }
    }

    /// CPUID masks this host needs.
    pub fn cpuid_masks(self) -> CpuidMasks {
        CpuidMasks {
            nested_pvm: self == HostKind::NestedPvm,
        }
    }

    /// Kernel command-line words this host needs, in order.
    pub fn cmdline_words(self) -> Vec<String> {
        match self {
            HostKind::Native => vec![],
            HostKind::NestedPvm => vec![
                "noxsave".into(),
                "clearcpuid=smap,popcnt".into(),
                // Emulated kernel code is so slow that long non-preemptible work (e.g.
                // unpacking the initramfs on a second vCPU) looks like an RCU stall; the
                // stall report's NMI backtrace then runs `lsl`, which the emulator cannot.
                "rcupdate.rcu_cpu_stall_suppress=1".into(),
                format!("GLIBC_TUNABLES={GLIBC_NO_AVX_TUNABLES}"),
            ],
        }
    }

    /// Environment variables guest processes need on this host (the agent passes them on).
    pub fn guest_env(self) -> Vec<(String, String)> {
        match self {
            HostKind::Native => vec![],
            HostKind::NestedPvm => vec![("GLIBC_TUNABLES".into(), GLIBC_NO_AVX_TUNABLES.into())],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_from_sysfs() {
        let dir = std::env::temp_dir().join(format!("podvisor-host-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(HostKind::detect_from(&dir), HostKind::Native);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(HostKind::detect_from(&dir), HostKind::NestedPvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn quirks_only_on_pvm() {
        assert!(HostKind::Native.cmdline_words().is_empty());
        assert!(!HostKind::Native.cpuid_masks().nested_pvm);
        let words = HostKind::NestedPvm.cmdline_words();
        assert!(words.contains(&"noxsave".to_string()));
        assert!(words
            .iter()
            .any(|w| w.starts_with("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,")));
        assert!(words.iter().all(|w| !w.contains(' ')), "one word each");
    }
}
