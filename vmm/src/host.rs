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
//!   line, so concurrent guest programs do not corrupt each other's vector registers,
//! * moves a restored guest's kvm-clock forward by the snapshot's age
//!   ([`HostKind::restore_advances_clock`]).
//!
//! Detection: `/sys/module/kvm_pvm` exists. A host setting ([`HostQuirks`]; the shim and
//! the CLI take it from `PODVISOR_HOST_QUIRKS=pvm|none`) overrides it.

use std::path::Path;

use crate::arch::cpuid::CpuidMasks;

/// Which host quirks apply: detected, or forced either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostQuirks {
    /// Detect the host kind (see the module docs).
    #[default]
    Auto,
    /// A nested PVM host's quirks, whatever detection says.
    Pvm,
    /// No quirks, whatever detection says.
    None,
}

/// glibc tunable that keeps guest programs off AVX/AVX-512 code paths.
///
/// Clearing the AVX/AVX2 "usable" bits is not enough: glibc 2.36 picks `memcpy`/`memmove`
/// by the separate *preferred* bit `AVX_Fast_Unaligned_Load`, which stays set, so every
/// large copy still ran through YMM registers (`__memmove_avx_unaligned_erms`) and a
/// context switch in the guest could replace the upper half of a 32-byte chunk in flight
/// (seen as corrupted bytes in 12 KB agent requests). `-AVX_Fast_Unaligned_Load` clears it
/// (the copy becomes `__memmove_ssse3`); the unit test below checks this against the
/// host's glibc.
pub const GLIBC_NO_AVX_TUNABLES: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,\
-AVX512DQ,-AVX512CD,-FMA,-EVEX,-AVX_Fast_Unaligned_Load";

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
    /// The host kind `quirks` say: forced, or detected (see the module docs).
    pub fn detect(quirks: HostQuirks) -> HostKind {
        match quirks {
            HostQuirks::Pvm => HostKind::NestedPvm,
            HostQuirks::None => HostKind::Native,
            HostQuirks::Auto => Self::detect_from(Path::new("/sys/module")),
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

    /// Whether a restored guest's kvm-clock must move forward by the time the snapshot sat
    /// on disk. On PVM hosts guest user space reads the host's TSC natively (the vDSO's
    /// `clock_gettime`), so it sees that time pass while a guest kernel clock continuing
    /// from the saved value does not: every absolute `CLOCK_MONOTONIC` deadline user space
    /// hands the kernel (Rust's and glibc's timed futex waits) then lasts the snapshot's
    /// age longer. Measured: the agent's first answer after a restore took 34–36 s without
    /// the advance and 9 s with it.
    pub fn restore_advances_clock(self) -> bool {
        self == HostKind::NestedPvm
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
        assert_eq!(HostKind::detect(HostQuirks::Pvm), HostKind::NestedPvm);
        assert_eq!(HostKind::detect(HostQuirks::None), HostKind::Native);
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

    /// The tunable leaves glibc no AVX code path: no active AVX feature bit and no preferred
    /// bit that selects YMM/ZMM string or copy routines (checked with the dynamic loader's
    /// own diagnostics; the agent links the same glibc statically).
    #[test]
    fn glibc_tunables_leave_no_avx_dispatch() {
        let ld_so = std::path::Path::new("/lib64/ld-linux-x86-64.so.2");
        let out = std::process::Command::new(ld_so)
            .arg("--list-diagnostics")
            .env("GLIBC_TUNABLES", GLIBC_NO_AVX_TUNABLES)
            .output();
        let out = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            other => {
                eprintln!(
                    "SKIPPED: {} --list-diagnostics unavailable: {other:?}",
                    ld_so.display()
                );
                return;
            }
        };
        let value = |key: &str| -> u64 {
            out.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
                .unwrap_or(0)
        };
        // Active CPUID bits (leaf 1 ECX: FMA 12, AVX 28; leaf 7 EBX: AVX2 5, AVX512F 16)
        // and the preferred bits that pick vector-register routines.
        let leaf1_ecx = value("x86.cpu_features.features[0x0].active[0x2]");
        let leaf7_ebx = value("x86.cpu_features.features[0x1].active[0x1]");
        let mut offending = Vec::new();
        for (name, on) in [
            ("FMA", leaf1_ecx >> 12 & 1),
            ("AVX", leaf1_ecx >> 28 & 1),
            ("AVX2", leaf7_ebx >> 5 & 1),
            ("AVX512F", leaf7_ebx >> 16 & 1),
        ] {
            if on == 1 {
                offending.push(name.to_string());
            }
        }
        offending.extend(
            out.lines()
                .filter(|l| l.starts_with("x86.cpu_features.preferred.") && l.ends_with("=0x1"))
                .filter(|l| l.contains("AVX") || l.contains("EVEX"))
                .filter(|l| !l.contains("Prefer_No_"))
                .map(str::to_string),
        );
        assert!(
            offending.is_empty(),
            "glibc still dispatches to AVX: {offending:?}"
        );
    }
}
