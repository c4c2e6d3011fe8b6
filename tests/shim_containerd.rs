//! Guest tier of the shim (issue 6): a private containerd (Debian's `/usr/bin/containerd`,
//! root/state/sockets in a temp dir, CRI plugin off) finds `containerd-shim-podvisor-v2` on
//! its PATH; a busybox OCI image built here is imported with `ctr image import`; then
//! `ctr run --rm --runtime io.containerd.podvisor.v2 ... echo hello` runs the container in
//! a podvisor VM (the real guest kernel, the agent initramfs as PID 1) and must print
//! `hello` and exit 0. Afterwards nothing may be left: no shim process, no mount under the
//! shim's state dir, the state dir removed.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{build_busybox_rootfs, guest_artifacts, kvm_required, temp_path};
use serde_json::json;

const CONTAINERD: &str = "/usr/bin/containerd";
const CTR: &str = "/usr/bin/ctr";
const BUSYBOX: &str = "/bin/busybox";
const IMAGE: &str = "docker.io/library/busybox:local";
const RUNTIME: &str = "io.containerd.podvisor.v2";
const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-podvisor-v2");
/// `ctr run` of one container, VM boot included (minutes on a nested-KVM host).
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

/// A private containerd; killed, and its temp dir removed, on drop (also on failure).
struct Containerd {
    dir: PathBuf,
    child: Child,
}

impl Containerd {
    fn sock(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }
    fn run_dir(&self) -> PathBuf {
        self.dir.join("podvisor-run")
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn start(dir: &Path, kernel: &Path, initrd: &Path) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
                 [debug]\n  level = \"debug\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let shim_dir = Path::new(SHIM).parent().unwrap();
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new(CONTAINERD)
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("PODVISOR_KERNEL", kernel)
            .env("PODVISOR_INITRD", initrd)
            .env("PODVISOR_RUN_DIR", dir.join("podvisor-run"))
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            dir: dir.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(CTR);
        cmd.arg("-a").arg(self.sock()).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `ctr run --rm --runtime io.containerd.podvisor.v2 busybox <id> echo hello`, bounded
    /// by `timeout`; returns (exit status, stdout, stderr).
    fn run_rm_echo(&self, id: &str, timeout: Duration) -> (Option<i32>, String, String) {
        let cmd = self.ctr_cmd(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            id,
            "echo",
            "hello",
        ]);
        run_bounded(cmd, timeout)
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("run ctr")
    }
}

/// PIDs of processes running the shim binary on behalf of this containerd.
fn shim_pids(sock: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    let sock = sock.to_string_lossy().into_owned();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .first()
            .is_some_and(|a| a.ends_with("containerd-shim-podvisor-v2"))
            && args.iter().any(|a| a == &sock)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Mount points at or below `dir`.
fn mounts_below(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|t| *t == dir || t.starts_with(&format!("{dir}/")))
        .map(str::to_string)
        .collect()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- containerd log (tail) ----");
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("{}", lines[lines.len().saturating_sub(80)..].join("\n"));
            for console in find_files(&self.run_dir(), "console.log") {
                eprintln!(
                    "---- {} ----\n{}",
                    console.display(),
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
            }
        }
        // Shims this containerd started, then containerd itself.
        for pid in shim_pids(&self.sock()) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut left = mounts_below(&self.dir);
        left.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for m in left {
            let c = std::ffi::CString::new(m).unwrap();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(find_files(&p, name));
            } else if p.file_name().is_some_and(|n| n == name) {
                out.push(p);
            }
        }
    }
    out
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Stores `path` as a blob of the OCI layout; returns (digest, size).
fn add_blob(layout: &Path, path: &Path) -> (String, u64) {
    let hex = sha256(path);
    let size = std::fs::metadata(path).unwrap().len();
    std::fs::copy(path, layout.join("blobs/sha256").join(&hex)).unwrap();
    (format!("sha256:{hex}"), size)
}

/// A busybox OCI image archive (one uncompressed layer: static busybox + applet links).
fn build_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    build_busybox_rootfs(&rootfs);

    let layout = dir.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let layer = dir.join("layer.tar");
    let status = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar the layer");
    let (layer_digest, layer_size) = add_blob(&layout, &layer);

    let write_json = |name: &str, value: &serde_json::Value| {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_vec(value).unwrap()).unwrap();
        add_blob(&layout, &p)
    };
    let (config_digest, config_size) = write_json(
        "config.json",
        &json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
        }),
    );
    let (manifest_digest, manifest_size) = write_json(
        "manifest.json",
        &json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest, "size": config_size
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest, "size": layer_size
            }]
        }),
    );
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": IMAGE,
                    "org.opencontainers.image.ref.name": "local"
                }
            }]
        }))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let archive = dir.join("busybox.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .args(["oci-layout", "index.json", "blobs"])
        .status()
        .unwrap();
    assert!(status.success(), "tar the image");
    archive
}

/// Runs `cmd` to completion within `timeout` (killed after); returns (status, stdout, stderr).
fn run_bounded(mut cmd: Command, timeout: Duration) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let collect = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = collect(child.stdout.take().map(|r| Box::new(r) as _));
    let err = collect(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status.code(), out.join().unwrap(), err.join().unwrap())
}

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

fn skip(test: &str, why: &str) {
    if kvm_required() {
        panic!("{test}: {why}");
    }
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
}

/// Whether containerd, ctr and busybox are here (skips `test` loudly when not).
fn have_tools(test: &str) -> bool {
    for (path, why) in [
        (Path::new(CONTAINERD), "apt-get install containerd"),
        (Path::new(CTR), "apt-get install containerd"),
        (Path::new(BUSYBOX), "apt-get install busybox-static"),
    ] {
        if !path.is_file() {
            skip(test, &format!("{} missing ({why})", path.display()));
            return false;
        }
    }
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "containerd needs root");
        return false;
    }
    true
}

/// Imports the busybox image into `containerd`.
fn import_image(containerd: &Containerd, dir: &Path) {
    let archive = build_image(dir);
    let import = containerd.ctr(&["image", "import", archive.to_str().unwrap()]);
    assert!(
        import.status.success(),
        "ctr image import: {}",
        String::from_utf8_lossy(&import.stderr)
    );
    let list = containerd.ctr(&["image", "ls", "-q"]);
    let images = String::from_utf8_lossy(&list.stdout);
    assert!(images.lines().any(|l| l == IMAGE), "images: {images}");
}

/// Waits until no shim of `containerd` runs; then checks that the pod's state dir `id` is
/// gone and nothing is mounted under the run dir.
fn assert_nothing_left(containerd: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !shim_pids(&containerd.sock()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        shim_pids(&containerd.sock()),
        Vec::<u32>::new(),
        "shim left running"
    );
    let state = containerd.run_dir().join(id);
    assert!(!state.exists(), "{} left behind", state.display());
    assert_eq!(mounts_below(&containerd.run_dir()), Vec::<String>::new());
    let tasks = containerd.ctr(&["task", "ls", "-q"]);
    assert_eq!(String::from_utf8_lossy(&tasks.stdout).trim(), "");
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
