//! The pod's host cgroup: the shim process (VMM, vCPU and worker threads) joins the cgroup
//! the sandbox's spec names (`linux.cgroupsPath`, which the CRI plugin sets from the
//! kubelet's pod cgroup), so that the node's accounting of the pod (`memory.current` /
//! `memory.usage_in_bytes`, `cpu.stat` / `cpuacct.usage`) includes guest RAM and vCPU time.
//! Container limits stay in the guest.
//!
//! Works on cgroup v2, v1 and hybrid hosts: the process joins the path in every mounted
//! hierarchy (v1: each controller's mount, named ones such as `name=systemd` included;
//! v2: the unified mount), creating the directories that do not exist (a new v1 cpuset
//! gets its parent's CPUs and memory nodes, or nobody could join it). Leaving moves the
//! process back to where it was and removes what was created, deepest first.
//!
//! Both drivers' paths are handled: cgroupfs (`/kubepods/burstable/pod<uid>/<id>`) as is,
//! systemd (`slice:prefix:name`, e.g. `kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`)
//! expanded the way systemd lays slices out: `/kubepods.slice/kubepods-burstable.slice/
//! kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope` ([`expand_systemd`]).
//! runc asks systemd over D-Bus to create that scope; the shim creates the scope's
//! directory itself inside the pod slice the kubelet had systemd make (a VM process needs
//! no unit of its own, and the shim removes the directory when it leaves): the kubelet's
//! accounting of the slice sees the VM either way, without a D-Bus client in the shim.

use std::path::{Component, Path, PathBuf};

/// Why the pod could not join its cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "cgroupsPath {0:?} is not a systemd-driver path `<name>.slice:<prefix>:<name>` \
         (slice names are dash-separated levels, e.g. kubepods-burstable-pod1.slice)"
    )]
    SystemdPath(String),
    #[error("cgroupsPath {0:?} is not an absolute path without `..`")]
    BadPath(String),
    #[error("no cgroup hierarchy is mounted (read /proc/self/mountinfo)")]
    NoHierarchy,
    #[error("cgroup {path}: {what}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One mounted hierarchy: where it is mounted, and which cgroup of it a process is in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    mount: PathBuf,
    /// The mount's root within the hierarchy (`/` unless a sub-tree is mounted).
    root: PathBuf,
    /// v1: the mount's options, among them its controllers (`cpu`, `cpuacct`) or name
    /// (`name=systemd`); `None` for v2.
    v1_options: Option<Vec<String>>,
}

impl Hierarchy {
    fn is_cpuset(&self) -> bool {
        self.v1_options
            .as_ref()
            .is_some_and(|o| o.iter().any(|c| c == "cpuset"))
    }

    /// Whether a `/proc/<pid>/cgroup` line's controller field (`cpuacct,cpu`,
    /// `name=systemd`, empty for v2) names this hierarchy: v1 controllers are all among the
    /// mount's options (which also hold `rw`, `xattr`, ...).
    fn is_named_by(&self, controllers: &str) -> bool {
        match &self.v1_options {
            None => controllers.is_empty(),
            Some(options) => {
                !controllers.is_empty()
                    && controllers
                        .split(',')
                        .all(|c| options.iter().any(|o| o == c))
            }
        }
    }
}

/// The cgroup mounts in `mountinfo` text.
fn hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rest: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(mount), Some(fstype)) = (fields.get(3), fields.get(4), rest.first())
        else {
            continue;
        };
        let v1_options = match *fstype {
            "cgroup2" => None,
            "cgroup" => Some(
                rest.get(2)
                    .copied()
                    .unwrap_or("")
                    .split(',')
                    .map(str::to_string)
                    .collect(),
            ),
            _ => continue,
        };
        out.push(Hierarchy {
            mount: PathBuf::from(mount),
            root: PathBuf::from(root),
            v1_options,
        });
    }
    out
}

