//! The lean container launcher: a container's init process made with one `clone3` and a
//! short run of syscalls, for the specs a pod's containers have (new namespaces only, the
//! usual mounts), instead of libcontainer's three processes and its checks through
//! `/proc` around every mount. Where the guest kernel is emulated each syscall costs
//! about a millisecond and libcontainer's create makes over a thousand; natively both are
//! cheap, and the lean path is simply fewer processes and syscalls.
//!
//! Rules it enforces:
//! - [`plan`] accepts a spec only if every field it names is one this launcher implements
//!   (namespaces without paths: pid, ipc, uts, mount, cgroup; the mount types and options
//!   of [`mount_flags`]; a tmpfs `/dev`; no seccomp, terminal, sysctl, devices, hooks,
//!   user namespace, scheduler or personality): anything else is [`Unsupported`] and the
//!   container is made by libcontainer, so a spec is never half honoured.
//! - Everything the child needs is built before the clone ([`Prepared`]): the child, a
//!   fork of a multi-threaded process, allocates nothing and takes no lock; it reports a
//!   failure as a (step, errno) record on its ready pipe and exits.
//! - Paths inside the container's root are resolved with `openat2(RESOLVE_IN_ROOT)`, so
//!   symlinks in the image cannot point a mount outside the root; mounts go onto the
//!   resolved descriptor (`/proc/self/fd/N`).
//! - The init process does what libcontainer's does, in the same order: namespaces
//!   (clone flags, into the container's cgroup), hostname, root propagation, rootfs bind,
//!   spec mounts, default devices and /dev symlinks, pivot_root, read-only root, masked
//!   and read-only paths, rlimits, oom_score_adj, no_new_privs, cwd, groups and ids,
//!   capabilities, signal reset; it then checks the executable, reports ready, and waits
//!   for StartContainer (a byte on its start pipe) to `execve` it. libcontainer's state
//!   files are written for it ([`crate::container`]), so exec, kill and delete go through
//!   libcontainer as for any container.

use std::ffi::{c_int, c_ulong, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path};
use std::time::Duration;

use libcontainer::capabilities::CapabilityExt;
use oci_spec::runtime::{LinuxNamespaceType, Mount, PosixRlimitType, Spec};

/// Why a spec goes to libcontainer instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

fn unsupported<T>(what: impl Into<String>) -> Result<T, Unsupported> {
    Err(Unsupported(what.into()))
}

/// `CLONE_INTO_CGROUP` (Linux 5.7), not in the libc crate.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// One mount of the spec, ready for the child.
#[derive(Debug)]
struct PreMount {
    /// The destination, relative to the container's root ("dev/pts").
    target: CString,
    /// The target is a file (a bind of a file): created as an empty file.
    file: bool,
    source: Option<CString>,
    fstype: Option<CString>,
    flags: c_ulong,
    data: Option<CString>,
    /// Flags of the read-only/nosuid/... remount a bind needs.
    remount: Option<c_ulong>,
    /// A propagation change after the mount.
    propagation: Option<c_ulong>,
}

/// Capability sets as bit masks (bit n = capability n).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Caps {
    bounding: u64,
    effective: u64,
    permitted: u64,
    inheritable: u64,
    ambient: u64,
}

/// What the child needs, built before the clone.
#[derive(Debug)]
pub struct Prepared {
    clone_flags: u64,
    hostname: Option<CString>,
    domainname: Option<CString>,
    root_propagation: c_ulong,
    root_propagation_after: Option<c_ulong>,
    rootfs: CString,
    mounts: Vec<PreMount>,
    /// Create the default devices and /dev symlinks (the spec mounts a tmpfs on /dev).
    dev_tmpfs: bool,
    /// Add the /dev/core symlink (the guest has /proc/kcore).
    kcore: bool,
    /// The highest capability the kernel knows.
    last_cap: u32,
    root_readonly: bool,
    masked: Vec<CString>,
    readonly: Vec<CString>,
    rlimits: Vec<(c_int, libc::rlimit)>,
    oom_score_adj: Option<CString>,
    no_new_privs: bool,
    umask: libc::mode_t,
    cwd: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    caps: Option<Caps>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// Where the executable may be, in PATH order (one entry for a name with a '/').
    candidates: Vec<CString>,
}

/// The steps of the child, for error messages (index = step code).
const STEPS: &[&str] = &[
    "ready",
    "setting up stdio",
    "setsid",
    "setting the host or domain name",
    "setting the root's mount propagation",
    "bind-mounting the rootfs",
    "opening the rootfs",
    "resolving a mount target in the rootfs",
    "creating a mount target in the rootfs",
    "mounting a spec mount",
    "remounting a bind mount",
    "setting a mount's propagation",
    "creating a default device",
    "creating a /dev symlink",
    "pivot_root",
    "detaching the old root",
    "remounting the root read-only",
    "masking a path",
    "making a path read-only",
    "setting an rlimit",
    "writing oom_score_adj",
    "setting no_new_privs",
    "changing to the working directory",
    "setting groups",
    "setting the gid",
    "setting the uid",
    "setting capabilities",
    "dropping a bounding capability",
    "raising an ambient capability",
    "finding the executable",
    "closing descriptors",
    "adjusting the root's propagation",
    "executing the container's process",
];

#[derive(Clone, Copy)]
#[repr(u32)]
enum Step {
    Stdio = 1,
    Setsid,
    Hostname,
    RootPropagation,
    RootfsBind,
    RootfsOpen,
    Resolve,
    Create,
    Mount,
    Remount,
    Propagation,
    Device,
    Symlink,
    PivotRoot,
    Detach,
    RootReadonly,
    Mask,
    Readonly,
    Rlimit,
    OomScore,
    NoNewPrivs,
    Cwd,
    Groups,
    Gid,
    Uid,
    Capset,
    Bounding,
    Ambient,
    FindExecutable,
    CloseFds,
    RootPropagationAfter,
    Exec,
}

/// A child's failure: the step and the errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildFailure {
    pub step: u32,
    pub errno: i32,
}

impl std::fmt::Display for ChildFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let step = usize::try_from(self.step)
            .ok()
            .and_then(|i| STEPS.get(i))
            .unwrap_or(&"an unknown step");
        write!(
            f,
            "{step}: {}",
            std::io::Error::from_raw_os_error(self.errno)
        )
    }
}

/// The OCI mount options that are mount flags: (option, flags it sets, flags it clears).
const FLAG_OPTIONS: &[(&str, c_ulong, c_ulong)] = &[
    ("ro", libc::MS_RDONLY, 0),
    ("rw", 0, libc::MS_RDONLY),
    ("nosuid", libc::MS_NOSUID, 0),
    ("suid", 0, libc::MS_NOSUID),
    ("nodev", libc::MS_NODEV, 0),
    ("dev", 0, libc::MS_NODEV),
    ("noexec", libc::MS_NOEXEC, 0),
    ("exec", 0, libc::MS_NOEXEC),
    ("sync", libc::MS_SYNCHRONOUS, 0),
    ("async", 0, libc::MS_SYNCHRONOUS),
    ("dirsync", libc::MS_DIRSYNC, 0),
    ("noatime", libc::MS_NOATIME, 0),
    ("atime", 0, libc::MS_NOATIME),
    ("nodiratime", libc::MS_NODIRATIME, 0),
    ("diratime", 0, libc::MS_NODIRATIME),
    ("relatime", libc::MS_RELATIME, 0),
    ("norelatime", 0, libc::MS_RELATIME),
    ("strictatime", libc::MS_STRICTATIME, 0),
    ("nostrictatime", 0, libc::MS_STRICTATIME),
];

