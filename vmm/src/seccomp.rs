//! The vCPU threads' seccomp filter, and the event loop's (the devices' handlers plus
//! nothing of the VMM's own). The machinery, the device workers' filters and the rules
//! (capabilities, SIGSYS report, the spawner) are in `devices::confine`.
//!
//! A vCPU thread runs KVM_RUN and, on MMIO/PIO exits, the devices' register handlers:
//! eventfd and console writes, a device activation (fd flags, the tap's offloads, a worker
//! started through the spawner). It may issue only the KVM vCPU ioctls the VMM uses
//! (run, and the state reads of a snapshot) besides those device ioctls.

use devices::confine::{self, ConfineError, Rules};
pub use devices::confine::{set_mode, Mode};
use kvm_bindings::{
    kvm_cpuid2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);

/// The KVM ioctls a vCPU thread issues.
pub fn vcpu_kvm_ioctls() -> Vec<u64> {
    [
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_CPUID2(),
        KVM_GET_LAPIC(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
    ]
    .to_vec()
}

/// The vCPU filter.
pub fn vcpu_rules() -> Rules {
    let mut r = confine::base();
    confine::allow(
        &mut r,
        &[
            libc::SYS_read,
            libc::SYS_fcntl,
            libc::SYS_dup,
            libc::SYS_fstat,
            libc::SYS_lseek,
            // The capped console log (`crate::console_file`), on its open fd.
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_ftruncate,
        ],
    );
    let mut ioctls = vcpu_kvm_ioctls();
    ioctls.extend(confine::tap_and_fd_ioctls());
    confine::allow_arg(&mut r, libc::SYS_ioctl, 1, &ioctls);
    r
}

/// Confines the calling vCPU thread (no capabilities kept).
pub fn confine_vcpu() -> Result<(), ConfineError> {
    // The kick that interrupts KVM_RUN (pause, stop) must still arrive.
    confine::confine_with("vCPU", vcpu_rules(), &[], &[crate::vcpu::kick_signal()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    /// The child half (see `devices::confine::run_child`).
    #[test]
    fn confined_vcpu_child() {
        if std::env::var(confine::CHILD_ENV).is_err() {
            return;
        }
        std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(|| {
                let status = confine::open_thread_status();
                confine_vcpu().unwrap();
                let (seccomp, nnp) = confine::thread_status(&status);
                eprintln!("status: Seccomp {seccomp} NoNewPrivs {nnp}");
                // A vCPU thread may not open files.
                // SAFETY: openat of a valid C string; the filter stops it first.
                unsafe {
                    libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0)
                };
                eprintln!("still alive after a forbidden syscall");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_confined_vcpu_thread_can_write_past_the_console_cap() {
        // The serial console is written on vCPU threads; keeping it within its cap must
        // not need anything the filter forbids (this process would die of SIGSYS).
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("console.log");
        let cap = crate::console_file::ConsoleCap {
            max_bytes: 64 << 10,
            bytes_per_sec: 1 << 30,
            burst: 1 << 30,
        };
        let mut log = crate::console_file::CappedLog::open(&path, cap).unwrap();
        std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                confine_vcpu().unwrap();
                for _ in 0..(256 << 10) {
                    std::io::Write::write_all(&mut log, b"xyz\n").unwrap();
                }
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= cap.max_bytes);
    }

    #[test]
    fn a_forbidden_syscall_of_a_vcpu_thread_ends_in_sigsys() {
        if std::env::var(confine::CHILD_ENV).is_ok() {
            return;
        }
        let (status, stderr) = confine::run_child("seccomp::tests::confined_vcpu_child", "vcpu");
        assert!(
            stderr.contains("status: Seccomp 2 NoNewPrivs 1"),
            "{stderr}"
        );
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "thread 'vcpu0' made forbidden syscall {}",
                libc::SYS_openat
            )),
            "{stderr}"
        );
    }

    #[test]
    fn kvm_ioctl_numbers_are_the_uapi_ones() {
        // From linux/kvm.h on x86_64.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(KVM_GET_CPUID2(), 0xc008_ae91);
    }
}