/// The cgroup a process is in within hierarchy `h` (from its `/proc/<pid>/cgroup`).
fn current(proc_cgroup: &str, h: &Hierarchy) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        h.is_named_by(controllers).then(|| PathBuf::from(path))
    })
}

/// The cgroup path of a systemd-driver `slice:prefix:name`: the slice's levels (systemd
/// nests `a-b-c.slice` in `a-b.slice` in `a.slice`; an empty slice is `system.slice`, `-.slice`
/// the root) and the scope `prefix-name.scope` (or `name` itself when it is a slice).
pub fn expand_systemd(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let bad = || CgroupError::SystemdPath(cgroups_path.to_string());
    let mut parts = cgroups_path.split(':');
    let (Some(slice), Some(prefix), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let plain = |s: &str| !s.is_empty() && !s.contains(['/', '\0']) && s != "." && s != "..";
    let mut path = PathBuf::from("/");
    if slice != "-.slice" {
        let stem = slice.strip_suffix(".slice").ok_or_else(bad)?;
        if !plain(stem) || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
            return Err(bad());
        }
        let mut level = String::new();
        for part in stem.split('-') {
            if !level.is_empty() {
                level.push('-');
            }
            level.push_str(part);
            path.push(format!("{level}.slice"));
        }
    }
    if !plain(name) || (!prefix.is_empty() && !plain(prefix)) {
        return Err(bad());
    }
    if name.ends_with(".slice") {
        path.push(name);
    } else if prefix.is_empty() {
        path.push(format!("{name}.scope"));
    } else {
        path.push(format!("{prefix}-{name}.scope"));
    }
    Ok(path)
}

/// `cgroups_path` checked: an absolute path without `..` (cgroupfs driver), or a
/// systemd-driver path expanded ([`expand_systemd`]).
fn checked(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    if !cgroups_path.starts_with('/') && cgroups_path.contains(':') {
        return expand_systemd(cgroups_path);
    }
    let path = PathBuf::from(cgroups_path);
    let clean = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !clean {
        return Err(CgroupError::BadPath(cgroups_path.to_string()));
    }
    Ok(path)
}

/// The directory of cgroup `path` in hierarchy `h` (`None` when the mount does not
/// contain it).
fn dir_of(h: &Hierarchy, path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix(&h.root).ok()?;
    Some(h.mount.join(rel))
}

/// A process in the pod's cgroup: where it came from, and what was created for it.
#[derive(Debug)]
pub struct PodCgroup {
    pid: u32,
    /// (the cgroup.procs to move back to, the cgroup's directory) per hierarchy joined.
    joined: Vec<(PathBuf, PathBuf)>,
    /// Directories created, in creation order.
    created: Vec<PathBuf>,
}

