//! Shared helpers of the integration tests.

#![allow(dead_code)]

pub mod containerd;
// Each test binary uses a part of the kit.
#[allow(unused_imports)]
pub use podvisor_test_kit::{cni, image, threads, vm_slots};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The guest artifacts a guest-tier test needs.
pub struct GuestArtifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Whether a missing KVM or guest kernel must fail the test rather than skip it.
pub fn kvm_required() -> bool {
    std::env::var("PODVISOR_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

fn skip_or_fail(test: &str, why: &str) -> Option<GuestArtifacts> {
    if kvm_required() {
        panic!("{test}: {why} (PODVISOR_REQUIRE_KVM=1, so this is a failure; run `make test`)");
    }
    eprintln!("\n*** SKIPPED guest-tier test {test}: {why}. Run `make test` on a host with /dev/kvm. ***\n");
    None
}

/// The kernel and initrd from `make test`'s environment, if this machine can boot them.
pub fn guest_artifacts(test: &str) -> Option<GuestArtifacts> {
    if !Path::new("/dev/kvm").exists() {
        return skip_or_fail(test, "/dev/kvm is missing");
    }
    let var = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_file())
    };
    match (var("PODVISOR_KERNEL"), var("PODVISOR_INITRD")) {
        (Some(kernel), Some(initrd)) => Some(GuestArtifacts { kernel, initrd }),
        _ => skip_or_fail(
            test,
            "PODVISOR_KERNEL / PODVISOR_INITRD are not set to built files",
        ),
    }
}

/// `podvisor` with `args`, stdin closed; returns its output.
pub fn podvisor(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run podvisor")
}

/// A unique temporary path for this test process.
pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("podvisor-it-{}-{name}", std::process::id()))
}

/// A busybox rootfs at `rootfs`: static busybox (`/bin/busybox`, package busybox-static),
/// one link per applet, the usual empty directories and a root passwd entry.
pub fn build_busybox_rootfs(rootfs: &Path) {
    image::build_busybox_rootfs(rootfs).unwrap()
}

/// Whether `path` exists for guest-tier test `test`; if not, skips loudly (returns false)
/// or, with `PODVISOR_REQUIRE_KVM=1`, fails with `why` (how to get the file).
pub fn require_file(test: &str, path: &Path, why: &str) -> bool {
    if path.is_file() {
        return true;
    }
    if kvm_required() {
        panic!("{test}: {} missing: {why}", path.display());
    }
    eprintln!("*** SKIPPED {test}: {} missing ({why}) ***", path.display());
    false
}
