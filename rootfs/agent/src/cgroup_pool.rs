//! Container cgroups made ahead of time.
//!
//! Creating a cgroup v2 directory with the memory, cpu, io and pids controllers enabled
//! allocates a controller state per controller, the most expensive step of a container's
//! creation after its processes (about 0.3 s where the guest kernel is emulated; natively
//! it is still the slowest single syscall of a create). A pod's VM is a copy of a template
//! taken once the agent is ready, so cgroups made before that are free for every pod: the
//! pool keeps `target` empty cgroups, named `<parent>/ctr-<n>`, and a CreateContainer takes
//! one instead of having libcontainer create `<parent>/<id>` (the name means nothing
//! outside the guest: the host knows containers by id, the agent keeps id → cgroup).
//!
//! Rules: a spare is an empty cgroup, made the way libcontainer makes one (every
//! available controller enabled in the root's and the parent's `cgroup.subtree_control`,
//! then `mkdir`); it is handed out once and never reused (a used cgroup keeps counters
//! such as `memory.peak` and `memory.events`); refills run on one background thread, only
//! after creates have been quiet for [`REFILL_AFTER`], so a refill never competes with a
//! pod's start for the guest's vCPU.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::cgroup::CGROUP_ROOT;

/// Quiet time after the last take before spares are made again.
pub const REFILL_AFTER: Duration = Duration::from_secs(2);

/// Pre-made container cgroups under one parent.
pub struct CgroupPool {
    /// The cgroup v2 mount (`/sys/fs/cgroup`).
    root: PathBuf,
    /// The parent, relative to `root` (e.g. `podvisor`).
    parent: String,
    target: usize,
    spares: Mutex<Vec<String>>,
    next: AtomicU64,
    /// When the last spare was taken (None: nothing to refill).
    taken: Mutex<Option<Instant>>,
    wake: Condvar,
    stopped: AtomicBool,
}

impl CgroupPool {
    /// A pool of `target` spares under `<root>/<parent>`; none made yet.
    pub fn new(root: &Path, parent: &str, target: usize) -> Arc<Self> {
        Arc::new(Self {
            root: root.to_path_buf(),
            parent: parent.trim_matches('/').to_string(),
            target,
            spares: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            taken: Mutex::new(None),
            wake: Condvar::new(),
            stopped: AtomicBool::new(false),
        })
    }

    /// The pool of the guest's cgroup v2 mount.
    pub fn guest(parent: &str, target: usize) -> Arc<Self> {
        Self::new(Path::new(CGROUP_ROOT), parent, target)
    }

