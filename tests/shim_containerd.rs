//! Guest tier of the shim with real containerd and `ctr`: a private containerd
//! (Debian's `/usr/bin/containerd`, root/state/sockets in a temp dir, CRI plugin off) finds
//! `containerd-shim-podvisor-v2` on its PATH; a busybox OCI image built here is imported
//! with `ctr image import`.
//!
//! A guest boot takes most of a minute on a nested-KVM host, so the scenarios share pods
//! (two of them, so that they run side by side on 2 cores):
//! - `shim_containerd_pod`: one pod (`io.podvisor.sandbox-id`), one shim, one VM: a
//!   long-running container with a file:// log, run --rm echo, tty, exec (plain, tty, exit
//!   code, user), ps, pause/resume, metrics, the shim's memory, the event order; then the
//!   shim is SIGKILLed under a running container and `ctr task rm` must clean up; nothing
//!   may be left.
//! - `shim_containerd_pod_io`: exit codes, env/cwd/stderr, stdin to EOF, an OOM kill with
//!   its event, SIGKILL (exit 137) and a TERM the container traps; nothing may be left.
//! - `shim_containerd_churn`: exec/delete, container and pod cycles in one pod leave the
//!   shim's threads and fds, the host's mounts and the run dir where they were.
//! - `shim_containerd_guest_death`: a privileged container crashes the guest kernel
//!   (sysrq): every task of the pod exits non-zero with its TaskExit event, nothing left.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::containerd::{
    assert_nothing_left, have_tools, import_image, list_tree, mounts_below, run_bounded, shim_pids,
    Containerd, ContainerdOptions, IMAGE, RUNTIME, RUN_TIMEOUT,
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

/// One `ctr` call's result.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl From<std::process::Output> for Out {
    fn from(out: std::process::Output) -> Out {
        Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A bound for quick `ctr` calls on a running pod.
const CTR_TIMEOUT: Duration = Duration::from_secs(120);
const POD: &str = "io.podvisor.sandbox-id";

fn ctr(c: &Containerd, args: &[&str]) -> Out {
    let (code, stdout, stderr) = run_bounded(c.ctr_cmd(args), RUN_TIMEOUT);
    Out {
        code,
        stdout,
        stderr,
    }
}

/// `ctr` with `input` on its stdin (closed afterwards).
fn ctr_stdin(c: &Containerd, args: &[&str], input: &str) -> Out {
    let mut cmd = c.ctr_cmd(args);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    Out::from(child.wait_with_output().unwrap())
}

/// `ctr` on a terminal (`script` gives it a pty; its stdin stays open meanwhile).
fn ctr_tty(c: &Containerd, args: &[&str]) -> Out {
    let line = std::iter::once(common::containerd::CTR.to_string())
        .chain(["-a".into(), c.sock().display().to_string()])
        .chain(args.iter().map(|a| format!("'{a}'")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take();
    let out = Out::from(child.wait_with_output().unwrap());
    drop(stdin);
    out
}

/// The STATUS column of `ctr task ls` for `id`.
fn task_status(c: &Containerd, id: &str) -> Option<String> {
    let out = ctr(c, &["task", "ls"]);
    out.stdout.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        (w.first() == Some(&id)).then(|| w.last().unwrap().to_string())
    })
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `ctr events` recorded to a file until dropped.
struct Events {
    child: std::process::Child,
    log: PathBuf,
}

impl Events {
    fn start(c: &Containerd, log: &Path) -> Events {
        let child = c
            .ctr_cmd(&["events"])
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events");
        std::thread::sleep(Duration::from_millis(500));
        Events {
            child,
            log: log.to_path_buf(),
        }
    }
    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts `topics` holds each of `order` in that order (first occurrences).
fn assert_order(topics: &[String], order: &[&str]) {
    let pos: Vec<usize> = order
        .iter()
        .map(|t| {
            topics
                .iter()
                .position(|x| x == t)
                .unwrap_or_else(|| panic!("no {t} event in {topics:?}"))
        })
        .collect();
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]),
        "events out of order: want {order:?}, got {topics:?}"
    );
}