impl PodCgroup {
    /// Moves process `pid` (with all its threads) into `cgroups_path` in every hierarchy.
    /// On failure it is where it was and nothing created is left.
    pub fn join(pid: u32, cgroups_path: &str) -> Result<PodCgroup, CgroupError> {
        let path = checked(cgroups_path)?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io("read", Path::new("/proc/self/mountinfo")))?;
        let hierarchies = hierarchies(&mountinfo);
        if hierarchies.is_empty() {
            return Err(CgroupError::NoHierarchy);
        }
        let proc_cgroup = format!("/proc/{pid}/cgroup");
        let before =
            std::fs::read_to_string(&proc_cgroup).map_err(io("read", Path::new(&proc_cgroup)))?;
        let mut cg = PodCgroup {
            pid,
            joined: Vec::new(),
            created: Vec::new(),
        };
        for h in &hierarchies {
            let (Some(from), Some(dir)) = (
                current(&before, h).and_then(|c| dir_of(h, &c)),
                dir_of(h, &path),
            ) else {
                continue;
            };
            if let Err(e) = cg.enter(h, &dir, &from) {
                cg.leave();
                return Err(e);
            }
        }
        Ok(cg)
    }

    fn enter(&mut self, h: &Hierarchy, dir: &Path, from: &Path) -> Result<(), CgroupError> {
        // Create the missing levels, top down.
        let missing: Vec<&Path> = dir
            .ancestors()
            .take_while(|d| *d != h.mount && !d.exists())
            .collect();
        for d in missing.into_iter().rev() {
            std::fs::create_dir(d).map_err(io("create", d))?;
            self.created.push(d.to_path_buf());
            if h.is_cpuset() {
                if let Some(parent) = d.parent() {
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let value = std::fs::read_to_string(parent.join(file))
                            .map_err(io("read", &parent.join(file)))?;
                        std::fs::write(d.join(file), value.trim())
                            .map_err(io("write", &d.join(file)))?;
                    }
                }
            }
        }
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, self.pid.to_string()).map_err(io("join", &procs))?;
        self.joined
            .push((from.join("cgroup.procs"), dir.to_path_buf()));
        Ok(())
    }

    /// Moves the process back where it came from and removes the directories created for
    /// it (those still holding other processes stay, logged).
    pub fn leave(&mut self) {
        for (back, _) in self.joined.drain(..) {
            if let Err(e) = std::fs::write(&back, self.pid.to_string()) {
                log::warn!("cgroup: moving back to {}: {e}", back.display());
            }
        }
        for d in self.created.drain(..).rev() {
            if let Err(e) = std::fs::remove_dir(&d) {
                log::warn!("cgroup: removing {}: {e}", d.display());
            }
        }
    }

    /// After a shim died in its pod's cgroup: removes that (now empty) cgroup in every
    /// hierarchy. Its parents are left: the kubelet (or another pod) may own them.
    pub fn remove_leftover(cgroups_path: &str) -> Result<(), CgroupError> {
        let path = checked(cgroups_path)?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io("read", Path::new("/proc/self/mountinfo")))?;
        for dir in hierarchies(&mountinfo)
            .iter()
            .filter_map(|h| dir_of(h, &path))
        {
            match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(CgroupError::Io {
                        what: "remove",
                        path: dir,
                        source: e,
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The cgroup directories the process is in, one per hierarchy.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.joined.iter().map(|(_, d)| d.as_path())
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:8 - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/cpuset rw,relatime shared:9 - cgroup cgroup rw,cpuset,clone_children
35 30 0:31 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,release_agent=/x,name=systemd
36 25 0:32 / /proc rw - proc proc rw";

    #[test]
    fn finds_every_hierarchy_v1_v2_and_named() {
        let h = hierarchies(MOUNTINFO);
        let mounts: Vec<&Path> = h.iter().map(|h| h.mount.as_path()).collect();
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/unified",
                "/sys/fs/cgroup/cpu,cpuacct",
                "/sys/fs/cgroup/cpuset",
                "/sys/fs/cgroup/systemd"
            ]
            .map(Path::new)
        );
        assert!(h[2].is_cpuset() && !h[1].is_cpuset());
        // Each one is found in a process's cgroups, whatever other options it was
        // mounted with (xattr, clone_children, release_agent=...).
        let proc_cgroup = "4:memory:/m\n3:name=systemd:/s\n2:cpuacct,cpu:/c\n1:cpuset:/x\n0::/d\n";
        let found: Vec<Option<PathBuf>> = h.iter().map(|h| current(proc_cgroup, h)).collect();
        assert_eq!(
            found,
            [Some("/d"), Some("/c"), Some("/x"), Some("/s")].map(|p| p.map(PathBuf::from))
        );
    }

    #[test]
    fn reads_a_process_cgroup_per_hierarchy() {
        let h = hierarchies(MOUNTINFO);
        let proc_cgroup = "4:memory:/a/b\n2:cpuacct,cpu:/c\n0::/d\n";
        assert_eq!(current(proc_cgroup, &h[1]), Some("/c".into()));
        assert_eq!(current(proc_cgroup, &h[0]), Some("/d".into()));
        // No line for it: the hierarchy is skipped.
        assert_eq!(current(proc_cgroup, &h[2]), None);
        // A controller the mount does not have never matches.
        assert_eq!(current("2:cpu,memory:/z\n", &h[1]), None);
    }

    #[test]
    fn checks_paths() {
        assert!(checked("/kubepods/burstable/pod1/abc").is_ok());
        assert_eq!(
            checked("kubepods-burstable-pod1.slice:cri-containerd:abc").unwrap(),
            Path::new(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope"
            )
        );
        for (systemd, path) in [
            ("-.slice:p:x", "/p-x.scope"),
            (":cri-containerd:x", "/system.slice/cri-containerd-x.scope"),
            ("a.slice::x", "/a.slice/x.scope"),
            ("a-b.slice:p:c.slice", "/a.slice/a-b.slice/c.slice"),
        ] {
            assert_eq!(checked(systemd).unwrap(), Path::new(path), "{systemd}");
        }
        for bad in [
            "pod.slice:p",
            "pod.slice:p:x:y",
            "pod:p:x",
            "a--b.slice:p:x",
            "-a.slice:p:x",
            "a/b.slice:p:x",
            "a.slice:p:..",
            "a.slice:p:",
            "a.slice:p/q:x",
        ] {
            assert!(
                matches!(checked(bad), Err(CgroupError::SystemdPath(_))),
                "{bad}"
            );
        }
        for bad in ["relative/x", "/a/../b", ""] {
            assert!(
                matches!(checked(bad), Err(CgroupError::BadPath(_))),
                "{bad}"
            );
        }
    }

    /// As root on a host with cgroups: a child process joins a new cgroup tree in every
    /// hierarchy and leaves it; nothing created is left.
    #[test]
    fn a_process_joins_and_leaves_the_pod_cgroup() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: needs root");
            return;
        }
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let path = format!("/podvisor-test-{}/pod/sandbox", std::process::id());
        // The systemd driver's form lands in a scope of the slice's tree.
        let systemd = format!("podvisortest{}-pod.slice:cri:sb", std::process::id());
        let cg = PodCgroup::join(child.id(), &systemd).unwrap();
        let scope = format!(
            "/podvisortest{0}.slice/podvisortest{0}-pod.slice/cri-sb.scope",
            std::process::id()
        );
        let now = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        for line in now.lines() {
            assert!(line.ends_with(&scope), "{line} after joining {systemd}");
        }
        drop(cg);
        let after = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(!after.contains("podvisortest"), "{after}");

        let cg = PodCgroup::join(child.id(), &path).unwrap();
        let dirs: Vec<PathBuf> = cg.dirs().map(Path::to_path_buf).collect();
        assert!(!dirs.is_empty());
        let now = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        for line in now.lines() {
            assert!(line.ends_with(&path), "{line} after joining {path}");
        }
        for d in &dirs {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(procs.lines().any(|p| p == child.id().to_string()), "{d:?}");
        }
        // A leftover of a dead process is removed by `shim delete`; an empty path is
        // nothing to remove.
        drop(cg);
        let after = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(!after.contains("podvisor-test"), "{after}");
        for d in &dirs {
            assert!(!d.exists(), "{d:?} left");
            assert!(
                !d.parent().unwrap().parent().unwrap().exists(),
                "{d:?}'s tree left"
            );
        }
        // `shim delete` after a crash: the process gone, its cgroup is removed.
        let leftover = PodCgroup::join(child.id(), &path).unwrap();
        std::mem::forget(leftover);
        child.kill().unwrap();
        child.wait().unwrap();
        PodCgroup::remove_leftover(&path).unwrap();
        for d in &dirs {
            assert!(!d.exists(), "{d:?} left after remove_leftover");
            // Its parents are not ours to remove here.
            let _ = std::fs::remove_dir(d.parent().unwrap());
            let _ = std::fs::remove_dir(d.parent().unwrap().parent().unwrap());
        }
    }
}
