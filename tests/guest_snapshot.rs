//! Guest tier for snapshots: one boot of the real guest kernel whose init counts in user
//! space (boot-test, `podvisor_test=counter`), with a virtio-blk disk and vsock attached.
//! `podvisor boot --snapshot` saves it while it counts; then
//! * the library restores it untouched (vCPUs never run) and saves it again: the same
//!   memory, devices and registers (save -> load -> save);
//! * `podvisor boot --restore` runs two clones at once, each in a new process bound to its
//!   own disk copy and vsock socket: in both the count goes on from where the snapshot was
//!   taken;
//! * corrupt and foreign snapshots are refused with the reason.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{guest_artifacts, podvisor, temp_path};
use devices::virtio::DeviceState;
use vmm::snapshot::{self, SnapshotState};
use vmm::{RestoreConfig, Vm};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule podvisor_test=counter";
const COUNT_STEP: u64 = 200_000;

/// The numbers of the guest's `count N` lines, in order.
fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("podvisor-boot-test: count "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

#[test]
fn counter_keeps_counting_after_snapshot_and_restore() {
    let Some(guest) = guest_artifacts("counter_keeps_counting_after_snapshot_and_restore") else {
        return;
    };
    let _vms = common::vm_slots::take(1);
    let dir = temp_path("snapshot");
    std::fs::create_dir_all(&dir).unwrap();
    let snap = dir.join("snap");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let source_console = dir.join("source.log");

    // 1. Boot and save while counting.
    let out = podvisor(
        &[
            "boot",
            "--kernel",
            guest.kernel.to_str().unwrap(),
            "--initrd",
            guest.initrd.to_str().unwrap(),
            "--cmdline",
            CMDLINE,
            "--mem-mib",
            "128",
            "--disk",
            disk.to_str().unwrap(),
            "--vsock",
            dir.join("source.sock").to_str().unwrap(),
            "--console",
            source_console.to_str().unwrap(),
            "--snapshot",
            snap.to_str().unwrap(),
            "--snapshot-after",
            "6",
            "--timeout",
            "900",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let source = read(&source_console);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr:\n{stderr}\nconsole:\n{source}"
    );
    assert!(stderr.contains("snapshot saved to"), "{stderr}");
    assert!(source.contains("podvisor-boot-test: counting"), "{source}");
    let before = counts(&source);
    let last_before = before.last().copied().unwrap_or(0);
    // Sparse memory: far less on disk than the guest's 128 MiB.
    let memory = std::fs::metadata(snap.join(snapshot::MEMORY_FILE)).unwrap();
    assert_eq!(memory.len(), 128 << 20);
    assert!(
        memory.blocks() * 512 < 64 << 20,
        "{} bytes allocated",
        memory.blocks() * 512
    );

    // 2. Restore in this process without running the guest, save again: unchanged.
    let saved = SnapshotState::read(&snap).unwrap();
    let again_dir = dir.join("again");
    // Every host binding is the restore's own (a snapshot's paths are never reopened).
    let unbound = Vm::restore(&RestoreConfig::new(&snap), Instant::now())
        .err()
        .expect("a restore without its disk and vsock bindings must fail");
    assert!(unbound.to_string().contains("binds none"), "{unbound}");
    let mut restore = RestoreConfig {
        shape: Some(saved.shape.clone()),
        ..RestoreConfig::new(&snap)
    };
    restore.bindings.disks = vec![disk.clone()];
    restore.bindings.vsock = Some(dir.join("again.sock"));
    let restored = Vm::restore(&restore, Instant::now())
        .expect("restore")
        .start_paused()
        .expect("start paused");
    restored.snapshot(&again_dir).expect("save the restored VM");
    restored.stop("saved again");
    let again = SnapshotState::read(&again_dir).unwrap();
    // The one change: the restored vsock device told the guest about the transport reset
    // (an event in the event queue's next buffer: one used-ring entry, one event).
    let mut expected = saved.devices.clone();
    let vsock = expected.virtio.last_mut().unwrap();
    let DeviceState::Vsock(v) = &mut vsock.device else {
        panic!("the last device is not the vsock: {vsock:?}")
    };
    let evq = &mut v.queues.as_mut().expect("vsock active")[2];
    evq.next_avail += 1;
    evq.next_used += 1;
    assert_eq!(
        again.devices.serial, expected.serial,
        "serial state changed"
    );
    for (a, e) in again.devices.virtio.iter().zip(&expected.virtio) {
        assert_eq!(a.transport, e.transport, "transport registers changed");
        match (&a.device, &e.device) {
            (DeviceState::Vsock(a), DeviceState::Vsock(e)) => {
                assert_eq!((a.guest_cid, &a.queues), (e.guest_cid, &e.queues))
            }
            (a, e) => assert_eq!(a, e, "device state changed"),
        }
    }
    let pages = differing_pages(
        &snap.join(snapshot::MEMORY_FILE),
        &again_dir.join(snapshot::MEMORY_FILE),
    );
    // Guest memory is the snapshot's, but for what was written on restore: the kvm-clock
    // pages KVM updates (pvclock: hv_clock_boot, hvclock_mem) and the vsock event (the
    // event queue's used ring, the event buffer).
    assert!(pages.len() <= 4, "guest pages changed: {pages:#x?}");
    assert_eq!(again.host, saved.host);
    assert_eq!(again.vcpus.len(), saved.vcpus.len());
    for (a, s) in again.vcpus.iter().zip(&saved.vcpus) {
        assert_eq!(json(&a.regs), json(&s.regs), "registers changed");
        assert_eq!(json(&a.sregs), json(&s.sregs), "special registers changed");
        assert_eq!(json(&a.xsave), json(&s.xsave), "FPU state changed");
        assert_eq!(json(&a.mp_state), json(&s.mp_state));
        // Every MSR but the time stamp counter, which runs on.
        let msrs = |v: &vmm::VcpuState| {
            v.msrs
                .iter()
                .filter(|m| m.index != 0x10)
                .map(|m| (m.index, m.data))
                .collect::<Vec<_>>()
        };
        assert_eq!(msrs(a), msrs(s), "MSRs changed");
    }

    // 3. Two clones at once, each in a new process with its own disk copy and vsock socket.
    let clones: Vec<_> = (0..2)
        .map(|i| {
            let disk_copy = dir.join(format!("clone{i}.img"));
            std::fs::copy(&disk, &disk_copy).unwrap();
            let console = dir.join(format!("clone{i}.log"));
            let timings = dir.join(format!("clone{i}.json"));
            let child = Command::new(env!("CARGO_BIN_EXE_podvisor"))
                .args(["boot", "--restore"])
                .arg(&snap)
                .args(if i == 0 {
                    &["--verify-memory"][..]
                } else {
                    &[]
                })
                .arg("--disk")
                .arg(&disk_copy)
                .arg("--vsock")
                .arg(dir.join(format!("clone{i}.sock")))
                .arg("--console")
                .arg(&console)
                .args(["--timeout", "15", "--timings-json"])
                .arg(&timings)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (child, console, timings)
        })
        .collect();
    for (i, (child, console, timings)) in clones.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let clone = read(&console);
        assert_eq!(
            out.status.code(),
            Some(3),
            "clone {i} runs until the timeout; stderr:\n{stderr}\nconsole:\n{clone}"
        );
        assert!(stderr.contains("timed out"), "{stderr}");
        let after = counts(&clone);
        assert!(
            after.len() >= 2,
            "clone {i} counted on: before {before:?}, its console:\n{clone}"
        );
        assert!(
            after[0] > last_before,
            "the count goes on from the snapshot: before {before:?}, clone {i} {after:?}"
        );
        assert_eq!(after[0] % COUNT_STEP, 0, "clone {i}: {after:?}");
        for w in after.windows(2) {
            assert_eq!(w[1], w[0] + COUNT_STEP, "clone {i}: {after:?}");
        }
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&timings).unwrap()).unwrap();
        let restore_ms = record["host_setup_ms"].as_f64().unwrap();
        eprintln!("clone {i}: process start -> first KVM_RUN {restore_ms:.1} ms (dev build)");
        assert!(restore_ms > 0.0, "{record}");
        let private = record["guest_private_kib_at_stop"].as_u64().unwrap();
        eprintln!("clone {i}: guest RAM private to the clone at stop: {private} KiB");
    }

    // 4. Corrupt and foreign snapshots are refused with the reason.
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::os::unix::fs::symlink(snap.join(snapshot::MEMORY_FILE), bad.join("memory")).unwrap();
    let state_bytes = std::fs::read(snap.join(snapshot::STATE_FILE)).unwrap();
    let restore_bad = || {
        let out = podvisor(
            &[
                "boot",
                "--restore",
                bad.to_str().unwrap(),
                "--disk",
                disk.to_str().unwrap(),
                "--vsock",
                dir.join("bad.sock").to_str().unwrap(),
                "--timeout",
                "5",
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let mut flipped = state_bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x20;
    std::fs::write(bad.join("state"), &flipped).unwrap();
    let err = restore_bad();
    assert!(err.contains("checksum"), "{err}");

    let payload = snapshot::decode(Path::new("state"), &state_bytes).unwrap();
    let mut value: serde_json::Value = serde_json::from_slice(payload).unwrap();
    value["host"]["cpu"] = "AuthenticAMD family 25 model 1 stepping 1".into();
    let foreign = snapshot::encode(&serde_json::to_vec(&value).unwrap());
    std::fs::write(bad.join("state"), foreign).unwrap();
    let err = restore_bad();
    assert!(
        err.contains("another host CPU") && err.contains("AuthenticAMD"),
        "{err}"
    );

    std::fs::remove_dir_all(&dir).unwrap();
}

/// The offsets of the 4 KiB pages that differ between two files of the same size.
fn differing_pages(a: &Path, b: &Path) -> Vec<usize> {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len());
    a.chunks(4096)
        .zip(b.chunks(4096))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i * 4096)
        .collect()
}

/// KVM structures have no `PartialEq`: compare their serialized bytes.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}