fn flag_option(word: &str) -> Option<(c_ulong, c_ulong)> {
    FLAG_OPTIONS
        .iter()
        .find(|(name, _, _)| *name == word)
        .map(|&(_, set, clear)| (set, clear))
}

/// Mount flags and data of OCI mount `options`; `None` for an option this launcher does
/// not implement (the spec goes to libcontainer).
pub fn mount_flags(options: &[String]) -> Option<(c_ulong, Option<c_ulong>, Vec<String>)> {
    let mut flags: c_ulong = 0;
    let mut propagation = None;
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            word if flag_option(word).is_some() => flag_option(word)?,
            "bind" => (libc::MS_BIND, 0),
            "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
            "private" | "rprivate" | "slave" | "rslave" | "unbindable" | "runbindable" => {
                let rec = if o.starts_with('r') { libc::MS_REC } else { 0 };
                let kind = match o.trim_start_matches('r') {
                    "private" => libc::MS_PRIVATE,
                    "slave" => libc::MS_SLAVE,
                    _ => libc::MS_UNBINDABLE,
                };
                propagation = Some(kind | rec);
                (0, 0)
            }
            // Shared propagation needs the peer-group handling libcontainer does.
            "shared" | "rshared" => return None,
            // Mount-API-only or runtime-specific options.
            "tmpcopyup" | "idmap" | "ridmap" | "remount" | "mand" | "nomand" | "recursive" => {
                return None
            }
            // Recursive flags (rro, rnosuid, ...) need mount_setattr.
            other
                if other.len() > 1
                    && other.starts_with('r')
                    && flag_option(&other[1..]).is_some() =>
            {
                return None
            }
            other => {
                data.push(other.to_string());
                (0, 0)
            }
        };
        flags |= set;
        flags &= !clear;
    }
    Some((flags, propagation, data))
}

/// A namespace flag of `clone(2)` as clone3's 64-bit flags.
fn ns_flag(flag: c_int) -> u64 {
    u64::from(flag.cast_unsigned())
}

fn cstr(s: impl Into<Vec<u8>>, what: &str) -> Result<CString, Unsupported> {
    CString::new(s).or_else(|_| unsupported(format!("{what} holds a NUL byte")))
}

/// The relative components of an absolute container path ("/dev/pts" → dev, pts); `..`
/// is refused (a mount destination is a clean absolute path).
fn components(path: &Path) -> Result<Vec<String>, Unsupported> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n.to_string_lossy().into_owned()),
            _ => return unsupported(format!("mount destination {} has '..'", path.display())),
        }
    }
    Ok(out)
}

fn pre_mount(m: &Mount) -> Result<PreMount, Unsupported> {
    let dest = m.destination();
    let parts = components(dest)?;
    if parts.is_empty() {
        return unsupported("a mount on /");
    }
    let options = m.options().clone().unwrap_or_default();
    let (mut flags, propagation, data) = mount_flags(&options)
        .ok_or_else(|| Unsupported(format!("mount {}: options {options:?}", dest.display())))?;
    let typ = m.typ().clone().unwrap_or_default();
    let bind = flags & libc::MS_BIND != 0 || typ == "bind";
    if bind {
        flags |= libc::MS_BIND;
    }
    let fstype = match typ.as_str() {
        _ if bind => None,
        "proc" | "tmpfs" | "devpts" | "mqueue" | "sysfs" | "cgroup2" => Some(typ.clone()),
        // cgroup v2 only in the guest: libcontainer mounts cgroup2 for it as well.
        "cgroup" => Some("cgroup2".to_string()),
        other => return unsupported(format!("mount type {other:?}")),
    };
    let source = m
        .source()
        .as_ref()
        .map(|s| s.to_string_lossy().into_owned());
    if bind && source.is_none() {
        return unsupported(format!("bind mount {} without a source", dest.display()));
    }
    // A bind's source is an agent or share path (the shim rewrote host paths); a file
    // source needs a file target.
    let file = bind && source.as_deref().is_some_and(|s| Path::new(s).is_file());
    let remount_mask = libc::MS_RDONLY
        | libc::MS_NOSUID
        | libc::MS_NODEV
        | libc::MS_NOEXEC
        | libc::MS_NOATIME
        | libc::MS_NODIRATIME
        | libc::MS_RELATIME
        | libc::MS_STRICTATIME;
    let remount = (bind && flags & remount_mask != 0)
        .then_some(libc::MS_BIND | libc::MS_REMOUNT | (flags & remount_mask));
    Ok(PreMount {
        target: cstr(parts.join("/"), "a mount destination")?,
        file,
        source: source.map(|s| cstr(s, "a mount source")).transpose()?,
        fstype: fstype.map(|t| cstr(t, "a mount type")).transpose()?,
        flags: if bind {
            flags & (libc::MS_BIND | libc::MS_REC)
        } else {
            flags
        },
        data: (!data.is_empty() && !bind)
            .then(|| cstr(data.join(","), "mount options"))
            .transpose()?,
        remount,
        propagation,
    })
}

/// The RLIMIT_* number of an OCI rlimit type.
fn rlimit_resource(t: PosixRlimitType) -> c_int {
    // The libc constants are u32 on gnu; every value fits.
    let r = match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    };
    c_int::try_from(r).unwrap_or(c_int::MAX)
}

fn cap_mask(set: &Option<oci_spec::runtime::Capabilities>) -> u64 {
    set.as_ref()
        .map(|s| s.iter().fold(0u64, |m, c| m | c.to_cap().bitmask()))
        .unwrap_or(0)
}

