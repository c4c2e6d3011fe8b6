//! containerd for the density harness: either a private one (Debian's
//! `/usr/bin/containerd`, root/state/sockets in a work dir, CRI plugin off, the podvisor
//! shim's directory on its `PATH` and the pods' settings in its environment) or an existing
//! one reached through `--address`; driven with `ctr` subprocesses.
//!
//! Product code with no test-only dependencies: the integration tests' harness can include
//! this file (`#[path]`). Everything here returns errors instead of panicking, and
//! [`Containerd`]'s `Drop` stops what it started (shims of its socket, then containerd),
//! unmounts what is left below its work dir and removes the dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::memory;

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

/// A containerd the harness talks to. Private ones are stopped and their work dir removed
/// on drop; an existing one (`--address`) is left as it was found.
pub struct Containerd {
    sock: PathBuf,
    /// The work dir and the process of a private containerd.
    private: Option<(PathBuf, Child)>,
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

    /// Starts a private containerd with root, state, sockets and log under `dir` (created;
    /// removed again on drop), `path_prepend` in front of its `PATH` (where it finds
    /// `containerd-shim-<name>-v2` binaries) and `envs` in its environment (the shims
    /// inherit it). Waits until it answers (30 s).
    pub fn start(
        dir: &Path,
        path_prepend: Option<&Path>,
        envs: &[(String, String)],
    ) -> Result<Containerd, ContainerdError> {
        check_tool(CONTAINERD)?;
        check_tool(CTR)?;
        let io = |source| ContainerdError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n",
                d = dir.display()
            ),
        )
        .map_err(io)?;
        let base_path =
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        let path = match path_prepend {
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
            .arg(&config)
            .env("PATH", path)
            .envs(envs.iter().map(|(k, v)| (k, v)))
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
            private: Some((dir.to_path_buf(), child)),
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
        self.private.as_ref().map(|(d, _)| d.as_path())
    }

    /// The last `lines` lines of a private containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let Some(dir) = self.dir() else {
            return String::new();
        };
        let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
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

pub use podvisor_shim::share::mounts_below;

/// Makes the child get SIGKILL when the harness dies without tearing down (SIGKILL, crash),
/// so that no containerd or `ctr` client outlives it. (Shims that containerd started are
/// not children of the harness; they stay until their containerd's state dir is cleaned.)
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Shim binaries containerd may start for the harness's pods.
pub const SHIM_BINARIES: [&str; 2] = ["containerd-shim-podvisor-v2", "containerd-shim-runc-v2"];

/// Sends `signal` to `pid`.
pub fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; a stale PID at worst gets ESRCH.
    unsafe { libc::kill(pid as i32, signal) };
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let Some((dir, mut child)) = self.private.take() else {
            return;
        };
        // Shims of this containerd (pods that teardown could not remove), then containerd.
        for binary in SHIM_BINARIES {
            for pid in memory::shim_pids(binary, None, &self.sock) {
                log::warn!("killing leftover {binary} (pid {pid})");
                for child in memory::descendants(pid) {
                    kill(child, libc::SIGKILL);
                }
                kill(pid, libc::SIGKILL);
            }
        }
        kill(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        let mut left = mounts_below(&dir);
        left.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for m in left {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: umount2 with a valid C string; MNT_DETACH never blocks.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            log::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}
