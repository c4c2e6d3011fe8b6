//! Container cgroups (v2 only), read and written as files under `/sys/fs/cgroup`.
//!
//! libcontainer creates each container's cgroup at `/sys/fs/cgroup/<parent>/<id>` (the
//! agent sets `linux.cgroupsPath` to that) and applies the spec's resources. This module
//! does the rest directly on the cgroup v2 files: statistics (`cpu.stat`, `memory.*`,
//! `pids.*`, `io.stat`), the freezer (`cgroup.freeze`, waiting on `cgroup.events`), the
//! process list (`cgroup.procs`, recursively), kill-all (`cgroup.kill`), and
//! `memory.events` for OOM kills. Updates of resources go through libcgroups, which knows
//! the OCI → file mapping. A controller that is not enabled (e.g. on a host whose memory
//! controller is bound to cgroup v1) leaves its statistics out instead of failing.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcgroups::common::{CgroupManager, ControllerOpt};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use oci_spec::runtime::LinuxResources;
use podvisor_agent_protocol::agent::{CpuStats, IoStats, MemoryStats, PidsStats, StatsResponse};

/// Where cgroup v2 is mounted (libcgroups assumes this too).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How long pause/resume wait for the cgroup to report frozen/thawed.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of cgroup operations.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path} did not become {state} within {FREEZE_TIMEOUT:?}: a process in uninterruptible sleep?")]
    FreezeTimeout { path: PathBuf, state: &'static str },
    #[error("applying resources to cgroup {path}: {message}; check the values and that the controllers are enabled")]
    Apply { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// True if `path` is a cgroup v2 mount.
/// Enables, for the children of cgroup `dir`, every controller `dir` has that is not
/// enabled yet; returns the ones that could not be (with why).
pub fn enable_controllers(dir: &Path) -> Vec<(String, std::io::Error)> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    available
        .split_whitespace()
        .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
        .filter_map(|c| {
            fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"))
                .err()
                .map(|err| (c.to_string(), err))
        })
        .collect()
}

pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Parses a "max"-or-number cgroup value.
fn parse_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(u64::MAX),
        value => value.parse().ok(),
    }
}

/// Parses "key value" lines (cpu.stat, memory.stat, memory.events).
fn parse_flat_keyed(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|line| {
        let (key, value) = line.split_once(' ')?;
        Some((key, value.trim().parse().ok()?))
    })
}

/// Sums io.stat lines ("MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...").
fn parse_io_stat(text: &str) -> IoStats {
    let mut io = IoStats::new();
    for field in text.split_whitespace() {
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "rbytes" => io.read_bytes += value,
            "wbytes" => io.write_bytes += value,
            "rios" => io.read_ios += value,
            "wios" => io.write_ios += value,
            _ => {}
        }
    }
    io
}

/// One container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    /// Path relative to [`CGROUP_ROOT`], as in the spec's `linux.cgroupsPath`.
    relative: PathBuf,
    path: PathBuf,
}

impl Cgroup {
    /// The cgroup at `/sys/fs/cgroup/<relative>`.
    pub fn new(relative: &Path) -> Self {
        let relative = relative.strip_prefix("/").unwrap_or(relative).to_path_buf();
        Self {
            path: Path::new(CGROUP_ROOT).join(&relative),
            relative,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self, file: &str) -> Option<String> {
        fs::read_to_string(self.path.join(file)).ok()
    }

    /// A "max"-or-number file; None if unreadable.
    fn read_limit(&self, file: &str) -> Option<u64> {
        self.read(file).and_then(|t| parse_limit(&t))
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.path.join(file);
        fs::write(&path, value).map_err(io_err(&path))
    }

    fn cpu_stats(&self) -> Option<CpuStats> {
        let text = self.read("cpu.stat")?;
        let mut cpu = CpuStats::new();
        for (key, value) in parse_flat_keyed(&text) {
            match key {
                "usage_usec" => cpu.usage_usec = value,
                "user_usec" => cpu.user_usec = value,
                "system_usec" => cpu.system_usec = value,
                "nr_periods" => cpu.nr_periods = value,
                "nr_throttled" => cpu.nr_throttled = value,
                "throttled_usec" => cpu.throttled_usec = value,
                _ => {}
            }
        }
        Some(cpu)
    }

    fn memory_stats(&self) -> Option<MemoryStats> {
        let mut memory = MemoryStats {
            usage: self.read_limit("memory.current")?,
            limit: self.read_limit("memory.max").unwrap_or(u64::MAX),
            max_usage: self.read_limit("memory.peak").unwrap_or(0),
            ..Default::default()
        };
        for (key, value) in parse_flat_keyed(&self.read("memory.events").unwrap_or_default()) {
            match key {
                "oom" => memory.oom = value,
                "oom_kill" => memory.oom_kill = value,
                _ => {}
            }
        }
        memory.stat = parse_flat_keyed(&self.read("memory.stat").unwrap_or_default())
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        Some(memory)
    }

    /// Statistics of every readable controller.
    pub fn stats(&self) -> StatsResponse {
        let cpu = self.cpu_stats();
        let memory = self.memory_stats();
        let pids = self.read_limit("pids.current").map(|current| PidsStats {
            current,
            limit: self.read_limit("pids.max").unwrap_or(u64::MAX),
            ..Default::default()
        });
        let io = self.read("io.stat").map(|text| parse_io_stat(&text));
        StatsResponse {
            has_cpu: cpu.is_some(),
            cpu: cpu.into(),
            has_memory: memory.is_some(),
            memory: memory.into(),
            has_pids: pids.is_some(),
            pids: pids.into(),
            has_io: io.is_some(),
            io: io.into(),
            ..Default::default()
        }
    }

    /// The `oom_kill` count of memory.events, if the memory controller is enabled.
    pub fn oom_kill_count(&self) -> Option<u64> {
        let text = self.read("memory.events")?;
        let count = parse_flat_keyed(&text)
            .find(|(key, _)| *key == "oom_kill")
            .map(|(_, value)| value);
        count
    }

    /// Path of memory.events (watched for OOM kills).
    pub fn memory_events_path(&self) -> PathBuf {
        self.path.join("memory.events")
    }

    /// Every pid in the cgroup and its descendants.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let mut pids = Vec::new();
        collect_pids(&self.path, &mut pids)?;
        pids.sort_unstable();
        Ok(pids)
    }