/// Decides whether `spec` (adapted by the agent: root path, cgroups path, env) can be
/// launched lean, and builds what the child needs. If the env has no HOME, `home_of`
/// gives the process user's (the caller reads the image's /etc/passwd, [`home_of`]);
/// `/` if it has none.
pub fn plan(
    spec: &Spec,
    home_of: impl FnOnce(u32) -> Option<String>,
) -> Result<Prepared, Unsupported> {
    let process = spec
        .process()
        .as_ref()
        .ok_or(Unsupported("no process".into()))?;
    let linux = spec
        .linux()
        .as_ref()
        .ok_or(Unsupported("no linux".into()))?;
    let root = spec.root().as_ref().ok_or(Unsupported("no root".into()))?;
    if process.terminal().unwrap_or(false) {
        return unsupported("a terminal");
    }
    if linux.seccomp().is_some() {
        return unsupported("a seccomp profile");
    }
    if linux.sysctl().as_ref().is_some_and(|s| !s.is_empty()) {
        return unsupported("sysctls");
    }
    if linux.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        return unsupported("extra devices");
    }
    if spec.hooks().is_some() {
        return unsupported("hooks");
    }
    if linux.uid_mappings().is_some() || linux.gid_mappings().is_some() {
        return unsupported("id mappings");
    }
    if linux.personality().is_some()
        || linux.intel_rdt().is_some()
        || linux.net_devices().is_some()
        || linux.memory_policy().is_some()
        || linux.time_offsets().is_some()
    {
        return unsupported("personality, RDT, net devices, memory policy or time offsets");
    }
    if process.apparmor_profile().is_some()
        || process.selinux_label().is_some()
        || process.scheduler().is_some()
        || process.io_priority().is_some()
        || process.exec_cpu_affinity().is_some()
        || linux.mount_label().is_some()
    {
        return unsupported("LSM labels, scheduler, I/O priority or CPU affinity");
    }
    let mut clone_flags = 0u64;
    for ns in linux.namespaces().as_deref().unwrap_or_default() {
        if ns
            .path()
            .as_ref()
            .is_some_and(|p| !p.as_os_str().is_empty())
        {
            return unsupported("a namespace joined by path");
        }
        clone_flags |= ns_flag(match ns.typ() {
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
            LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
            other => return unsupported(format!("a new {other:?} namespace")),
        });
    }
    if clone_flags & ns_flag(libc::CLONE_NEWNS) == 0 {
        return unsupported("no mount namespace");
    }
    let (root_propagation, root_propagation_after) = match linux.rootfs_propagation().as_deref() {
        None | Some("slave") | Some("rslave") => (libc::MS_SLAVE | libc::MS_REC, None),
        Some("private") | Some("rprivate") => (libc::MS_PRIVATE | libc::MS_REC, None),
        Some("unbindable") | Some("runbindable") => {
            (libc::MS_SLAVE | libc::MS_REC, Some(libc::MS_UNBINDABLE))
        }
        Some(other) => return unsupported(format!("rootfs propagation {other:?}")),
    };
    let mut mounts = Vec::new();
    let mut dev_tmpfs = false;
    for m in spec.mounts().as_deref().unwrap_or_default() {
        let pm = pre_mount(m)?;
        if m.destination() == Path::new("/dev") {
            if pm.fstype.as_deref().map(|t| t.to_bytes()) != Some(b"tmpfs") {
                return unsupported("a /dev that is not a tmpfs");
            }
            dev_tmpfs = true;
        }
        mounts.push(pm);
    }
    if !dev_tmpfs {
        return unsupported("no tmpfs on /dev (default devices would go into the image)");
    }
    let args = process.args().as_deref().unwrap_or_default();
    let Some(program) = args.first() else {
        return unsupported("no args");
    };
    let user = process.user();
    let mut env = process.env().clone().unwrap_or_default();
    // An empty HOME counts as none (as libcontainer and runc have it).
    env.retain(|e| e != "HOME=");
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let home = home_of(user.uid());
        env.push(format!("HOME={}", home.as_deref().unwrap_or("/")));
    }
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .map(str::to_string);
    let candidates: Vec<String> = if program.contains('/') {
        vec![program.clone()]
    } else {
        let Some(path_var) = path_var else {
            // libcontainer refuses this with a message of its own.
            return unsupported("no PATH in the environment");
        };
        path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
            .collect()
    };
    let caps = process.capabilities().as_ref().map(|c| Caps {
        bounding: cap_mask(c.bounding()),
        effective: cap_mask(c.effective()),
        permitted: cap_mask(c.permitted()),
        inheritable: cap_mask(c.inheritable()),
        ambient: cap_mask(c.ambient()),
    });
    let list = |v: &Option<Vec<String>>, what: &str| -> Result<Vec<CString>, Unsupported> {
        v.as_deref()
            .unwrap_or_default()
            .iter()
            .map(|p| cstr(p.as_str(), what))
            .collect()
    };
    let uts = clone_flags & ns_flag(libc::CLONE_NEWUTS) != 0;
    Ok(Prepared {
        clone_flags,
        hostname: match (spec.hostname(), uts) {
            (Some(h), true) => Some(cstr(h.as_str(), "the hostname")?),
            _ => None,
        },
        domainname: match (spec.domainname(), uts) {
            (Some(d), true) => Some(cstr(d.as_str(), "the domain name")?),
            (Some(_), false) => return unsupported("a domain name without a UTS namespace"),
            _ => None,
        },
        root_propagation,
        root_propagation_after,
        rootfs: cstr(root.path().as_os_str().as_encoded_bytes(), "the root path")?,
        mounts,
        dev_tmpfs,
        kcore: guest().kcore,
        last_cap: guest().last_cap,
        root_readonly: root.readonly().unwrap_or(false),
        masked: list(linux.masked_paths(), "a masked path")?,
        readonly: list(linux.readonly_paths(), "a read-only path")?,
        rlimits: process
            .rlimits()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|r| {
                (
                    rlimit_resource(r.typ()),
                    libc::rlimit {
                        rlim_cur: r.soft(),
                        rlim_max: r.hard(),
                    },
                )
            })
            .collect(),
        oom_score_adj: process
            .oom_score_adj()
            .map(|v| cstr(v.to_string(), "oom_score_adj"))
            .transpose()?,
        no_new_privs: process.no_new_privileges().unwrap_or(false),
        umask: user.umask().unwrap_or(0o022),
        cwd: cstr(
            process.cwd().as_os_str().as_encoded_bytes(),
            "the working directory",
        )?,
        uid: user.uid(),
        gid: user.gid(),
        groups: user.additional_gids().clone().unwrap_or_default(),
        caps,
        argv: args
            .iter()
            .map(|a| cstr(a.as_str(), "an argument"))
            .collect::<Result<_, _>>()?,
        envp: env
            .iter()
            .map(|e| cstr(e.as_str(), "an environment entry"))
            .collect::<Result<_, _>>()?,
        candidates: candidates
            .into_iter()
            .map(|c| cstr(c, "the executable path"))
            .collect::<Result<_, _>>()?,
    })
}

/// A launched init process, waiting for its start byte.
pub struct Launched {
    pub pid: i32,
    pub start: Starter,
}

/// What starts a launched init: a byte on its start pipe lets it `execve` (closing the pipe
/// unstarted makes it exit); the read end of its ready pipe, close-on-exec in the child,
/// then reaches EOF once `execve` succeeded, or brings a record saying why it failed.
pub struct Starter {
    start: OwnedFd,
    exec_done: OwnedFd,
}

impl Starter {
    /// Lets the init `execve`; [`Execing::wait`] then waits for it.
    pub fn release(self) -> std::io::Result<Execing> {
        let byte = [1u8];
        // SAFETY: writes one byte from `byte` to the start pipe this value owns.
        let n = unsafe { libc::write(self.start.as_raw_fd(), byte.as_ptr().cast(), 1) };
        if n != 1 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Execing {
            exec_done: self.exec_done,
        })
    }
}

/// A released init on its way through `execve`.
pub struct Execing {
    exec_done: OwnedFd,
}

impl Execing {
    /// Waits up to `timeout` for the init's `execve`: Ok once it succeeded (or if the wait
    /// timed out: the process may still be loading), the failure if it failed.
    pub fn wait(self, timeout: Duration) -> Result<(), LaunchError> {
        match read_report(&self.exec_done, Some(timeout), "waiting for execve")? {
            Report::Closed => Ok(()),
            Report::TimedOut => {
                log::warn!("the container's process did not finish execve within {timeout:?}");
                Ok(())
            }
            Report::Record(failure) => Err(LaunchError::Child(failure)),
        }
    }
}

