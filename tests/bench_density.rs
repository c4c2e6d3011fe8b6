//! `podvisor bench density` end to end against runc (fast: no guest), through Debian's
//! containerd: the JSON report holds the pods with real figures, and teardown leaves no
//! containers, tasks, shims, containerd or temp dirs behind — after a normal run, after
//! Ctrl-C, and with an existing containerd (`--address`). The podvisor side is exercised
//! by `make bench-density` (a benchmark, not a test: each pod boots a guest for minutes
//! on nested-KVM hosts).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::containerd::{have_tools, Containerd};
use common::temp_path;

const PODVISOR: &str = env!("CARGO_BIN_EXE_podvisor");

fn density(args: &[&str]) -> Command {
    let mut cmd = Command::new(PODVISOR);
    cmd.args(["bench", "density"])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

fn have_runc(test: &str) -> bool {
    if !have_tools(test) {
        return false;
    }
    if !Path::new("/usr/sbin/runc").is_file() && !Path::new("/usr/bin/runc").is_file() {
        common::containerd::skip(test, "runc missing (apt-get install runc)");
        return false;
    }
    true
}

/// PIDs whose command line mentions `needle` (containerd, shims, ctr clients of a run).
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            out.push((pid, cmdline));
        }
    }
    out
}

fn runc_shims(sock: &Path) -> Vec<(u32, String)> {
    processes_mentioning(&sock.to_string_lossy())
        .into_iter()
        .filter(|(_, c)| c.contains("containerd-shim-runc-v2"))
        .collect()
}

fn assert_work_dir_gone(work: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_mentioning(&work.to_string_lossy()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        processes_mentioning(&work.to_string_lossy()),
        vec![],
        "processes of the run left behind"
    );
    assert!(!work.exists(), "{} left behind", work.display());
}

fn output_text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn read_report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("density.json")).unwrap()).unwrap()
}

#[test]
fn density_runc_end_to_end_leaves_nothing() {
    const TEST: &str = "density_runc_end_to_end_leaves_nothing";
    if !have_runc(TEST) {
        return;
    }
    let base = temp_path("density-e2e");
    let work = base.join("work");
    let out_dir = base.join("out");
    std::fs::create_dir_all(&base).unwrap();
    let args = [
        "--pods",
        "2",
        "--parallel",
        "2",
        "--runtime",
        "runc",
        "--settle",
        "1",
        "--out",
        out_dir.to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
    ];
    let out = density(&args).output().unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("| runc | 2/2 |"),
        "summary row printed: {text}"
    );
    let report = read_report(&out_dir);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["runtime"], "runc");
    let pods = runs[0]["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 2, "{report:#}");
    for p in pods {
        assert!(p["error"].is_null(), "{p:#}");
        let first = p["to_first_output_ms"].as_f64().unwrap();
        let running = p["to_running_ms"].as_f64().unwrap();
        // (containerd publishes /tasks/start after Start returned: it may come after the
        // first output line.)
        assert!(first > 0.0 && running > 0.0, "{p:#}");
        // The runc shim and the container's `sleep`, each with real PSS.
        assert!(p["processes"].as_u64().unwrap() >= 2, "{p:#}");
        assert!(p["overhead_pss_kib"].as_u64().unwrap() > 0, "{p:#}");
        assert!(p["workload_pss_kib"].as_u64().unwrap() > 0, "{p:#}");
    }
    assert_eq!(runs[0]["summary"]["ok"], 2);
    assert!(
        runs[0]["teardown_problems"].as_array().unwrap().is_empty(),
        "teardown: {:#}",
        runs[0]["teardown_problems"]
    );
    let md = std::fs::read_to_string(out_dir.join("density.md")).unwrap();
    assert!(md.contains("density.png"), "{md}");
    let png = std::fs::read(out_dir.join("density.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    eprintln!("{md}");

    assert_work_dir_gone(&work);
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn density_ctrl_c_tears_everything_down() {
    const TEST: &str = "density_ctrl_c_tears_everything_down";
    if !have_runc(TEST) {
        return;
    }
    let base = temp_path("density-int");
    let work = base.join("work");
    let out_dir = base.join("out");
    std::fs::create_dir_all(&base).unwrap();
    let mut child = density(&[
        "--pods",
        "2",
        "--parallel",
        "1",
        "--runtime",
        "runc",
        "--settle",
        "300",
        "--out",
        out_dir.to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Interrupt once both pods run (the harness then settles for 300 s).
    let sock = work.join("containerd.sock");
    let deadline = Instant::now() + Duration::from_secs(120);
    while runc_shims(&sock).len() < 2 {
        assert!(Instant::now() < deadline, "pods did not start");
        assert!(child.try_wait().unwrap().is_none(), "harness ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    podvisor_test_kit::processes::kill(child.id(), libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(130), "{text}");
    assert!(text.contains("interrupted"), "{text}");
    assert_eq!(runc_shims(&sock), vec![], "shims left: {text}");
    assert!(!out_dir.exists(), "no report for an interrupted run");
    assert_work_dir_gone(&work);
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn density_with_existing_containerd_removes_its_containers() {
    const TEST: &str = "density_with_existing_containerd_removes_its_containers";
    if !have_runc(TEST) {
        return;
    }
    let dir = temp_path("density-addr");
    let none = PathBuf::from("/nonexistent");
    let containerd = Containerd::start(&dir, &none, &none);
    let out_dir = dir.join("out");
    let sock = containerd.sock();
    let out = density(&[
        "--pods",
        "2",
        "--runtime",
        "runc",
        "--settle",
        "0",
        "--address",
        sock.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        read_report(&out_dir)["runs"][0]["pods"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let ls = |what: &str| {
        let o = containerd.ctr(&[what, "ls", "-q"]);
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(ls("task"), "", "tasks left");
    assert_eq!(ls("container"), "", "containers left");
    assert_eq!(ls("image"), "", "the imported image is removed again");
    assert_eq!(runc_shims(&sock), vec![]);
}

#[test]
fn density_bad_input_creates_nothing() {
    let base = temp_path("density-bad");
    let work = base.join("work");
    let out_dir = base.join("out");
    for args in [
        vec!["--pods", "0", "--runtime", "runc"],
        vec!["--pods", "2", "--parallel", "5", "--runtime", "runc"],
        vec![
            "--pods",
            "1",
            "--runtime",
            "podvisor",
            "--kernel",
            "/nonexistent/vmlinux",
            "--initrd",
            "/nonexistent/initrd",
        ],
    ] {
        let mut args = args.clone();
        args.extend([
            "--out",
            out_dir.to_str().unwrap(),
            "--work-dir",
            work.to_str().unwrap(),
        ]);
        let out = density(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("invalid arguments"), "{args:?}: {stderr}");
        assert!(!base.exists(), "{args:?} created {}", base.display());
    }
}