/// PSS (KiB) of process `pid` outside its guest RAM, and the guest RAM's RSS. Guest RAM is
/// `MADV_DONTDUMP` (`dd` in the mapping's VmFlags; the VMM's own memory is not).
fn shim_memory(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    // (is guest RAM, rss KiB, pss KiB) per mapping.
    let mut maps: Vec<(bool, u64, u64)> = Vec::new();
    for l in smaps.lines() {
        let mut w = l.split_whitespace();
        let first = w.next().unwrap_or("");
        let kib = || {
            w.clone()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match first {
            "Rss:" => maps.last_mut().unwrap().1 = kib(),
            "Pss:" => maps.last_mut().unwrap().2 = kib(),
            "VmFlags:" => maps.last_mut().unwrap().0 = l.split_whitespace().any(|f| f == "dd"),
            _ if first.contains('-')
                && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') =>
            {
                maps.push((false, 0, 0))
            }
            _ => {}
        }
    }
    let guest_rss: u64 = maps.iter().filter(|m| m.0).map(|m| m.1).sum();
    let other_pss: u64 = maps.iter().filter(|m| !m.0).map(|m| m.2).sum();
    (other_pss, guest_rss)
}

fn pod_tools(test: &str) -> Option<(common::GuestArtifacts, PathBuf)> {
    let guest = guest_artifacts(test)?;
    let initrd = guest.initrd.with_file_name("agent-test.cpio");
    if !common::require_file(test, &initrd, "run `make rootfs`") || !have_tools(test) {
        return None;
    }
    Some((guest, initrd))
}

/// The shim socket containerd-shim derives for pod `grouping` in namespace `default`.
fn shim_socket(c: &Containerd, grouping: &str) -> PathBuf {
    let key = format!("{}/default/{grouping}", c.sock().display());
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(key.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let hex = String::from_utf8_lossy(&out.stdout);
    PathBuf::from("/run/containerd/s").join(hex.split_whitespace().next().unwrap())
}

/// `ctr run` flags putting a container into pod `pod`.
fn in_pod(pod: &str) -> String {
    format!("{POD}={pod}")
}

/// One pod of a test: its own containerd (image imported, events recorded) and the
/// `ctr run` flags that put a container into the pod; holds the test's VM slot.
struct PodTest {
    dir: PathBuf,
    events: Events,
    containerd: Containerd,
    pod: String,
    _vms: common::vm_slots::VmSlots,
}

impl PodTest {
    fn start(guest: common::GuestArtifacts, initrd: PathBuf, dir: &str, pod: &str) -> PodTest {
        // One pod VM (see `common::vm_slots`).
        let vms = common::vm_slots::take(1);
        let dir = temp_path(dir);
        let containerd = Containerd::start(&dir, &guest.kernel, &initrd);
        import_image(&containerd, &dir.join("image"));
        let events = Events::start(&containerd, &dir.join("events.log"));
        PodTest {
            dir,
            events,
            containerd,
            pod: in_pod(pod),
            _vms: vms,
        }
    }

    /// `ctr run` in the pod: `extra` flags, container `id`, command `cmd`.
    fn run(&self, extra: &[&str], id: &str, cmd: &[&str]) -> Out {
        let mut args = vec!["run", "--runtime", RUNTIME, "--annotation", &self.pod];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        ctr(&self.containerd, &args)
    }
}

#[test]
fn shim_containerd_pod() {
    const TEST: &str = "shim_containerd_pod";
    let Some((guest, initrd)) = pod_tools(TEST) else {
        return;
    };
    let p = PodTest::start(guest, initrd, "shim-pod", "pod1");
    let (dir, c, events, pod) = (&p.dir, &p.containerd, &p.events, &p.pod);
    let run = |extra: &[&str], id: &str, cmd: &[&str]| p.run(extra, id, cmd);

    // The pod's first container boots the VM: a long-running one, logging to a file.
    let log1 = dir.join("logs/c1.log");
    let uri = format!("file://{}", log1.display());
    let started = Instant::now();
    let out = run(
        &["-d", "--log-uri", &uri],
        "c1",
        &["sh", "-c", "echo c1-up; exec sleep 100000"],
    );
    assert_eq!(out.code, Some(0), "ctr run -d c1: {out:?}");
    wait_until("c1's first log line", RUN_TIMEOUT, || {
        std::fs::read_to_string(&log1).is_ok_and(|l| l.contains("c1-up"))
    });
    let cold = started.elapsed();
    let shims = shim_pids(&c.sock());
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
    let shim = shims[0];

    // More containers of the pod join the running VM: run --rm echo (timed), a terminal.
    let mut warm = Vec::new();
    for i in 0..1 {
        let t = Instant::now();
        let out = run(&["--rm"], &format!("echo{i}"), &["echo", "hello"]);
        warm.push(t.elapsed());
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (Some(0), "hello\n"),
            "{out:?}"
        );
    }
    assert_eq!(
        shim_pids(&c.sock()),
        vec![shim],
        "still one shim (and VM) for the pod"
    );

    // A hostile guest: a privileged container (guest root) mounts the pod's virtio-fs
    // share and tries to plant symlinks where the host mounts the next container's rootfs
    // and volumes, and to move a running container's mount directories. Every change to
    // the share's skeleton must fail (read-only on the host), and the next container's
    // host mounts must land in the pod, nowhere else.
    let outside = dir.join("outside");
    let volume = dir.join("volume");
    for d in [&outside, &volume] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("sentinel"), "keep me").unwrap();
    }
    let attack = format!(
        "mkdir -p /tmp/share && mount -t virtiofs podvisor /tmp/share || exit 9; \
         try() {{ if \"$@\" 2>/tmp/err; then echo \"CHANGED: $*\"; else echo \"refused: $(cat /tmp/err)\"; fi; }}; \
         try ln -s {out} /tmp/share/c9; try mkdir /tmp/share/c9; \
         try mv /tmp/share/c1/mounts /tmp/share/c1/moved; \
         try ln -s {out} /tmp/share/c1/planted; try rmdir /tmp/share/c1/mounts; \
         try touch /tmp/share/c1/file; echo attack-done",
        out = outside.display()
    );
    let out = run(&["--rm", "--privileged"], "attack", &["sh", "-c", &attack]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("attack-done"), "{out:?}");
    assert!(
        !out.stdout.contains("CHANGED"),
        "the guest changed the share: {out:?}"
    );
    assert_eq!(
        out.stdout.matches("Read-only file system").count(),
        6,
        "every change refused by the host's read-only view: {out:?}"
    );
    let mount = format!(
        "type=bind,src={},dst=/vol,options=rbind:ro",
        volume.display()
    );
    let out = run(
        &["--rm", "--mount", &mount],
        "c9",
        &[
            "sh",
            "-c",
            "cat /vol/sentinel; touch /vol/x 2>/dev/null || echo ro-ok",
        ],
    );
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "keep mero-ok\n"),
        "{out:?}"
    );
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&outside),
        ["sentinel"],
        "something landed outside the pod"
    );
    assert_eq!(
        names(&volume),
        ["sentinel"],
        "the read-only volume was written"
    );
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&outside.display().to_string()),
        "a mount landed outside the pod"
    );

    // A read-only rootfs is read-only on the host too (the guest cannot write it through
    // the share either), and the container still starts: the mount points its spec needs
    // are made before the rootfs turns read-only.
    let out = run(
        &["--rm", "--read-only"],
        "ro1",
        &[
            "sh",
            "-c",
            "touch /new-file 2>/dev/null || echo ro-root; echo up",
        ],
    );
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "ro-root\nup\n"),
        "{out:?}"
    );

    // A terminal.
    let out = ctr_tty(
        c,
        &[
            "run",
            "--rm",
            "-t",
            "--runtime",
            RUNTIME,
            "--annotation",
            pod,
            IMAGE,
            "tty1",
            "sh",
            "-c",
            "tty; stty size; echo tty-ok",
        ],
    );
    assert!(
        out.stdout.contains("/dev/pts/") && out.stdout.contains("tty-ok"),
        "tty: {out:?}"
    );

    // exec into c1: output, exit code, a terminal, a user.
    let out = ctr(
        c,
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "c1",
            "sh",
            "-c",
            "echo exec-out; exit 3",
        ],
    );
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(3), "exec-out\n"),
        "{out:?}"
    );
    let out = ctr_tty(
        c,
        &[
            "task",
            "exec",
            "-t",
            "--exec-id",
            "e2",
            "c1",
            "sh",
            "-c",
            "tty; echo exec-tty",
        ],
    );
    assert!(
        out.stdout.contains("/dev/pts/") && out.stdout.contains("exec-tty"),
        "{out:?}"
    );
    let out = ctr(
        c,
        &[
            "task",
            "exec",
            "--exec-id",
            "e3",
            "--user",
            "1000",
            "c1",
            "id",
            "-u",
        ],
    );
    assert_eq!(out.stdout.trim(), "1000", "exec --user: {out:?}");

    // ps, metrics, pause/resume.
    let out = ctr(c, &["task", "ps", "c1"]);
    let pids: Vec<&str> = out.stdout.lines().skip(1).collect();
    assert!(!pids.is_empty(), "ctr task ps: {out:?}");
    let out = ctr(c, &["task", "metrics", "c1"]);
    assert!(
        out.code == Some(0) && out.stdout.contains("memory.usage"),
        "metrics: {out:?}"
    );
    assert_eq!(ctr(c, &["task", "pause", "c1"]).code, Some(0));
    assert_eq!(task_status(c, "c1").as_deref(), Some("PAUSED"));
    assert_eq!(ctr(c, &["task", "resume", "c1"]).code, Some(0));
    assert_eq!(task_status(c, "c1").as_deref(), Some("RUNNING"));

    // The shim's memory while the pod idles.
    assert_eq!(
        shim_pids(&c.sock()),
        vec![shim],
        "still one shim (and VM) for the pod"
    );
    let (pss, guest_rss) = shim_memory(shim);

    // Events so far, in containerd's order.
    std::thread::sleep(Duration::from_millis(500));
    let text = events.text();
    assert_order(
        &task_topics(&text, "echo0"),
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );
    let c1_topics = task_topics(&text, "c1");
    assert_order(
        &c1_topics,
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/paused",
            "/tasks/resumed",
        ],
    );

    // The shim dies under a running container (SIGKILL): containerd reports the task gone,
    // `ctr task rm` runs `shim delete`, which unmounts and removes the pod's state.
    podvisor_test_kit::processes::kill(shim, libc::SIGKILL);
    wait_until("c1 to be reported stopped", CTR_TIMEOUT, || {
        task_status(c, "c1").as_deref() != Some("RUNNING")
    });
    let _ = ctr(c, &["task", "rm", "-f", "c1"]);
    assert_eq!(ctr(c, &["container", "rm", "c1"]).code, Some(0));
    assert_nothing_left(c, "pod1");
    assert_eq!(mounts_below(&c.dir), Vec::<String>::new());
    let socket = shim_socket(c, "pod1");
    assert!(
        !socket.exists(),
        "stale shim socket {} left",
        socket.display()
    );

    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let mut w: Vec<f64> = warm.iter().map(ms).collect();
    w.sort_by(f64::total_cmp);
    eprintln!(
        "{TEST}: pod start (ctr run -d → first log line, VM boot included) {:.1} s; \
         ctr run --rm echo in the running pod: median {:.0} ms ({w:.0?}); shim PSS outside \
         guest RAM {pss} KiB, guest RAM resident {guest_rss} KiB (c1 running)",
        cold.as_secs_f64(),
        w[w.len() / 2],
    );
    // runc next to it, same containerd and image.
    let mut runc = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        let out = ctr(
            c,
            &[
                "run",
                "--rm",
                "--runtime",
                "io.containerd.runc.v2",
                IMAGE,
                &format!("runc{i}"),
                "echo",
                "hello",
            ],
        );
        runc.push(ms(&t.elapsed()));
        assert_eq!(out.stdout, "hello\n", "runc: {out:?}");
    }
    runc.sort_by(f64::total_cmp);
    eprintln!(
        "{TEST}: runc ctr run --rm echo: median {:.0} ms ({runc:.0?})",
        runc[1]
    );
}