/// What a child's ready pipe brought.
enum Report {
    /// A (step, errno) record: step 0 is "ready", any other a failure.
    Record(ChildFailure),
    /// Closed before any byte: the child exec'd (its end is close-on-exec) or exited.
    Closed,
    /// Nothing within the timeout.
    TimedOut,
}

/// Reads one 8-byte record of [`report`] from `fd`, waiting up to `timeout` (None: for as
/// long as it takes). A pipe closed in the middle of a record is [`LaunchError::ChildGone`].
fn read_report(
    fd: &OwnedFd,
    timeout: Option<Duration>,
    what: &'static str,
) -> Result<Report, LaunchError> {
    let io = |source| LaunchError::Io { what, source };
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let mut record = [0u8; 8];
    let mut got = 0;
    while got < record.len() {
        let ms = deadline.map_or(-1, |d| {
            let left = d.saturating_duration_since(std::time::Instant::now());
            c_int::try_from(left.as_millis()).unwrap_or(c_int::MAX)
        });
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            0 => return Ok(Report::TimedOut),
            r if r < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io(e));
            }
            _ => {}
        }
        // SAFETY: reads into the unfilled part of `record`.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                record[got..].as_mut_ptr().cast(),
                record.len() - got,
            )
        };
        match n {
            0 if got == 0 => return Ok(Report::Closed),
            0 => return Err(LaunchError::ChildGone),
            n if n > 0 => got += n.cast_unsigned(),
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return Err(io(std::io::Error::last_os_error())),
        }
    }
    let (step, errno) = decode(record);
    Ok(Report::Record(ChildFailure { step, errno }))
}

/// Errors of a launch (the spec was accepted).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the container's init process failed {0}")]
    Child(ChildFailure),
    #[error("the container's init process ended before it was ready")]
    ChildGone,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here only.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The kernel's `struct clone_args` (clone3).
#[repr(C)]
#[derive(Default)]
pub(crate) struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// `clone3(args)`: the child's pid in the parent, 0 in the child.
///
/// # Safety
/// Without `CLONE_VM` the child is a copy of this multi-threaded process: until it execs
/// or exits it may only make raw syscalls on data prepared before the call (no allocation,
/// no lock).
pub(crate) unsafe fn clone3(args: &CloneArgs) -> std::io::Result<libc::c_long> {
    // SAFETY: a valid clone_args of the size passed; the caller keeps the child's rules.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(pid)
}

impl Prepared {
    /// Clones the init process into `cgroup` (an open cgroup v2 directory) with `stdio`
    /// as its 0, 1 and 2, and waits until it is ready to exec. `register` runs with the
    /// child's pid before anything can reap it (the caller holds the reaper's lock).
    pub fn launch(
        &self,
        stdio: [RawFd; 3],
        cgroup: &OwnedFd,
        register: impl FnOnce(i32),
    ) -> Result<Launched, LaunchError> {
        let io = |what| move |source| LaunchError::Io { what, source };
        let (ready_r, ready_w) = pipe().map_err(io("a ready pipe"))?;
        let (start_r, start_w) = pipe().map_err(io("a start pipe"))?;
        // Pointer arrays built here: the child must not allocate.
        let argv: Vec<*const libc::c_char> = self
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const libc::c_char> = self
            .envp
            .iter()
            .map(|e| e.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let args = CloneArgs {
            flags: self.clone_flags | CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: u64::from(cgroup.as_raw_fd().cast_unsigned()),
            ..CloneArgs::default()
        };
        // SAFETY: the child runs `child`, which only makes syscalls on data prepared
        // above and never returns.
        let pid = unsafe { clone3(&args) }.map_err(io("clone3"))?;
        if pid == 0 {
            let ends = ChildFds {
                stdio,
                ready: ready_w.as_raw_fd(),
                start: start_r.as_raw_fd(),
            };
            child(self, &ends, &argv, &envp);
        }
        let pid = i32::try_from(pid).unwrap_or(i32::MAX);
        register(pid);
        drop(ready_w);
        drop(start_r);
        match read_report(&ready_r, None, "reading the ready pipe")? {
            Report::Record(ChildFailure { step: 0, .. }) => {}
            Report::Record(failure) => return Err(LaunchError::Child(failure)),
            Report::Closed | Report::TimedOut => return Err(LaunchError::ChildGone),
        }
        Ok(Launched {
            pid,
            start: Starter {
                start: start_w,
                exec_done: ready_r,
            },
        })
    }
}

struct ChildFds {
    stdio: [RawFd; 3],
    ready: RawFd,
    start: RawFd,
}

/// A failed step of the child.
struct Fail(Step, i32);

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(ret: libc::c_long, step: Step) -> Result<libc::c_long, Fail> {
    if ret < 0 {
        Err(Fail(step, errno()))
    } else {
        Ok(ret)
    }
}

fn check_int(ret: c_int, step: Step) -> Result<c_int, Fail> {
    if ret < 0 {
        Err(Fail(step, errno()))
    } else {
        Ok(ret)
    }
}

/// The (step, errno) of a record.
fn decode(record: [u8; 8]) -> (u32, i32) {
    let step = u32::from_ne_bytes([record[0], record[1], record[2], record[3]]);
    let errno = i32::from_ne_bytes([record[4], record[5], record[6], record[7]]);
    (step, errno)
}

/// Writes the 8-byte (step, errno) record; step 0 is "ready".
fn report(fd: RawFd, step: u32, errno: i32) {
    let mut record = [0u8; 8];
    record[..4].copy_from_slice(&step.to_ne_bytes());
    record[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: writes the record from a valid buffer; a failed write changes nothing.
    unsafe { libc::write(fd, record.as_ptr().cast(), record.len()) };
}

/// `/proc/self/fd/<fd>` in a stack buffer.
struct FdPath([u8; 32]);

impl FdPath {
    fn new(fd: RawFd) -> FdPath {
        let mut b = [0u8; 32];
        let prefix = b"/proc/self/fd/";
        b[..prefix.len()].copy_from_slice(prefix);
        let mut digits = [0u8; 12];
        let mut n = fd.unsigned_abs();
        let mut len = 0;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 || len == digits.len() {
                break;
            }
        }
        for i in 0..len {
            b[prefix.len() + i] = digits[len - 1 - i];
        }
        FdPath(b)
    }

    fn as_ptr(&self) -> *const libc::c_char {
        self.0.as_ptr().cast()
    }
}

/// The kernel's `struct open_how` (openat2; the libc crate's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`.
fn open_in_root(dir: RawFd, path: &std::ffi::CStr, flags: c_int) -> libc::c_long {
    let how = OpenHow {
        flags: u64::from((flags | libc::O_CLOEXEC).cast_unsigned()),
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a valid C string and a valid open_how of the size passed.
    unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    }
}

/// The child: never returns.
fn child(
    p: &Prepared,
    fds: &ChildFds,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    let code = match setup(p, fds) {
        Ok(exe) => {
            report(fds.ready, 0, 0);
            // Wait for StartContainer: a byte, or EOF if the container is removed first.
            let mut byte = 0u8;
            // SAFETY: reads one byte into `byte`.
            let n = unsafe { libc::read(fds.start, (&mut byte as *mut u8).cast(), 1) };
            if n == 1 {
                crate::container::reset_signals();
                // SAFETY: execve of a C string path with null-terminated argv/envp arrays
                // of C strings that live in `p` (this process's copy).
                unsafe { libc::execve(exe, argv.as_ptr(), envp.as_ptr()) };
                // Still here: execve failed. StartContainer reads why on the ready pipe
                // (whose end closes on a successful execve).
                report(fds.ready, Step::Exec as u32, errno());
                let msg = b"podvisor: cannot execute the container's process\n";
                // SAFETY: writes a static message to stderr.
                unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
                127
            } else {
                1
            }
        }
        Err(Fail(step, errno)) => {
            report(fds.ready, step as u32, errno);
            1
        }
    };
    // SAFETY: ends the child without running the parent's exit handlers.
    unsafe { libc::_exit(code) }
}

fn setup(p: &Prepared, fds: &ChildFds) -> Result<*const libc::c_char, Fail> {
    // SAFETY: each call below is a plain syscall on descriptors this child owns and on C
    // strings and buffers prepared before the clone.
    unsafe {
        for (target, &fd) in fds.stdio.iter().enumerate() {
            let target = c_int::try_from(target).unwrap_or(0);
            if fd != target {
                check_int(libc::dup2(fd, target), Step::Stdio)?;
            }
        }
        check_int(libc::setsid(), Step::Setsid)?;
        libc::umask(0);
        if let Some(h) = &p.hostname {
            check_int(
                libc::sethostname(h.as_ptr(), h.as_bytes().len()),
                Step::Hostname,
            )?;
        }
        if let Some(d) = &p.domainname {
            check_int(
                libc::setdomainname(d.as_ptr(), d.as_bytes().len()),
                Step::Hostname,
            )?;
        }
        if let Some(adj) = &p.oom_score_adj {
            let fd = check_int(
                libc::open(
                    c"/proc/self/oom_score_adj".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                ),
                Step::OomScore,
            )?;
            let n = libc::write(fd, adj.as_ptr().cast(), adj.as_bytes().len());
            libc::close(fd);
            if n < 0 {
                return Err(Fail(Step::OomScore, errno()));
            }
        }
        change_mount(c"/".as_ptr(), p.root_propagation, Step::RootPropagation)?;
        check_int(
            libc::mount(
                p.rootfs.as_ptr(),
                p.rootfs.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            Step::RootfsBind,
        )?;
        let root = check_int(
            libc::open(
                p.rootfs.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            ),
            Step::RootfsOpen,
        )?;
        for m in &p.mounts {
            mount_one(root, m)?;
        }
        if p.dev_tmpfs {
            devices(root, p.kcore)?;
        }
        check_int(libc::fchdir(root), Step::PivotRoot)?;
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
            Step::PivotRoot,
        )?;
        check_int(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), Step::Detach)?;
        check_int(libc::chdir(c"/".as_ptr()), Step::Detach)?;
        libc::close(root);
        if let Some(flags) = p.root_propagation_after {
            change_mount(c"/".as_ptr(), flags, Step::RootPropagationAfter)?;
        }
        if p.root_readonly {
            change_mount(
                c"/".as_ptr(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                Step::RootReadonly,
            )?;
        }
        for path in &p.masked {
            mask(path)?;
        }
        for path in &p.readonly {
            make_readonly(path)?;
        }
        for (resource, limit) in &p.rlimits {
            check_int(
                libc::prlimit(0, (*resource).cast_unsigned(), limit, std::ptr::null_mut()),
                Step::Rlimit,
            )?;
        }
        if p.no_new_privs {
            check_int(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                Step::NoNewPrivs,
            )?;
        }
        check_int(libc::chdir(p.cwd.as_ptr()), Step::Cwd)?;
        ids_and_caps(p)?;
        libc::umask(p.umask);
        let exe = find_executable(p)?;
        check(
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ),
            Step::CloseFds,
        )?;
        Ok(exe)
    }
}

