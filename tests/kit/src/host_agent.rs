//! The real `podvisor-agent` binary on the host, in its own mount, PID, UTS and IPC
//! namespaces (`unshare --kill-child`), listening on Unix sockets in a temp dir: the RPC
//! socket (`agent.sock`) and the stream socket (`agent.sock.stream`).
//!
//! Needs root (namespaces, mounts, cgroups), busybox-static and a cgroup2 mount:
//! [`skip_reason`] says which is missing. cgroup v2: the agent mounts a private cgroup2 on
//! /sys/fs/cgroup; the container cgroups land in the host's cgroup2 hierarchy under a
//! per-agent parent, removed when the [`HostAgent`] is dropped, even on failure.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::wait_for;

/// How long the agent may take to start, and to exit.
pub const TIMEOUT: Duration = Duration::from_secs(30);
pub use crate::image::BUSYBOX;

/// Why the host agent cannot run here, if it cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (namespaces, mounts, cgroups)".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("needs {BUSYBOX} (apt-get install busybox-static)"));
    }
    if host_cgroup2().is_none() {
        return Some("needs a cgroup2 mount on the host".into());
    }
    None
}

/// Where the host's cgroup2 hierarchy is mounted (/sys/fs/cgroup or .../unified).
pub fn host_cgroup2() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Whether the host's cgroup2 hierarchy has `controller`.
pub fn cgroup2_has(controller: &str) -> bool {
    host_cgroup2()
        .and_then(|root| fs::read_to_string(root.join("cgroup.controllers")).ok())
        .is_some_and(|c| c.split_whitespace().any(|x| x == controller))
}

/// Builds a busybox rootfs in `dir/rootfs` (`image::build_busybox_rootfs`) with a
/// /root/secret that [`spec`] masks.
pub fn build_rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    crate::image::build_busybox_rootfs(&rootfs).unwrap();
    fs::write(rootfs.join("root/secret"), "hidden\n").unwrap();
    rootfs
}

/// A minimal OCI spec: pid/ipc/uts/mount namespaces, read-only rootfs, the usual mounts,
/// default capabilities, masked and read-only paths.
pub fn spec(args: &[&str], terminal: bool) -> Value {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT"
    ]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "ctr",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware", "/etc/passwd", "/root"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/bus"]
        }
    })
}

/// The `process` part of [`spec`], as ExecProcess takes it.
pub fn process_json(args: &[&str], terminal: bool) -> Vec<u8> {
    let mut spec = spec(args, terminal);
    serde_json::to_vec(&spec["process"].take()).unwrap()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running agent and what it leaves on the host; dropping it kills the agent (and so its
/// PID namespace) and removes the temp dir and the agent's cgroups, even on failure.
pub struct HostAgent {
    unshare: Child,
    dir: tempfile::TempDir,
    cgroup_parent: String,
    /// The busybox rootfs containers can use.
    pub rootfs: PathBuf,
}

impl HostAgent {
    /// Starts `agent_bin` with extra `unshare` namespace options (e.g. `--net`). Returns
    /// once its RPC socket exists; callers connect and wait for GetVersion themselves.
    pub fn start(agent_bin: &Path, namespaces: &[&str]) -> Self {
        Self::start_with_args(agent_bin, namespaces, &[])
    }

    /// [`HostAgent::start`] with extra agent options (e.g. `--cgroup-spares 2`).
    pub fn start_with_args(agent_bin: &Path, namespaces: &[&str], agent_args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pva-")
            .tempdir_in("/tmp")
            .unwrap();
        let rootfs = build_rootfs(dir.path());
        let sock = dir.path().join("agent.sock");
        let cgroup_parent = format!(
            "podvisor-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let log = fs::File::create(dir.path().join("agent.log")).unwrap();
        let unshare = Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--uts",
                "--ipc",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--propagation",
                "private",
            ])
            .args(namespaces)
            .arg(agent_bin)
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--state-dir")
            .arg(dir.path().join("s"))
            .args(["--cgroup-parent", &cgroup_parent, "--private-cgroup2"])
            .arg("--resolv-conf")
            .arg(dir.path().join("resolv.conf"))
            .args(["--log-level", "debug"])
            .args(agent_args)
            .env("GLIBC_TUNABLES", "glibc.malloc.check=0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run unshare (util-linux)");
        let mut agent = HostAgent {
            unshare,
            dir,
            cgroup_parent,
            rootfs,
        };
        let rpc = agent.rpc_socket();
        wait_for("the agent's socket", TIMEOUT, || {
            if let Ok(Some(status)) = agent.unshare.try_wait() {
                panic!("agent exited early ({status}):\n{}", agent.log());
            }
            rpc.exists().then_some(())
        });
        agent
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The ttrpc socket.
    pub fn rpc_socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// The socket of the stdio streams.
    pub fn stream_socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock.stream")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Whether the agent process has exited (its status then).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.unshare.try_wait().ok().flatten()
    }

    /// The agent's pid on the host (unshare's only child).
    pub fn agent_pid(&self) -> u32 {
        self.agent_pid_opt().expect("the agent runs")
    }

    pub fn agent_pid_opt(&self) -> Option<u32> {
        let children =
            fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.unshare.id())).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// Direct children of the agent (in host pids).
    pub fn agent_children(&self) -> Vec<u32> {
        let pid = self.agent_pid();
        let mut children = Vec::new();
        for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
            let text = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            children.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        children
    }

    /// Number of open descriptors of the agent.
    pub fn agent_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.agent_pid()))
            .unwrap()
            .count()
    }

    /// The host cgroup the agent puts its containers' cgroups in.
    pub fn cgroup_parent(&self) -> PathBuf {
        host_cgroup2().unwrap().join(&self.cgroup_parent)
    }

    /// The host cgroup of container `id`.
    pub fn container_cgroup(&self, id: &str) -> PathBuf {
        self.cgroup_parent().join(id)
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        // Kill the agent itself first: unshare reaps it, so no zombie is left to the host's
        // init; `--kill-child` covers the case where unshare goes first.
        // A pid that is no pid_t is skipped: wrapped negative, it would name a process group.
        if let Some(pid) = self.agent_pid_opt().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill has no memory preconditions; pid is the agent's host pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + TIMEOUT;
        while self.unshare.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        if std::thread::panicking() || std::env::var_os("PODVISOR_AGENT_TEST_LOG").is_some() {
            eprintln!("---- agent log ----\n{}", self.log());
        }
        // The namespace's processes die with the agent; then their cgroups can go.
        if let Some(root) = host_cgroup2() {
            let parent = root.join(&self.cgroup_parent);
            let deadline = Instant::now() + TIMEOUT;
            while parent.exists() && Instant::now() < deadline {
                if let Ok(entries) = fs::read_dir(&parent) {
                    for entry in entries.flatten() {
                        if entry.path().is_dir() {
                            let _ = fs::remove_dir(entry.path());
                        }
                    }
                }
                if fs::remove_dir(&parent).is_err() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}
