//! `podvisor boot` with bad input: one clear line on stderr, exit status 2, no panic.

mod common;

use common::{podvisor, temp_path};

fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("podvisor: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "exactly one error line: {stderr}");
    assert!(lines[0].contains(needle), "{needle:?} not in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_kernel() {
    let out = podvisor(&["boot", "--kernel", "/nonexistent/vmlinux"], &[]);
    assert_one_line_error(&out, "kernel image /nonexistent/vmlinux not found");
}

#[test]
fn too_little_memory() {
    let exe = env!("CARGO_BIN_EXE_podvisor");
    let out = podvisor(&["boot", "--kernel", exe, "--mem-mib", "8"], &[]);
    assert_one_line_error(&out, "guest memory must be");
}

#[test]
fn no_kvm_device() {
    let exe = env!("CARGO_BIN_EXE_podvisor");
    let out = podvisor(
        &["boot", "--kernel", exe],
        &[("PODVISOR_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_one_line_error(&out, "cannot open /nonexistent/kvm");
}

#[test]
fn corrupt_kernel() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("*** SKIPPED corrupt_kernel: /dev/kvm is missing (the kernel is read after KVM is opened) ***");
        return;
    }
    let path = temp_path("corrupt-kernel");
    std::fs::write(&path, vec![0x5au8; 1 << 20]).unwrap();
    let out = podvisor(&["boot", "--kernel", path.to_str().unwrap()], &[]);
    std::fs::remove_file(&path).unwrap();
    assert_one_line_error(&out, "is not a bootable x86_64 kernel");
}

#[test]
fn truncated_elf_kernel() {
    let Some(guest) = common::guest_artifacts("truncated_elf_kernel") else {
        return;
    };
    // The first 64 KiB of a real vmlinux: a valid ELF header whose segments are cut off.
    let bytes = std::fs::read(&guest.kernel).unwrap();
    let path = temp_path("truncated-kernel");
    std::fs::write(&path, &bytes[..64 << 10]).unwrap();
    let out = podvisor(&["boot", "--kernel", path.to_str().unwrap()], &[]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot load the kernel") || stderr.contains("not a bootable"),
        "{stderr}"
    );
}