/// `mount(NULL, path, NULL, flags, NULL)`: a remount or a propagation change.
unsafe fn change_mount(path: *const libc::c_char, flags: c_ulong, step: Step) -> Result<(), Fail> {
    check_int(
        libc::mount(
            std::ptr::null(),
            path,
            std::ptr::null(),
            flags,
            std::ptr::null(),
        ),
        step,
    )
    .map(drop)
}

/// Resolves (creating what is missing) and mounts one spec mount inside `root`.
unsafe fn mount_one(root: RawFd, m: &PreMount) -> Result<(), Fail> {
    let flags = if m.file {
        libc::O_PATH
    } else {
        libc::O_PATH | libc::O_DIRECTORY
    };
    let mut target = open_in_root(root, &m.target, flags);
    if target < 0 && errno() == libc::ENOENT {
        make_target(root, m.target.as_bytes(), m.file)?;
        target = open_in_root(root, &m.target, flags);
    }
    let target = check(target, Step::Resolve)?;
    let target = c_int::try_from(target).unwrap_or(-1);
    let path = FdPath::new(target);
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    let result = (|| {
        check_int(
            libc::mount(
                ptr(&m.source),
                path.as_ptr(),
                ptr(&m.fstype),
                m.flags,
                ptr(&m.data).cast(),
            ),
            Step::Mount,
        )?;
        // The new mount hides the descriptor's: remount and propagation go by path on a
        // fresh descriptor of the mount just made.
        if m.remount.is_some() || m.propagation.is_some() {
            let fd = check(open_in_root(root, &m.target, libc::O_PATH), Step::Resolve)?;
            let fd = c_int::try_from(fd).unwrap_or(-1);
            let on = FdPath::new(fd);
            let r = (|| {
                if let Some(flags) = m.remount {
                    change_mount(on.as_ptr(), flags, Step::Remount)?;
                }
                if let Some(flags) = m.propagation {
                    change_mount(on.as_ptr(), flags, Step::Propagation)?;
                }
                Ok(())
            })();
            libc::close(fd);
            r?;
        }
        Ok(())
    })();
    libc::close(target);
    result
}

/// The default devices (as libcontainer makes them) and the /dev symlinks.
unsafe fn devices(root: RawFd, kcore: bool) -> Result<(), Fail> {
    let dev = c_int::try_from(check(
        open_in_root(root, c"dev", libc::O_PATH | libc::O_DIRECTORY),
        Step::Device,
    )?)
    .unwrap_or(-1);
    let nodes: [(&std::ffi::CStr, u32, u32); 6] = [
        (c"null", 1, 3),
        (c"zero", 1, 5),
        (c"full", 1, 7),
        (c"tty", 5, 0),
        (c"urandom", 1, 9),
        (c"random", 1, 8),
    ];
    let result = (|| {
        for (name, major, minor) in nodes {
            let r = libc::mknodat(
                dev,
                name.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            );
            if r < 0 && errno() != libc::EEXIST {
                return Err(Fail(Step::Device, errno()));
            }
        }
        let links: [(&std::ffi::CStr, &std::ffi::CStr); 5] = [
            (c"/proc/self/fd", c"fd"),
            (c"/proc/self/fd/0", c"stdin"),
            (c"/proc/self/fd/1", c"stdout"),
            (c"/proc/self/fd/2", c"stderr"),
            (c"pts/ptmx", c"ptmx"),
        ];
        for (target, name) in links {
            let r = libc::symlinkat(target.as_ptr(), dev, name.as_ptr());
            if r < 0 && errno() != libc::EEXIST {
                return Err(Fail(Step::Symlink, errno()));
            }
        }
        if kcore {
            let r = libc::symlinkat(c"/proc/kcore".as_ptr(), dev, c"core".as_ptr());
            if r < 0 && errno() != libc::EEXIST {
                return Err(Fail(Step::Symlink, errno()));
            }
        }
        Ok(())
    })();
    libc::close(dev);
    result
}

