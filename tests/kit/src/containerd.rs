//! A containerd for tests and benches: either a private one (Debian's
//! `/usr/bin/containerd`, root/state/sockets/log in a work dir, the shims' directory first
//! on its `PATH`, the pods' settings in its environment, the CRI plugin off unless a test
//! configures it) or an existing one reached by its socket; driven with `ctr`.
//!
//! Everything returns errors instead of panicking (the benches report them; the tests'
//! wrapper turns them into failures), and [`Containerd`]'s `Drop` stops what it started:
//! the CRI namespace's tasks, the shims of its socket (and their children), containerd,
//! then unmounts what is left below its work dir (and the extra dirs it was given) and
//! removes them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use podvisor_shim::share::mounts_below;

use crate::processes::{descendants, die_with_parent, kill, processes_of};

/// The CRI plugin's containerd namespace.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// How a private containerd is set up.
#[derive(Debug, Clone, Default)]
pub struct PrivateConfig {
    /// Root, state, sockets, config and log go here (created; removed on drop).
    pub dir: PathBuf,
    /// Put in front of its `PATH`: where it finds `containerd-shim-<name>-v2` binaries.
    pub path_prepend: Option<PathBuf>,
    /// Its environment, which the shims inherit.
    pub envs: Vec<(String, String)>,
    /// The CRI plugin's configuration (TOML tables `[plugins."io.containerd.grpc.v1.cri"…]`);
    /// `None`: the plugin is off.
    pub cri: Option<String>,
    /// Debug logging (`[debug] level = "debug"`).
    pub debug: bool,
    /// Directories outside `dir` that its shims fill (a short run dir): unmounted and
    /// removed with `dir`.
    pub cleanup_dirs: Vec<PathBuf>,
}

pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const CTR: &str = "/usr/bin/ctr";

/// Errors driving containerd.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("{path} is missing: install Debian's containerd (`make deps`)")]
    Missing { path: &'static str },
    #[error("cannot prepare containerd's work dir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {CONTAINERD}: {0} (it needs root)")]
    Spawn(std::io::Error),
    #[error("containerd did not answer on {sock} within {secs} s; its log:\n{log}")]
    NotUp {
        sock: PathBuf,
        secs: u64,
        log: String,
    },
    #[error("`ctr {args}` failed: {detail}")]
    Ctr { args: String, detail: String },
}

/// A containerd a harness talks to. Private ones are stopped and their work dir removed
/// on drop; an existing one is left as it was found.
pub struct Containerd {
    sock: PathBuf,
    private: Option<Private>,
}

/// What a private containerd leaves to clean up.
struct Private {
    dir: PathBuf,
    child: Child,
    cri: bool,
    cleanup_dirs: Vec<PathBuf>,
}

impl Containerd {
    /// An existing containerd at `sock`; checks that it answers.
    pub fn existing(sock: &Path) -> Result<Containerd, ContainerdError> {
        check_tool(CTR)?;
        let c = Containerd {
            sock: sock.to_path_buf(),
            private: None,
        };
        c.ctr_ok(&["version"])?;
        Ok(c)
    }