/// The second pod: exit codes, env/cwd/stderr, stdin, an OOM kill, SIGKILL and a TERM the
/// container traps (its own pod, so that it runs next to `shim_containerd_pod`).
#[test]
fn shim_containerd_pod_io() {
    const TEST: &str = "shim_containerd_pod_io";
    let Some((guest, initrd)) = pod_tools(TEST) else {
        return;
    };
    let p = PodTest::start(guest, initrd, "shim-pod-io", "pod3");
    let (dir, c, events, pod) = (&p.dir, &p.containerd, &p.events, &p.pod);
    let run = |extra: &[&str], id: &str, cmd: &[&str]| p.run(extra, id, cmd);

    // The pod's first container boots the VM: a shell that traps TERM, logging to a file.
    let log2 = dir.join("logs/term.log");
    let uri2 = format!("file://{}", log2.display());
    let out = run(
        &["-d", "--log-uri", &uri2],
        "term",
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 1; done",
        ],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    wait_until("term's ready line", RUN_TIMEOUT, || {
        std::fs::read_to_string(&log2).is_ok_and(|l| l.contains("ready"))
    });
    let shims = shim_pids(&c.sock());
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
    let shim = shims[0];

    // More containers of the pod join the running VM: exit codes, env and cwd.
    let out = run(
        &["--rm", "--env", "FOO=bar", "--cwd", "/tmp"],
        "envcwd",
        &["sh", "-c", "echo $FOO; pwd; echo to-stderr >&2; exit 7"],
    );
    assert_eq!(out.code, Some(7), "exit code propagates: {out:?}");
    assert_eq!(out.stdout, "bar\n/tmp\n");
    assert!(out.stderr.contains("to-stderr"), "{out:?}");

    // stdin to EOF.
    let mut args = vec!["run", "--rm", "--runtime", RUNTIME, "--annotation", &pod];
    args.extend([IMAGE, "stdin", "sh", "-c", "cat; echo cat-done"]);
    let out = ctr_stdin(c, &args, "line one\nline two\n");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "line one\nline two\ncat-done\n"),
        "{out:?}"
    );

    // An OOM kill inside a container with a memory limit.
    let out = run(
        &["--rm", "--memory-limit", "6291456"],
        "oom",
        &["sh", "-c", "tail /dev/zero"],
    );
    // ctr reports the container's exit status: 137, killed by the OOM killer (a failure to
    // create or start the container would exit 1 and leave no /tasks/oom event below).
    assert_eq!(
        out.code,
        Some(137),
        "the OOM-killed process dies of SIGKILL: {out:?}"
    );

    // A second long-running container, killed with SIGKILL.
    let out = run(&["-d", "--null-io"], "c2", &["sleep", "100000"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        shim_pids(&c.sock()),
        vec![shim],
        "one shim (and VM) for the pod"
    );

    assert_eq!(ctr(c, &["task", "kill", "-s", "KILL", "c2"]).code, Some(0));
    wait_until("c2 to stop", CTR_TIMEOUT, || {
        task_status(c, "c2").as_deref() == Some("STOPPED")
    });
    let out = ctr(c, &["task", "rm", "c2"]);
    assert!(
        out.stderr.contains("non-zero exit code 137"),
        "ctr task rm reports the exit status: {out:?}"
    );
    assert_eq!(ctr(c, &["container", "rm", "c2"]).code, Some(0));

    // TERM to the first container's shell, which traps it and exits 0: the pod's last task.
    assert_eq!(ctr(c, &["task", "kill", "term"]).code, Some(0));
    wait_until("term to stop", CTR_TIMEOUT, || {
        task_status(c, "term").as_deref() == Some("STOPPED")
    });
    assert!(std::fs::read_to_string(&log2).unwrap().contains("got-term"));
    assert_eq!(ctr(c, &["task", "rm", "term"]).code, Some(0));
    assert_eq!(ctr(c, &["container", "rm", "term"]).code, Some(0));

    std::thread::sleep(Duration::from_millis(500));
    assert_order(
        &task_topics(&events.text(), "oom"),
        &["/tasks/start", "/tasks/oom", "/tasks/exit"],
    );
    assert_nothing_left(c, "pod3");
}