/// Hides `path` (after pivot_root): /dev/null over a file, a read-only tmpfs over a
/// directory; a path that does not exist needs no mask.
unsafe fn mask(path: &CString) -> Result<(), Fail> {
    let r = libc::mount(
        c"/dev/null".as_ptr(),
        path.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND,
        std::ptr::null(),
    );
    if r == 0 {
        return Ok(());
    }
    match errno() {
        libc::ENOENT => Ok(()),
        libc::ENOTDIR => check_int(
            libc::mount(
                c"tmpfs".as_ptr(),
                path.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            ),
            Step::Mask,
        )
        .map(drop),
        e => Err(Fail(Step::Mask, e)),
    }
}

/// Makes `path` a read-only bind of itself (after pivot_root); a missing path is skipped.
unsafe fn make_readonly(path: &CString) -> Result<(), Fail> {
    let r = libc::mount(
        path.as_ptr(),
        path.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    );
    if r < 0 {
        return match errno() {
            libc::ENOENT => Ok(()),
            e => Err(Fail(Step::Readonly, e)),
        };
    }
    check_int(
        libc::mount(
            path.as_ptr(),
            path.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            std::ptr::null(),
        ),
        Step::Readonly,
    )
    .map(drop)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

/// `capset` of version 3 (two 32-bit words per set).
unsafe fn capset(effective: u64, permitted: u64, inheritable: u64) -> libc::c_long {
    let header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let word = |m: u64, i: u32| u32::try_from((m >> (32 * i)) & 0xffff_ffff).unwrap_or(0);
    let data = [0u32, 1].map(|i| CapData {
        effective: word(effective, i),
        permitted: word(permitted, i),
        inheritable: word(inheritable, i),
    });
    libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr())
}

/// This process's permitted set.
unsafe fn permitted() -> Result<u64, Fail> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    check(
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        ),
        Step::Capset,
    )?;
    Ok(u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32))
}

/// Groups, gid and uid, then the spec's capabilities (as libcontainer: ids with
/// keep-caps, the effective set back to the permitted one, bounding set, the sets,
/// ambient).
unsafe fn ids_and_caps(p: &Prepared) -> Result<(), Fail> {
    // Raw syscalls: glibc's id wrappers signal every thread glibc knows of, and this
    // child of a multi-threaded process has only one.
    check(
        libc::syscall(libc::SYS_setgroups, p.groups.len(), p.groups.as_ptr()),
        Step::Groups,
    )?;
    check_int(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0), Step::Uid)?;
    check(
        libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid),
        Step::Gid,
    )?;
    check(
        libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid),
        Step::Uid,
    )?;
    check_int(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0), Step::Uid)?;
    let Some(caps) = p.caps else {
        return Ok(());
    };
    // The permitted set (kept over the uid change) effective again, for the bounding-set
    // drops (a uid change cleared the effective set).
    let last = p.last_cap;
    let kept = permitted()?;
    check(capset(kept, kept, 0), Step::Capset)?;
    for cap in 0..=last {
        if caps.bounding & (1 << cap) == 0 {
            check_int(
                libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0),
                Step::Bounding,
            )?;
        }
    }
    check(
        capset(caps.effective, caps.permitted, caps.inheritable),
        Step::Capset,
    )?;
    for cap in 0..=last {
        if caps.ambient & (1 << cap) != 0 {
            check_int(
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    libc::c_ulong::from(cap),
                    0,
                    0,
                ),
                Step::Ambient,
            )?;
        }
    }
    Ok(())
}

/// What every plan needs to know of the guest, looked up once.
struct Guest {
    kcore: bool,
    last_cap: u32,
}

fn guest() -> &'static Guest {
    static GUEST: std::sync::OnceLock<Guest> = std::sync::OnceLock::new();
    GUEST.get_or_init(|| Guest {
        kcore: Path::new("/proc/kcore").exists(),
        last_cap: last_cap(),
    })
}

/// The highest capability this kernel knows (CAP_LAST_CAP), probed with
/// `PR_CAPBSET_READ` (no file read).
fn last_cap() -> u32 {
    let mut last = 0;
    for cap in 0..64u32 {
        // SAFETY: PR_CAPBSET_READ only reads this thread's bounding set.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap), 0, 0, 0) } < 0 {
            break;
        }
        last = cap;
    }
    last
}

/// The first candidate that is an executable regular file (as libcontainer's check
/// before it reports ready).
unsafe fn find_executable(p: &Prepared) -> Result<*const libc::c_char, Fail> {
    let mut last_errno = libc::ENOENT;
    for c in &p.candidates {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(c.as_ptr(), &mut st) != 0 {
            last_errno = errno();
            continue;
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            last_errno = libc::EACCES;
            continue;
        }
        if libc::access(c.as_ptr(), libc::X_OK) != 0 {
            last_errno = errno();
            continue;
        }
        return Ok(c.as_ptr());
    }
    Err(Fail(Step::FindExecutable, last_errno))
}

/// The most symlinks followed while making one mount target (the kernel's limit).
const MAX_SYMLINKS: usize = 40;
/// The deepest directory nesting [`make_target`] walks.
const MAX_DEPTH: usize = 128;
/// Room for the path still to walk (symlink targets are spliced in front of it).
const PATH_ROOM: usize = 8192;

/// The path still to walk, in a fixed buffer (no allocation: the child may not).
struct PathQueue {
    buf: [u8; PATH_ROOM],
    len: usize,
}

impl PathQueue {
    fn new(path: &[u8]) -> Option<PathQueue> {
        let mut q = PathQueue {
            buf: [0; PATH_ROOM],
            len: 0,
        };
        q.prepend(path).then_some(q)
    }

    /// Puts `path` (and a separator) in front of what is left; false if it does not fit.
    fn prepend(&mut self, path: &[u8]) -> bool {
        let need = path.len() + 1;
        if self.len + need > PATH_ROOM {
            return false;
        }
        self.buf.copy_within(0..self.len, need);
        self.buf[..path.len()].copy_from_slice(path);
        self.buf[path.len()] = b'/';
        self.len += need;
        true
    }

    /// Removes the next component (no empty ones, no "."), copied NUL-terminated into
    /// `name`; returns its length, or None when the path is done.
    fn pop(&mut self, name: &mut [u8; 256]) -> Option<Result<usize, i32>> {
        loop {
            let mut start = 0;
            while start < self.len && self.buf[start] == b'/' {
                start += 1;
            }
            if start == self.len {
                self.len = 0;
                return None;
            }
            let mut end = start;
            while end < self.len && self.buf[end] != b'/' {
                end += 1;
            }
            let n = end - start;
            let fits = n < name.len();
            if fits {
                name[..n].copy_from_slice(&self.buf[start..end]);
                name[n] = 0;
            }
            self.buf.copy_within(end..self.len, 0);
            self.len -= end;
            if !fits {
                return Some(Err(libc::ENAMETOOLONG));
            }
            if n == 1 && name[0] == b'.' {
                continue;
            }
            return Some(Ok(n));
        }
    }