    /// Starts a private containerd as `config` says; waits until it answers (30 s).
    pub fn start(config: PrivateConfig) -> Result<Containerd, ContainerdError> {
        check_tool(CONTAINERD)?;
        check_tool(CTR)?;
        let dir = config.dir.as_path();
        let io = |source| ContainerdError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut text = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n",
            d = dir.display()
        );
        if config.debug {
            text += "[debug]\n  level = \"debug\"\n";
        }
        match &config.cri {
            Some(cri) => text += cri,
            // Top-level keys must come before the tables: prepend.
            None => text = format!("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n{text}"),
        }
        let toml = dir.join("config.toml");
        std::fs::write(&toml, text).map_err(io)?;
        let base_path =
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        let path = match &config.path_prepend {
            Some(p) => format!("{}:{base_path}", p.display()),
            None => base_path,
        };
        let log = std::fs::File::create(dir.join("containerd.log")).map_err(io)?;
        let log2 = log.try_clone().map_err(io)?;
        let mut cmd = Command::new(CONTAINERD);
        // containerd 1.6 looks for `containerd-shim-*` in its working directory before
        // `PATH`: run it in the work dir so that only the intended shim is found.
        cmd.current_dir(dir)
            .arg("--config")
            .arg(&toml)
            .env("PATH", path)
            .envs(config.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Its own process group: a Ctrl-C on the terminal reaches only the harness, which
        // then tears down in order.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(ContainerdError::Spawn)?;
        let c = Containerd {
            sock: dir.join("containerd.sock"),
            private: Some(Private {
                dir: dir.to_path_buf(),
                child,
                cri: config.cri.is_some(),
                cleanup_dirs: config.cleanup_dirs,
            }),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while c
            .ctr(&["version"])
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            if Instant::now() > deadline {
                return Err(ContainerdError::NotUp {
                    sock: c.sock.clone(),
                    secs: 30,
                    log: c.log_tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        log::info!("private containerd up at {}", c.sock.display());
        Ok(c)
    }

    /// containerd's gRPC socket.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// The work dir of a private containerd.
    pub fn dir(&self) -> Option<&Path> {
        self.private.as_ref().map(|p| p.dir.as_path())
    }

    /// A private containerd's log (empty for an existing one).
    pub fn log(&self) -> String {
        self.dir()
            .and_then(|d| std::fs::read_to_string(d.join("containerd.log")).ok())
            .unwrap_or_default()
    }

    /// The last `lines` lines of a private containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A `ctr -a <sock> args...` command, stdin closed.
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(CTR);
        cmd.arg("-a")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr args...` to completion.
    pub fn ctr(&self, args: &[&str]) -> Result<Output, ContainerdError> {
        self.ctr_cmd(args)
            .output()
            .map_err(|e| ContainerdError::Ctr {
                args: args.join(" "),
                detail: e.to_string(),
            })
    }

    /// Runs `ctr args...`; its stdout, or an error with its stderr when it fails.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String, ContainerdError> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            return Err(ContainerdError::Ctr {
                args: args.join(" "),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr image import` of an archive; returns whether `image` was missing before.
    pub fn import_image(&self, archive: &Path, image: &str) -> Result<bool, ContainerdError> {
        let had = self
            .ctr_ok(&["image", "ls", "-q"])?
            .lines()
            .any(|l| l == image);
        if !had {
            self.ctr_ok(&["image", "import", &archive.to_string_lossy()])?;
        }
        Ok(!had)
    }

    /// IDs of tasks (`ctr task ls -q`).
    pub fn tasks(&self) -> Result<Vec<String>, ContainerdError> {
        Ok(lines(&self.ctr_ok(&["task", "ls", "-q"])?))
    }

    /// IDs of containers (`ctr container ls -q`).
    pub fn containers(&self) -> Result<Vec<String>, ContainerdError> {
        Ok(lines(&self.ctr_ok(&["container", "ls", "-q"])?))
    }

    /// Kills and deletes container `id`'s task (waiting up to `timeout` for it to stop),
    /// then deletes the container. Best effort: each step is tried; the first error is
    /// returned.
    pub fn remove_container(&self, id: &str, timeout: Duration) -> Result<(), ContainerdError> {
        let mut first_err = None;
        if self.tasks().unwrap_or_default().iter().any(|t| t == id) {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            let deadline = Instant::now() + timeout;
            loop {
                let out = self.ctr(&["task", "delete", id]);
                if out.as_ref().is_ok_and(|o| o.status.success())
                    || !self.tasks().unwrap_or_default().iter().any(|t| t == id)
                {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = self.ctr(&["task", "delete", "--force", id]);
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if self
            .containers()
            .unwrap_or_default()
            .iter()
            .any(|c| c == id)
        {
            match self.ctr_ok(&["container", "rm", id]) {
                // `ctr run --rm` removed it meanwhile.
                Err(ContainerdError::Ctr { detail, .. }) if detail.contains("not found") => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
                Ok(_) => {}
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

fn lines(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

fn check_tool(path: &'static str) -> Result<(), ContainerdError> {
    if Path::new(path).is_file() {
        Ok(())
    } else {
        Err(ContainerdError::Missing { path })
    }
}

/// Shim binaries containerd may start for a harness's pods.
pub const SHIM_BINARIES: [&str; 2] = ["containerd-shim-podvisor-v2", "containerd-shim-runc-v2"];

/// Unmounts (lazily) what is mounted at or below `dir`, deepest first.
fn unmount_all_below(dir: &Path) {
    let mut left = mounts_below(dir);
    left.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for m in left {
        if let Ok(c) = std::ffi::CString::new(m) {
            // SAFETY: umount2 with a valid C string; MNT_DETACH never blocks.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let Some(mut p) = self.private.take() else {
            return;
        };
        if p.cri {
            // Containers a failed CRI run left (runc's outlive their shim): kill them.
            let tasks = self
                .ctr_ok(&["-n", CRI_NAMESPACE, "task", "ls", "-q"])
                .unwrap_or_default();
            for id in tasks.split_whitespace() {
                let _ = self.ctr(&[
                    "-n",
                    CRI_NAMESPACE,
                    "task",
                    "kill",
                    "-a",
                    "-s",
                    "SIGKILL",
                    id,
                ]);
            }
        }
        // Shims of this containerd (pods that teardown could not remove), then containerd.
        for binary in SHIM_BINARIES {
            for pid in processes_of(binary, &self.sock) {
                log::warn!("killing leftover {binary} (pid {pid})");
                for child in descendants(pid) {
                    kill(child, libc::SIGKILL);
                }
                kill(pid, libc::SIGKILL);
            }
        }
        kill(p.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = p.child.kill();
        let _ = p.child.wait();
        for dir in std::iter::once(&p.dir).chain(&p.cleanup_dirs) {
            unmount_all_below(dir);
            if let Err(e) = std::fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("cannot remove {}: {e}", dir.display());
                }
            }
        }
    }
}