/// The name every thread of the shim's ttrpc server has: per containerd connection a
/// handler, a reader, a writer and a worker pool that ttrpc grows and shrinks between 1
/// and 5 threads with the load.
const TTRPC_THREADS: &str = "client_handler";
/// How far the ttrpc worker pools may have grown between two counts: 4 threads for each of
/// containerd's connections (two at most) — a leak per exec or container is far more.
const TTRPC_POOL_SLACK: usize = 8;

/// What a pod's shim and the host hold: the shim's threads (how many of each name) and
/// open fds, the mounts below the test's dir and the paths below the run dir.
#[derive(Debug, PartialEq, Eq)]
struct Held {
    threads: std::collections::BTreeMap<String, usize>,
    fds: usize,
    mounts: Vec<String>,
    run_dir: Vec<String>,
}

impl Held {
    fn of(shim: u32, c: &Containerd) -> Held {
        let mut threads = std::collections::BTreeMap::new();
        for t in std::fs::read_dir(format!("/proc/{shim}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(name) = std::fs::read_to_string(t.path().join("comm")) {
                *threads.entry(name.trim().to_string()).or_insert(0) += 1;
            }
        }
        let fds = std::fs::read_dir(format!("/proc/{shim}/fd")).map_or(0, |d| d.flatten().count());
        let mut mounts = mounts_below(&c.dir);
        mounts.sort();
        let mut run_dir = Vec::new();
        list_tree(&c.run_dir(), 3, &mut run_dir);
        run_dir.sort();
        Held {
            threads,
            fds,
            mounts,
            run_dir,
        }
    }