    fn is_done(&self) -> bool {
        self.buf[..self.len].iter().all(|&b| b == b'/')
    }
}

/// Makes `path` (relative to the container's root) under `root` as runc's
/// `MkdirAllInRoot` does: component by component, following the image's symlinks as if
/// `root` were `/` (an absolute link restarts at `root`, `..` stops at it), creating
/// missing directories, and the last component as an empty file if `file`. Nothing is
/// made or followed outside `root`. Allocation-free (the lean init's child runs it).
unsafe fn make_target(root: RawFd, path: &[u8], file: bool) -> Result<(), Fail> {
    let mut q = PathQueue::new(path).ok_or(Fail(Step::Create, libc::ENAMETOOLONG))?;
    let mut dirs = [-1 as c_int; MAX_DEPTH];
    dirs[0] = check_int(libc::dup(root), Step::Create)?;
    let mut depth = 1;
    let mut links = 0;
    let mut name = [0u8; 256];
    let mut link = [0u8; 4096];
    let result = (|| {
        while let Some(next) = q.pop(&mut name) {
            let n = next.map_err(|e| Fail(Step::Create, e))?;
            let last = q.is_done();
            if n == 2 && name[..2] == *b".." {
                if depth > 1 {
                    depth -= 1;
                    libc::close(dirs[depth]);
                }
                continue;
            }
            let cur = dirs[depth - 1];
            let cname = name.as_ptr().cast::<libc::c_char>();
            let mut fd = libc::openat(
                cur,
                cname,
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            );
            if fd < 0 {
                if errno() != libc::ENOENT {
                    return Err(Fail(Step::Create, errno()));
                }
                let made = if last && file {
                    let f = libc::openat(
                        cur,
                        cname,
                        libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_RDONLY
                            | libc::O_CLOEXEC,
                        0o644,
                    );
                    if f >= 0 {
                        libc::close(f);
                    }
                    f
                } else {
                    libc::mkdirat(cur, cname, 0o755)
                };
                if made < 0 && errno() != libc::EEXIST {
                    return Err(Fail(Step::Create, errno()));
                }
                fd = check_int(
                    libc::openat(
                        cur,
                        cname,
                        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    ),
                    Step::Create,
                )?;
            }
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 {
                let e = errno();
                libc::close(fd);
                return Err(Fail(Step::Create, e));
            }
            match st.st_mode & libc::S_IFMT {
                libc::S_IFLNK => {
                    links += 1;
                    let len =
                        libc::readlinkat(fd, c"".as_ptr(), link.as_mut_ptr().cast(), link.len());
                    libc::close(fd);
                    if links > MAX_SYMLINKS {
                        return Err(Fail(Step::Create, libc::ELOOP));
                    }
                    let len = usize::try_from(len).map_err(|_| Fail(Step::Create, errno()))?;
                    if link.first() == Some(&b'/') {
                        while depth > 1 {
                            depth -= 1;
                            libc::close(dirs[depth]);
                        }
                    }
                    if !q.prepend(&link[..len]) {
                        return Err(Fail(Step::Create, libc::ENAMETOOLONG));
                    }
                }
                libc::S_IFDIR => {
                    if depth == MAX_DEPTH {
                        libc::close(fd);
                        return Err(Fail(Step::Create, libc::ENAMETOOLONG));
                    }
                    dirs[depth] = fd;
                    depth += 1;
                }
                _ => {
                    libc::close(fd);
                    if !last {
                        return Err(Fail(Step::Create, libc::ENOTDIR));
                    }
                }
            }
        }
        Ok(())
    })();
    for fd in &dirs[..depth] {
        libc::close(*fd);
    }
    result
}

