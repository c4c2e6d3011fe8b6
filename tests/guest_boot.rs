//! Guest tier: the real guest kernel and the boot-test initramfs on real KVM.
//!
//! Guest kernel code is slow on a nested host (see NOTES), so each boot checks as much as it
//! can, and the boots run in parallel: one through the CLI (1 vCPU, console, timings), one
//! through the library (2 vCPUs, pause/resume), one that panics (exit status and reason).

mod common;

use std::time::{Duration, Instant};

use common::{guest_artifacts, podvisor, temp_path};
use vmm::{ConsoleConfig, ExitReason, GuestShape, HostBindings, Vm, VmConfig};

const BOOT_TIMEOUT: &str = "900";

#[test]
fn cli_boots_one_vcpu_to_init_and_powers_off() {
    let Some(guest) = guest_artifacts("cli_boots_one_vcpu_to_init_and_powers_off") else {
        return;
    };
    let _vms = common::vm_slots::take(1);
    let json = temp_path("timings.json");
    let out = podvisor(
        &[
            "boot",
            "--kernel",
            guest.kernel.to_str().unwrap(),
            "--initrd",
            guest.initrd.to_str().unwrap(),
            "--mem-mib",
            "128",
            "--timings",
            "--timings-json",
            json.to_str().unwrap(),
            "--profile-hz",
            "200",
            "--timeout",
            BOOT_TIMEOUT,
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "console:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("podvisor-boot-test: init started"),
        "{stdout}"
    );
    assert!(stdout.contains("podvisor-boot-test: cpus=1"), "{stdout}");
    assert!(stderr.contains("guest powered off"), "{stderr}");
    // Timings were measured, not defaulted.
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    assert!(record["host_setup_ms"].as_f64().unwrap() > 0.0, "{record}");
    assert!(
        record["guest_to_init_ms"].as_f64().unwrap() > 0.0,
        "{record}"
    );
    let guest_kib = record["guest_rss_kib"].as_u64().unwrap();
    assert!(guest_kib > 1024 && guest_kib <= 128 * 1024, "{record}");
    assert!(record["vmm_rss_kib"].as_u64().unwrap() > 0, "{record}");
    assert!(stderr.contains("guest time to init"), "{stderr}");
    // The guest profile: samples before init, named from the kernel's System.map (the
    // kernel build leaves it next to vmlinux), and after init.
    let samples = |what: &str| -> u64 {
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&format!("guest profile, {what}: ")))
            .unwrap_or_else(|| panic!("no {what} profile in:\n{stderr}"));
        line.split(": ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(samples("start to init") > 10, "{stderr}");
    samples("after init");
    assert!(!stderr.contains("functions stay unnamed"), "{stderr}");
    assert!(
        stderr.contains("%  start_kernel")
            || stderr.contains("%  memmap_init_range")
            || stderr.contains("%  __init_single_page")
            || stderr.contains("%  clear_bss")
            || stderr.contains("%  __orc_find"),
        "boot-time kernel functions named: {stderr}"
    );
}

#[test]
fn library_boots_two_vcpus_and_pauses() {
    let Some(guest) = guest_artifacts("library_boots_two_vcpus_and_pauses") else {
        return;
    };
    let _vms = common::vm_slots::take(2);
    let console = temp_path("console-2vcpu.log");
    let config = VmConfig {
        shape: GuestShape {
            kernel: guest.kernel,
            initrd: Some(guest.initrd),
            vcpus: 2,
            mem_mib: 256,
            ..Default::default()
        },
        bindings: HostBindings {
            console: ConsoleConfig::File(console.clone()),
            ..Default::default()
        },
    };
    let vm = Vm::new(config, Instant::now()).expect("create VM");
    let running = vm.start().expect("start VM");

    // Let the kernel get going, then pause: the console must not grow while paused.
    std::thread::sleep(Duration::from_secs(3));
    running.pause().expect("pause");
    assert!(running.is_paused());
    let size = || std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
    let before = size();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(size(), before, "guest ran while paused");
    running.resume().expect("resume");
    assert!(!running.is_paused());

    let report = running.wait(Some(Duration::from_secs(900)));
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    std::fs::remove_file(&console).ok();
    assert_eq!(report.reason, ExitReason::GuestReset, "console:\n{text}");
    assert!(
        text.contains("podvisor-boot-test: cpus=2"),
        "both vCPUs online:\n{text}"
    );
    assert!(report.timings.guest_to_init.is_some());
    assert!(
        report.console_tail.contains("podvisor-boot-test"),
        "{}",
        report.console_tail
    );
}

#[test]
fn guest_kernel_panic_is_a_failure_with_the_reason() {
    let Some(guest) = guest_artifacts("guest_kernel_panic_is_a_failure_with_the_reason") else {
        return;
    };
    let _vms = common::vm_slots::take(1);
    // No init in the initramfs under that name, no root device: the kernel panics.
    let cmdline = "console=ttyS0 reboot=k panic=-1 pci=off nomodule rdinit=/nonexistent-init";
    let out = podvisor(
        &[
            "boot",
            "--kernel",
            guest.kernel.to_str().unwrap(),
            "--initrd",
            guest.initrd.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--console",
            "none",
            "--timeout",
            BOOT_TIMEOUT,
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("guest kernel panic:"), "{stderr}");
    assert!(stderr.contains("last console lines"), "{stderr}");
}

#[test]
fn stop_handle_ends_a_running_guest() {
    let Some(guest) = guest_artifacts("stop_handle_ends_a_running_guest") else {
        return;
    };
    let _vms = common::vm_slots::take(1);
    let config = VmConfig {
        shape: GuestShape {
            kernel: guest.kernel,
            initrd: Some(guest.initrd),
            ..Default::default()
        },
        bindings: HostBindings {
            console: ConsoleConfig::Discard,
            ..Default::default()
        },
    };
    let running = Vm::new(config, Instant::now())
        .expect("create VM")
        .start()
        .expect("start VM");
    let stop = running.stop_handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        stop.stop("test is done");
    });
    let report = running.wait(Some(Duration::from_secs(300)));
    stopper.join().unwrap();
    assert_eq!(report.reason, ExitReason::Stopped("test is done".into()));
    assert_eq!(report.reason.exit_code(), 3);
    assert!(
        report.timings.guest_to_init.is_none(),
        "stopped long before init"
    );
}