    fn thread_count(&self) -> usize {
        self.threads.values().sum()
    }

    /// Whether this holds no more than `baseline`: the same threads but for the size of
    /// ttrpc's worker pools, and the same fds, mounts and run-dir paths.
    fn within(&self, baseline: &Held) -> bool {
        let without_ttrpc = |h: &Held| {
            let mut t = h.threads.clone();
            (t.remove(TTRPC_THREADS).unwrap_or(0), t)
        };
        let ((ttrpc, others), (ttrpc_base, others_base)) =
            (without_ttrpc(self), without_ttrpc(baseline));
        others == others_base
            && ttrpc <= ttrpc_base + TTRPC_POOL_SLACK
            && (self.fds, &self.mounts, &self.run_dir)
                == (baseline.fds, &baseline.mounts, &baseline.run_dir)
    }
}

/// Churn in one pod: exec/delete cycles (with and without stdin), container
/// create/start/kill/delete cycles, then pods of their own created and deleted next to it.
/// Everything a finished process, container or pod held must be released: the pod shim's
/// thread and fd counts, the mounts below the test's dir and the run dir end where they
/// started.
#[test]
fn shim_containerd_churn() {
    const TEST: &str = "shim_containerd_churn";
    const EXECS: usize = 50;
    const CONTAINERS: usize = 10;
    const PODS: usize = 5;
    let Some((guest, initrd)) = pod_tools(TEST) else {
        return;
    };
    let p = PodTest::start(guest, initrd, "shim-churn", "pod5");
    let c = &p.containerd;
    let started = Instant::now();
    let out = p.run(&["-d", "--null-io"], "keep", &["sleep", "100000"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let shims = shim_pids(&c.sock());
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
    let shim = shims[0];
    let boot = started.elapsed();

    // One exec: every third with a line on ctr's stdin that `cat` echoes back, the others
    // with ctr's stdin at EOF from the start, so that ctr gives up its stdin FIFO before
    // the shim opens it (no writer ever comes: `ctr task exec` has no `-i` and always wires
    // stdin).
    let exec = |n: usize| {
        let id = format!("x{n}");
        let out = if n.is_multiple_of(3) {
            ctr_stdin(
                c,
                &["task", "exec", "--exec-id", &id, "keep", "cat"],
                "churn\n",
            )
        } else {
            ctr(
                c,
                &["task", "exec", "--exec-id", &id, "keep", "echo", "churn"],
            )
        };
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (Some(0), "churn\n"),
            "{out:?}"
        );
    };
    // One container: created and started with ctr's FIFOs (stdin never opened), killed,
    // deleted.
    let container = |n: usize| {
        let id = format!("churn{n}");
        let out = p.run(&["-d"], &id, &["sleep", "100000"]);
        assert_eq!(out.code, Some(0), "{out:?}");
        assert_eq!(ctr(c, &["task", "kill", "-s", "KILL", &id]).code, Some(0));
        wait_until("the churn container to stop", CTR_TIMEOUT, || {
            task_status(c, &id).as_deref() == Some("STOPPED")
        });
        let out = ctr(c, &["task", "rm", &id]);
        assert_eq!(out.code, Some(0), "{out:?}");
        assert_eq!(ctr(c, &["container", "rm", &id]).code, Some(0));
    };

    // The baseline comes after one cycle of each kind: the first exec and container start
    // threads the shim creates lazily and keeps (e.g. ttrpc's worker pools; see
    // `Held::within`).
    exec(0);
    exec(1);
    container(0);
    let baseline = Held::of(shim, c);
    let t = Instant::now();
    for n in 2..EXECS + 2 {
        exec(n);
    }
    let execs = t.elapsed();
    let t = Instant::now();
    for n in 1..=CONTAINERS {
        container(n);
    }
    let containers = t.elapsed();
    // One more pod VM at a time next to the churn pod: a second slot for this phase only.
    let second_vm = common::vm_slots::take(1);
    let t = Instant::now();
    for n in 0..PODS {
        let pod = format!("churn-pod{n}");
        let ann = in_pod(&pod);
        let args = [
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--annotation",
            &ann,
            IMAGE,
            &pod,
            "true",
        ];
        let out = ctr(c, &args);
        assert_eq!(out.code, Some(0), "{out:?}");
        wait_until("the churn pod's shim to exit", CTR_TIMEOUT, || {
            shim_pids(&c.sock()) == vec![shim]
        });
    }
    let pods = t.elapsed();
    drop(second_vm);

    // Exit waiters and copy threads end just after containerd hears of the exit.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut now = Held::of(shim, c);
    while !now.within(&baseline) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        now = Held::of(shim, c);
    }
    eprintln!(
        "{TEST}: baseline {} threads, {} fds, {} mounts, {} run-dir paths; after {EXECS} \
         execs, {CONTAINERS} containers and {PODS} pods: {} threads, {} fds, {} mounts, {} \
         run-dir paths (boot {:.1} s, execs {:.1} s, containers {:.1} s, pods {:.1} s)",
        baseline.thread_count(),
        baseline.fds,
        baseline.mounts.len(),
        baseline.run_dir.len(),
        now.thread_count(),
        now.fds,
        now.mounts.len(),
        now.run_dir.len(),
        boot.as_secs_f64(),
        execs.as_secs_f64(),
        containers.as_secs_f64(),
        pods.as_secs_f64(),
    );
    assert!(
        now.within(&baseline),
        "the churn left something held:\nnow {now:#?}\nbaseline {baseline:#?}\n{}",
        common::containerd::process_threads(shim)
    );

    assert_eq!(
        ctr(c, &["task", "kill", "-s", "KILL", "keep"]).code,
        Some(0)
    );
    wait_until("keep to stop", CTR_TIMEOUT, || {
        task_status(c, "keep").as_deref() == Some("STOPPED")
    });
    assert_eq!(ctr(c, &["task", "rm", "keep"]).code, Some(0));
    assert_eq!(ctr(c, &["container", "rm", "keep"]).code, Some(0));
    assert_nothing_left(c, "pod5");
}