/// HOME for `uid` from the image's `/etc/passwd` (resolved inside `rootfs`), if listed.
pub fn home_of(rootfs: &Path, uid: u32) -> Option<String> {
    let root = std::fs::File::open(rootfs).ok()?;
    let fd = open_in_root(root.as_raw_fd(), c"/etc/passwd", libc::O_RDONLY);
    let fd = c_int::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the descriptor was just opened and is owned by the File from here on.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let text = std::io::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[5].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The host tier's spec (the usual shape), with a user, capabilities with an ambient
    /// one, an OOM score, a domain name and two more mounts: a cgroup (v1 name) and a bind.
    fn base() -> serde_json::Value {
        let mut v = podvisor_test_kit::host_agent::spec(&["sh", "-c", "true"], false);
        v["root"]["path"] = json!("/run/r");
        v["hostname"] = json!("h");
        v["domainname"] = json!("d");
        v["process"]["env"] = json!(["PATH=/usr/bin:/bin"]);
        v["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [5]});
        v["process"]["capabilities"] = json!({"bounding": ["CAP_KILL", "CAP_CHOWN"],
            "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"], "ambient": ["CAP_KILL"]});
        v["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}]);
        v["process"]["oomScoreAdj"] = json!(100);
        let mounts = v["mounts"].as_array_mut().unwrap();
        mounts.push(
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
        );
        mounts.push(
            json!({"destination": "/data", "type": "bind", "source": "/tmp",
            "options": ["rbind", "ro", "rprivate"]}),
        );
        v
    }

    /// The planned mount of `target` (relative to the root).
    fn mount<'a>(p: &'a Prepared, target: &std::ffi::CStr) -> &'a PreMount {
        p.mounts
            .iter()
            .find(|m| m.target.as_c_str() == target)
            .unwrap()
    }

    fn spec(v: serde_json::Value) -> Spec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_usual_spec_is_planned_with_every_field() {
        let p = plan(&spec(base()), |uid| {
            assert_eq!(uid, 1000);
            Some("/home/u".into())
        })
        .unwrap();
        let ns = u64::from(
            (libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNS)
                .cast_unsigned(),
        );
        assert_eq!(p.clone_flags, ns);
        assert_eq!(p.hostname.as_deref(), Some(c"h"));
        assert_eq!(p.domainname.as_deref(), Some(c"d"));
        assert!(p.root_readonly && p.no_new_privs && p.dev_tmpfs);
        assert_eq!(
            p.candidates,
            [c"/usr/bin/sh".to_owned(), c"/bin/sh".to_owned()]
        );
        assert!(p.envp.contains(&c"HOME=/home/u".to_owned()));
        assert_eq!((p.uid, p.gid, p.groups.as_slice()), (1000, 1000, &[5][..]));
        let caps = p.caps.unwrap();
        assert_eq!(caps.bounding, (1 << 5) | 1, "CAP_KILL is 5, CAP_CHOWN 0");
        assert_eq!(caps.ambient, 1 << 5);
        assert_eq!(p.rlimits[0].1.rlim_cur, 512);
        assert_eq!(p.oom_score_adj.as_deref(), Some(c"100"));
        let dev = mount(&p, c"dev");
        assert_eq!(dev.fstype.as_deref(), Some(c"tmpfs"));
        assert_eq!(dev.flags, libc::MS_NOSUID | libc::MS_STRICTATIME);
        assert_eq!(dev.data.as_deref(), Some(c"mode=755,size=65536k"));
        let cg = mount(&p, c"sys/fs/cgroup");
        assert_eq!(cg.fstype.as_deref(), Some(c"cgroup2"), "v1 name, v2 mount");
        assert_eq!(cg.target.as_c_str(), c"sys/fs/cgroup");
        let bind = mount(&p, c"data");
        assert_eq!(bind.flags, libc::MS_BIND | libc::MS_REC);
        assert_eq!(
            bind.remount,
            Some(libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY)
        );
        assert_eq!(bind.propagation, Some(libc::MS_PRIVATE | libc::MS_REC));
        assert!(bind.fstype.is_none() && bind.data.is_none());
    }

    #[test]
    fn home_is_the_users_unless_the_env_sets_one() {
        let env_of = |env: serde_json::Value, home: Option<&str>| {
            let mut v = base();
            v["process"]["env"] = env;
            let p = plan(&spec(v), |_| home.map(str::to_string)).unwrap();
            p.envp
                .iter()
                .filter_map(|e| e.to_str().ok()?.strip_prefix("HOME=").map(str::to_string))
                .collect::<Vec<_>>()
        };
        let path = "PATH=/bin";
        assert_eq!(env_of(json!([path, "HOME=/x"]), Some("/home/u")), ["/x"]);
        assert_eq!(env_of(json!([path]), Some("/home/u")), ["/home/u"]);
        assert_eq!(env_of(json!([path]), None), ["/"]);
        assert_eq!(env_of(json!([path, "HOME="]), Some("/home/u")), ["/home/u"]);
    }

    #[test]
    fn specs_that_need_libcontainer_are_refused_with_the_reason() {
        type Change = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "terminal",
                Box::new(|v| v["process"]["terminal"] = json!(true)),
            ),
            (
                "seccomp",
                Box::new(|v| v["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW"})),
            ),
            (
                "sysctls",
                Box::new(|v| v["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"})),
            ),
            (
                "by path",
                Box::new(|v| v["linux"]["namespaces"][0]["path"] = json!("/proc/1/ns/pid")),
            ),
            (
                "Network",
                Box::new(|v| {
                    v["linux"]["namespaces"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"type": "network"}))
                }),
            ),
            (
                "User",
                Box::new(|v| {
                    v["linux"]["namespaces"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"type": "user"}))
                }),
            ),
            (
                "mount namespace",
                Box::new(|v| v["linux"]["namespaces"].as_array_mut().unwrap().truncate(3)),
            ),
            (
                "options",
                Box::new(|v| v["mounts"][7]["options"] = json!(["rbind", "rshared"])),
            ),
            (
                "mount type",
                Box::new(|v| v["mounts"][0]["type"] = json!("overlay")),
            ),
            (
                "tmpfs on /dev",
                Box::new(|v| {
                    v["mounts"].as_array_mut().unwrap().remove(1);
                }),
            ),
            (
                "devices",
                Box::new(|v| {
                    v["linux"]["devices"] =
                        json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}])
                }),
            ),
            ("PATH", Box::new(|v| v["process"]["env"] = json!([]))),
            (
                "propagation",
                Box::new(|v| v["linux"]["rootfsPropagation"] = json!("shared")),
            ),
            (
                "'..'",
                Box::new(|v| v["mounts"][7]["destination"] = json!("/data/../../x")),
            ),
        ];
        for (reason, change) in cases {
            let mut v = base();
            change(&mut v);
            let err = plan(&spec(v), |_| None).unwrap_err();
            assert!(err.0.contains(reason), "{reason}: {err}");
        }
    }

    #[test]
    fn mount_options_map_to_flags_and_data() {
        let o = |v: &[&str]| mount_flags(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(o(&["ro", "rw"]).unwrap().0, 0, "the last word wins");
        assert_eq!(
            o(&["nosuid", "nodev", "noexec"]).unwrap().0,
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC
        );
        assert_eq!(
            o(&["newinstance", "ptmxmode=0666"]).unwrap().2,
            ["newinstance", "ptmxmode=0666"]
        );
        assert_eq!(
            o(&["rslave"]).unwrap().1,
            Some(libc::MS_SLAVE | libc::MS_REC)
        );
        assert!(o(&["shared"]).is_none());
        assert!(o(&["tmpcopyup"]).is_none());
        assert!(
            o(&["rro"]).is_none(),
            "recursive read-only needs mount_setattr"
        );
    }

    #[test]
    fn fd_paths_are_formatted_without_allocating() {
        let p = FdPath::new(123);
        assert_eq!(&p.0[..17], b"/proc/self/fd/123");
        assert_eq!(p.0[17], 0);
        assert_eq!(&FdPath::new(0).0[..15], b"/proc/self/fd/0");
    }

    #[test]
    fn failures_name_their_step() {
        let f = ChildFailure {
            step: Step::PivotRoot as u32,
            errno: libc::EINVAL,
        };
        assert_eq!(
            f.to_string(),
            format!(
                "pivot_root: {}",
                std::io::Error::from_raw_os_error(libc::EINVAL)
            )
        );
        assert_eq!(STEPS.len(), Step::Exec as usize + 1);
    }

    #[test]
    fn mount_targets_are_made_inside_the_root_through_symlinks() {
        let root_dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root_dir.path();
        std::os::unix::fs::symlink(outside.path(), r.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../..", r.join("up")).unwrap();
        std::fs::create_dir(r.join("etc")).unwrap();
        std::os::unix::fs::symlink("/run/real", r.join("etc/hosts")).unwrap();
        let root = std::fs::File::open(r).unwrap();
        let make = |path: &str, file: bool| -> Result<(), i32> {
            // SAFETY: syscalls on a valid directory descriptor.
            unsafe { make_target(root.as_raw_fd(), path.as_bytes(), file) }.map_err(|Fail(_, e)| e)
        };
        make("abs/x", false).unwrap();
        make("up/y", false).unwrap();
        make("etc/hosts", true).unwrap();
        make("data/./d", false).unwrap();
        let inside = r.join(outside.path().strip_prefix("/").unwrap()).join("x");
        assert!(inside.is_dir(), "an absolute link resolves inside the root");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert!(r.join("y").is_dir(), "'..' stops at the root");
        assert!(r.join("run/real").is_file(), "a file target through a link");
        assert!(r.join("data/d").is_dir());
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert_eq!(make("loop/z", false), Err(libc::ELOOP));
        std::fs::write(r.join("plain"), "").unwrap();
        assert_eq!(make("plain/z", false), Err(libc::ENOTDIR));
        let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
        make("abs/x", false).unwrap();
        assert_eq!(
            std::fs::read_dir("/proc/self/fd").unwrap().count(),
            fds,
            "no descriptor left open"
        );
    }

    #[test]
    fn home_comes_from_the_images_passwd_inside_its_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(home_of(dir.path(), 1000).as_deref(), Some("/home/u"));
        assert_eq!(home_of(dir.path(), 7), None);
        // A passwd that is a symlink to a host path resolves inside the root.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", other.path().join("etc/passwd")).unwrap();
        assert_eq!(
            home_of(other.path(), 0),
            None,
            "the host's /etc/passwd is not read"
        );
    }
}