    /// Freezes (`true`) or thaws the cgroup and waits until cgroup.events confirms it.
    pub fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        let (value, want, state) = if frozen {
            ("1", "frozen 1", "frozen")
        } else {
            ("0", "frozen 0", "thawed")
        };
        let events_path = self.path.join("cgroup.events");
        // Open before writing so the poll below sees the change notification.
        let mut events = File::open(&events_path).map_err(io_err(&events_path))?;
        self.write("cgroup.freeze", value)?;
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        loop {
            let mut text = String::new();
            events
                .seek(SeekFrom::Start(0))
                .and_then(|_| events.read_to_string(&mut text))
                .map_err(io_err(&events_path))?;
            if text.lines().any(|line| line == want) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CgroupError::FreezeTimeout {
                    path: self.path.clone(),
                    state,
                });
            }
            // kernfs signals a changed file with POLLPRI.
            let mut fds = [PollFd::new(events.as_fd(), PollFlags::POLLPRI)];
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => {
                    return Err(CgroupError::Io {
                        path: events_path,
                        source: e.into(),
                    })
                }
            }
        }
    }

    /// True if the cgroup is frozen (paused).
    pub fn is_frozen(&self) -> bool {
        self.read("cgroup.freeze").is_some_and(|v| v.trim() == "1")
    }

    /// SIGKILLs every process of the cgroup (cgroup.kill, Linux 5.14+). Returns false if
    /// the kernel lacks cgroup.kill.
    pub fn kill_all(&self) -> bool {
        self.write("cgroup.kill", "1").is_ok()
    }

    /// Applies OCI resources (UpdateResources).
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        let err = |message: String| CgroupError::Apply {
            path: self.path.clone(),
            message,
        };
        let manager =
            libcgroups::v2::manager::Manager::new(CGROUP_ROOT.into(), self.relative.clone())
                .map_err(|e| err(e.to_string()))?;
        manager
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| err(e.to_string()))
    }

    /// Removes the cgroup directory if it is empty (best effort).
    pub fn remove(&self) {
        let _ = fs::remove_dir(&self.path);
    }
}

fn collect_pids(dir: &Path, pids: &mut Vec<u32>) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let text = fs::read_to_string(&procs).map_err(io_err(&procs))?;
    pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    let entries = fs::read_dir(dir).map_err(io_err(dir))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&entry.path(), pids)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_files() {
        assert_eq!(parse_limit("max\n"), Some(u64::MAX));
        assert_eq!(parse_limit("1048576\n"), Some(1 << 20));
        assert_eq!(parse_limit("junk"), None);
        let cpu: Vec<_> = parse_flat_keyed("usage_usec 10\nuser_usec 7\nsystem_usec 3\n").collect();
        assert_eq!(
            cpu,
            [("usage_usec", 10), ("user_usec", 7), ("system_usec", 3)]
        );
        let io = parse_io_stat(
            "8:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n\
             8:16 rbytes=1 wbytes=2 rios=3 wios=4\n",
        );
        assert_eq!(
            (io.read_bytes, io.write_bytes, io.read_ios, io.write_ios),
            (101, 202, 4, 6)
        );
    }

    #[test]
    fn relative_path_under_root() {
        let cg = Cgroup::new(Path::new("/podvisor/c1"));
        assert_eq!(cg.path(), Path::new("/sys/fs/cgroup/podvisor/c1"));
        assert_eq!(cg.relative, Path::new("podvisor/c1"));
    }
}