#[test]
fn shim_containerd_guest_death() {
    const TEST: &str = "shim_containerd_guest_death";
    let Some((guest, initrd)) = pod_tools(TEST) else {
        return;
    };
    let p = PodTest::start(guest, initrd, "shim-death", "pod2");
    let (c, events, pod) = (&p.containerd, &p.events, &p.pod);
    let out = ctr(
        c,
        &[
            "run",
            "-d",
            "--null-io",
            "--runtime",
            RUNTIME,
            "--annotation",
            pod,
            IMAGE,
            "victim",
            "sleep",
            "100000",
        ],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    wait_until("victim to run", RUN_TIMEOUT, || {
        task_status(c, "victim").as_deref() == Some("RUNNING")
    });
    // A container of the pod with CAP_SYS_ADMIN crashes the guest kernel through a procfs
    // of its own (the OCI default mounts /proc/sysrq-trigger read-only).
    let out = ctr(
        c,
        &[
            "run",
            "--rm",
            "--cap-add",
            "CAP_SYS_ADMIN",
            "--runtime",
            RUNTIME,
            "--annotation",
            pod,
            IMAGE,
            "crash",
            "sh",
            "-c",
            "mkdir -p /p && mount -t proc proc /p && echo c > /p/sysrq-trigger",
        ],
    );
    assert_ne!(
        out.code,
        Some(0),
        "the crashing container cannot succeed: {out:?}"
    );
    wait_until("victim to stop", CTR_TIMEOUT, || {
        task_status(c, "victim").as_deref() == Some("STOPPED")
    });
    let out = ctr(c, &["task", "rm", "victim"]);
    assert!(
        out.stderr.contains("non-zero exit code 255"),
        "exit status of a task whose VM died: {out:?}"
    );
    let _ = ctr(c, &["container", "rm", "victim"]);
    let _ = ctr(c, &["container", "rm", "crash"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_order(
        &task_topics(&events.text(), "victim"),
        &["/tasks/start", "/tasks/exit", "/tasks/delete"],
    );
    assert_nothing_left(c, "pod2");
    let log = c.log();
    let why: Vec<&str> = log.lines().filter(|l| l.contains("VM stopped: ")).collect();
    eprintln!("{TEST}: {why:?}");
    assert!(!why.is_empty(), "the shim logs why the VM stopped");
}

/// Templates (the default): in a template directory of its own, the first pod builds the
/// template (one cold boot), then three pods start at once as clones of it; each clone's
/// random pool is its own, so each container prints different bytes.
#[test]
fn shim_containerd_template() {
    const TEST: &str = "shim_containerd_template";
    let Some((guest, initrd)) = pod_tools(TEST) else {
        return;
    };
    // The template VM, then three clones at once: alone on 2 cores (see `common::vm_slots`).
    let _vms = common::vm_slots::take(4);
    let dir = temp_path("shim-template");
    let templates = dir.join("templates");
    let c = Containerd::start_with(
        &dir,
        &guest.kernel,
        &initrd,
        ContainerdOptions {
            template_dir: Some(templates.clone()),
            ..Default::default()
        },
    );
    import_image(&c, &dir.join("image"));
    let config = dir.join("podvisor-template.toml");
    // Three clones start their containers at once on as few as 2 cores: one agent request may
    // take longer than the default bound of 600 s there (kept below ctr's 900 s bound).
    std::fs::write(&config, "template = \"auto\"\nagent_timeout_secs = 840\n").unwrap();
    let config = config.display().to_string();
    let run = |pod: &str| -> (Out, Duration) {
        let ann = in_pod(pod);
        let t = Instant::now();
        let out = ctr(
            &c,
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                "--runtime-config-path",
                &config,
                "--annotation",
                &ann,
                IMAGE,
                pod,
                "sh",
                "-c",
                "echo pod-up; head -c 16 /dev/urandom | od -An -tx1",
            ],
        );
        (out, t.elapsed())
    };
    // The first pod builds the template (a cold boot), then runs as its first clone.
    let (first, cold) = run("t0");
    assert_eq!(first.code, Some(0), "{first:?}");
    assert!(first.stdout.starts_with("pod-up\n"), "{first:?}");
    let built: Vec<_> = std::fs::read_dir(&templates)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("state").is_file())
        .collect();
    assert_eq!(built.len(), 1, "one template: {built:?}");

    // Three more pods at once, from the template.
    const CLONES: [&str; 3] = ["t1", "t2", "t3"];
    let clones: Vec<(Out, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = CLONES.iter().map(|p| s.spawn(move || run(p))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut randoms = vec![first.stdout.clone()];
    for (out, _) in &clones {
        assert_eq!(out.code, Some(0), "{out:?}");
        assert!(out.stdout.starts_with("pod-up\n"), "{out:?}");
        randoms.push(out.stdout.clone());
    }
    randoms.sort();
    randoms.dedup();
    assert_eq!(
        randoms.len(),
        1 + CLONES.len(),
        "each clone reads its own random bytes: {randoms:?}"
    );
    let log = c.log();
    let restored = log.matches("pod VM restored from template").count();
    assert_eq!(restored, 1 + CLONES.len(), "every pod is a clone");
    for pod in std::iter::once("t0").chain(CLONES) {
        assert_nothing_left(&c, pod);
    }
    let secs: Vec<String> = clones
        .iter()
        .map(|(_, t)| format!("{:.1}", t.as_secs_f64()))
        .collect();
    eprintln!(
        "{TEST}: first pod (template build + clone) {:.1} s; {} clone pods at once: {} s \
         (ctr run --rm)",
        cold.as_secs_f64(),
        CLONES.len(),
        secs.join(", ")
    );
}
