//! Guest tier of the shim (issue 6): a private containerd (Debian's `/usr/bin/containerd`,
//! root/state/sockets in a temp dir, CRI plugin off) finds `containerd-shim-podvisor-v2` on
//! its PATH; a busybox OCI image built here is imported with `ctr image import`; then
//! `ctr run --rm --runtime io.containerd.podvisor.v2 ... echo hello` runs the container in
//! a podvisor VM (the real guest kernel, the agent initramfs as PID 1) and must print
//! `hello` and exit 0. Afterwards nothing may be left: no shim process, no mount under the
//! shim's state dir, the state dir removed.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::containerd::{
    assert_nothing_left, have_tools, import_image, skip, Containerd, RUN_TIMEOUT,
};
use common::{guest_artifacts, temp_path};

/// The `/tasks/...` topics of `ctr events` lines (`time namespace topic json`) that name
/// container `id`, in order.
fn task_topics(events: &str, id: &str) -> Vec<String> {
    events
        .lines()
        .filter(|l| l.contains(&format!("\"{id}\"")))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
        .map(str::to_string)
        .collect()
}

/// No guest needed: with a kernel path that does not exist, Create fails with a message
/// naming the problem, and the shim leaves nothing behind.
#[test]
fn shim_create_fails_cleanly_without_kernel() {
    const TEST: &str = "shim_create_fails_cleanly_without_kernel";
    if !have_tools(TEST) {
        return;
    }
    let dir = temp_path("shim-nokernel");
    let missing = dir.join("no-such-vmlinux");
    let containerd = Containerd::start(&dir, &missing, &missing);
    import_image(&containerd, &dir.join("image"));
    let (code, stdout, stderr) = containerd.run_rm_echo("nokernel", Duration::from_secs(120));
    assert_ne!(code, Some(0), "stdout: {stdout}");
    assert!(
        stderr.contains("PODVISOR_KERNEL") && stderr.contains("no-such-vmlinux"),
        "stderr: {stderr}"
    );
    eprintln!("{TEST}: ctr says: {}", stderr.trim());
    assert_nothing_left(&containerd, "nokernel");
    // ctr run --rm leaves the container record after a failed Create; remove it.
    let _ = containerd.ctr(&["container", "rm", "nokernel"]);
}

#[test]
fn shim_containerd_run_rm_echo() {
    const TEST: &str = "shim_containerd_run_rm_echo";
    let Some(guest) = guest_artifacts(TEST) else {
        return;
    };
    let initrd = guest.initrd.with_file_name("agent-test.cpio");
    if !initrd.is_file() {
        return skip(
            TEST,
            &format!("{} missing (run `make rootfs`)", initrd.display()),
        );
    }
    if !have_tools(TEST) {
        return;
    }
    let dir = temp_path("shim");
    let containerd = Containerd::start(&dir, &guest.kernel, &initrd);

    import_image(&containerd, &dir.join("image"));

    // containerd's event stream while the container runs.
    let events_log = dir.join("events.log");
    let mut events = containerd
        .ctr_cmd(&["events"])
        .stdout(std::fs::File::create(&events_log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr events");
    std::thread::sleep(Duration::from_millis(500));

    let started = Instant::now();
    let (code, stdout, stderr) = containerd.run_rm_echo("test1", RUN_TIMEOUT);
    eprintln!(
        "shim_containerd: ctr run --rm took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        (code, stdout.as_str()),
        (Some(0), "hello\n"),
        "ctr run: stderr:\n{stderr}"
    );

    // The shim's task events, in containerd's order.
    std::thread::sleep(Duration::from_millis(500));
    let _ = events.kill();
    let _ = events.wait();
    let topics = task_topics(&std::fs::read_to_string(&events_log).unwrap(), "test1");
    eprintln!("shim_containerd: task events: {topics:?}");
    let first = |t: &str| {
        topics
            .iter()
            .position(|x| x == t)
            .unwrap_or_else(|| panic!("no {t} event in {topics:?}"))
    };
    assert!(
        first("/tasks/create") < first("/tasks/start")
            && first("/tasks/start") < first("/tasks/exit")
            && first("/tasks/exit") < first("/tasks/delete"),
        "events out of order: {topics:?}"
    );

    // Nothing left: the shim exits after Shutdown, its state dir is gone, nothing mounted.
    assert_nothing_left(&containerd, "test1");
    let ctrs = containerd.ctr(&["container", "ls", "-q"]);
    assert_eq!(String::from_utf8_lossy(&ctrs.stdout).trim(), "");

    // The VM stopped because the guest reset after DestroySandbox (not killed with the
    // shim), and no event was lost on the way to containerd.
    let log = containerd.log();
    let shim_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("pod VM") || l.contains("publishing /tasks"))
        .collect();
    eprintln!("shim_containerd: shim log:\n{}", shim_lines.join("\n"));
    assert!(
        log.contains("pod VM stopped: guest powered off"),
        "the VM did not stop cleanly"
    );
    assert!(!log.contains("publishing /tasks"), "an event failed");
}