    fn spares(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.spares.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes spares until the pool holds `target`; returns how many it holds.
    pub fn fill(&self) -> usize {
        while self.spares().len() < self.target && !self.stopped.load(Ordering::Relaxed) {
            match self.make_one() {
                Ok(relative) => self.spares().push(relative),
                Err(err) => {
                    log::warn!("cgroup pool: cannot make a spare cgroup: {err}");
                    break;
                }
            }
        }
        self.spares().len()
    }

    fn make_one(&self) -> std::io::Result<String> {
        let parent = self.root.join(&self.parent);
        ensure_cgroup(&self.root, &parent)?;
        enable_controllers(&parent);
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let relative = format!("{}/ctr-{n}", self.parent);
            match fs::create_dir(self.root.join(&relative)) {
                Ok(()) => return Ok(relative),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// A spare cgroup, relative to the root (`<parent>/ctr-<n>`), if one is ready; the
    /// refill thread makes another once creates are quiet.
    pub fn take(&self) -> Option<String> {
        let spare = self.spares().pop();
        if self.target > 0 {
            *self.taken.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            self.wake.notify_all();
        }
        spare
    }

    /// Starts the refill thread (none for an empty target).
    pub fn start_refills(self: &Arc<Self>) -> std::io::Result<()> {
        if self.target == 0 {
            return Ok(());
        }
        let pool = self.clone();
        crate::stream::spawn_small("cgroup-pool".into(), move || pool.refill_loop())
    }

    fn refill_loop(&self) {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        while !self.stopped.load(Ordering::Relaxed) {
            match *taken {
                None => {
                    taken = self.wake.wait(taken).unwrap_or_else(|e| e.into_inner());
                }
                Some(at) if at.elapsed() < REFILL_AFTER => {
                    let left = REFILL_AFTER.saturating_sub(at.elapsed());
                    taken = self
                        .wake
                        .wait_timeout(taken, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                Some(_) => {
                    *taken = None;
                    drop(taken);
                    self.fill();
                    taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Stops refilling and removes the spares (the sandbox is going away).
    pub fn drain(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.wake.notify_all();
        for relative in std::mem::take(&mut *self.spares()) {
            let _ = fs::remove_dir(self.root.join(relative));
        }
    }
}

/// Enables every available controller for the children of `dir` (best effort, as
/// libcontainer does: one that cannot be enabled fails its limits later).
fn enable_controllers(dir: &Path) {
    for (controller, err) in crate::cgroup::enable_controllers(dir) {
        log::debug!("cannot enable {controller} in {}: {err}", dir.display());
    }
}

/// Makes cgroup `dir` (under the cgroup v2 mount `root`) as libcontainer would: every
/// available controller enabled for the children of each ancestor, missing directories
/// created. An existing `dir` (a spare) is left as it is.
pub fn ensure_cgroup(root: &Path, dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let relative = dir.strip_prefix(root).map_err(|_| {
        std::io::Error::other(format!("{} is not under {}", dir.display(), root.display()))
    })?;
    let mut current = root.to_path_buf();
    for component in relative.components() {
        enable_controllers(&current);
        current.push(component);
        match fs::create_dir(&current) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup root: directories and plain files (no controllers to enable).
    fn fake_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "").unwrap();
        dir
    }

    #[test]
    fn spares_are_made_up_to_the_target_and_handed_out_once() {
        let root = fake_root();
        let pool = CgroupPool::new(root.path(), "/pod/", 2);
        assert_eq!(pool.fill(), 2);
        assert_eq!(pool.fill(), 2, "filling a full pool makes nothing");
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("pod/ctr-"), "{a}");
        assert!(root.path().join(&a).is_dir());
        assert_eq!(pool.take(), None, "empty until refilled");
        assert_eq!(pool.fill(), 2);
        let c = pool.take().unwrap();
        assert!(c != a && c != b, "a used name is never handed out again");
    }

    #[test]
    fn a_name_in_use_is_skipped_and_drain_removes_the_spares() {
        let root = fake_root();
        fs::create_dir_all(root.path().join("pod/ctr-0")).unwrap();
        let pool = CgroupPool::new(root.path(), "pod", 1);
        assert_eq!(pool.fill(), 1);
        assert_eq!(pool.spares()[0], "pod/ctr-1");
        pool.drain();
        assert!(!root.path().join("pod/ctr-1").exists());
        assert!(root.path().join("pod/ctr-0").exists(), "not ours");
        assert_eq!(pool.fill(), 0, "a drained pool stays empty");
    }

    #[test]
    fn a_cgroup_is_made_with_its_ancestors_and_a_spare_is_kept() {
        let root = fake_root();
        let dir = root.path().join("pod/c1");
        ensure_cgroup(root.path(), &dir).unwrap();
        assert!(dir.is_dir());
        ensure_cgroup(root.path(), &dir).unwrap();
        assert!(ensure_cgroup(root.path(), Path::new("/elsewhere/x")).is_err());
    }

    #[test]
    fn no_target_no_spares() {
        let root = fake_root();
        let pool = CgroupPool::new(root.path(), "pod", 0);
        assert_eq!(pool.fill(), 0);
        assert_eq!(pool.take(), None);
        assert!(pool.start_refills().is_ok());
    }

    #[test]
    fn refills_wait_for_quiet() {
        let root = fake_root();
        let pool = CgroupPool::new(root.path(), "pod", 1);
        pool.fill();
        pool.start_refills().unwrap();
        assert!(pool.take().is_some());
        std::thread::sleep(REFILL_AFTER / 2);
        assert_eq!(pool.spares().len(), 0, "no refill right after a take");
        let deadline = Instant::now() + REFILL_AFTER * 5;
        while pool.spares().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(pool.spares().len(), 1, "refilled once quiet");
        pool.drain();
    }
}
