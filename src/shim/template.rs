//! Pod templates: a booted pod VM, snapshotted once, that every later pod restores as a
//! copy-on-write clone instead of booting (`template = "auto"`).
//!
//! A template is keyed by what shapes the booted guest ([`key`]): the template's
//! [`GuestShape`] whole, serialised, with a key format version, the podvisor version and
//! the kernel's and initrd's content identity (size, modification time), so that a field
//! added to the shape can never reuse a template built without it. The template's shape is
//! the pod's but for the NICs' MACs ([`shape`]): a template VM's NICs sit on taps in a
//! detached network namespace with MACs of the template's own; clones bind their pods'
//! taps and the agent gives each NIC its pod's MAC. A clone's restore expects the
//! template's shape and refuses a template saved with another. It lives in
//! `<template_dir>/<key>/` (`state` + sparse `memory`, `vmm::snapshot`'s format). The first
//! pod that needs a missing template builds it under an exclusive `flock` on
//! `<template_dir>/<key>.lock`, so concurrent pods wait for one build instead of racing: a
//! template VM (its own scratch share and vsock socket) boots until the agent is listening
//! (the boot-timer marker), is paused and saved to `<key>.tmp-<pid>`, which is renamed into
//! place, and stops. A failed build leaves `<key>.failed` (its error): pods boot cold
//! without trying again for [`RETRY_AFTER`]. Where the host's KVM cannot save a VM
//! ([`vmm::snapshot_support`]) no template is tried at all.
//!
//! A clone maps the template's memory `MAP_PRIVATE`: the guest kernel's and agent's pages
//! stay shared in the host page cache across every pod of the template, a pod only pays for
//! the pages it writes. Each clone gets its own identity after restore, before any
//! container runs: the restore rebinds the share and vsock to the pod's paths and resets the
//! guest's vsock connections; CreateSandbox sets the hostname and mounts, the wall clock and
//! mixes fresh host entropy into the guest's random pool (otherwise every clone would
//! continue the template's random state: same keys, same UUIDs).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};
use vmm::{ConsoleConfig, GuestShape, RestoreConfig, Vm, VmConfig};

/// How long the agent may run after its marker before the template is saved (it has just
/// started listening; let it settle in accept()).
const SETTLE: Duration = Duration::from_secs(2);

/// The version of what [`key`] hashes: raise it when its derivation changes.
const KEY_FORMAT: u32 = 1;

/// The MAC of a template VM's NIC `index` (a clone keeps it in config space; its agent gives
/// the interface the pod's).
fn template_mac(index: usize) -> [u8; 6] {
    let [lo, hi, ..] = index.to_le_bytes();
    [0x02, 0x70, 0x76, 0, hi, lo]
}

/// The template's shape for a pod of shape `pod`: the same, but for the NICs' MACs, which
/// are the template's own, and with one vCPU online when the VM has parked vCPUs
/// (`max_vcpus` > 1): a pod that wants more brings them online after the restore
/// ([`online_after_restore`]), so pods of any vCPU count share one template.
pub fn shape(pod: &GuestShape) -> GuestShape {
    let mut shape = pod.clone();
    for (i, nic) in shape.nics.iter_mut().enumerate() {
        nic.mac = Some(template_mac(i));
    }
    if shape.max_vcpus > 1 {
        shape.vcpus = 1;
    }
    shape
}

/// The vCPUs a clone of `pod`'s template must bring online after the restore, if more
/// than the template's one.
pub fn online_after_restore(pod: &GuestShape) -> Option<usize> {
    (shape(pod).vcpus < pod.vcpus).then_some(pod.vcpus)
}

/// A file's content identity in the key: size and modification time (absent: the file
/// cannot be read; the build then fails and says why).
#[derive(Serialize)]
struct FileIdentity {
    len: u64,
    mtime_ns: u128,
}

impl FileIdentity {
    fn of(path: &Path) -> Option<FileIdentity> {
        let m = std::fs::metadata(path).ok()?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        Some(FileIdentity {
            len: m.len(),
            mtime_ns: mtime.as_nanos(),
        })
    }
}

/// Everything a template key is the hash of.
#[derive(Serialize)]
struct KeyInput<'a> {
    format: u32,
    podvisor_version: &'a str,
    shape: GuestShape,
    kernel: Option<FileIdentity>,
    initrd: Option<FileIdentity>,
}

/// The template key of a pod of shape `pod`: the first 128 bits of the SHA-256 of
/// [`KeyInput`] as JSON (the template's [`shape`] whole, so every field of it counts).
pub fn key(pod: &GuestShape) -> String {
    let shape = shape(pod);
    let input = KeyInput {
        format: KEY_FORMAT,
        podvisor_version: env!("CARGO_PKG_VERSION"),
        kernel: FileIdentity::of(&shape.kernel),
        initrd: shape.initrd.as_deref().and_then(FileIdentity::of),
        shape,
    };
    // Plain fields, string keys: serialising cannot fail.
    let json = serde_json::to_vec(&input).unwrap_or_default();
    let d = Sha256::digest(&json);
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// A pod's restore of the template in `dir`: the template's shape expected, the pod's own
/// bindings (console, share, vsock socket, taps, host settings).
pub fn restore_config(dir: PathBuf, pod: &VmConfig) -> RestoreConfig {
    RestoreConfig {
        shape: Some(shape(&pod.shape)),
        bindings: pod.bindings.clone(),
        // The agent sets the wall clock at CreateSandbox.
        ..RestoreConfig::new(dir)
    }
}

/// An exclusive lock on a file, released on drop.
struct Lock(File);

impl Lock {
    fn take(path: &Path) -> Result<Lock, String> {
        let f = File::create(path).map_err(|e| format!("template lock {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own; no pointers.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "template lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(Lock(f))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The template directory for the pod VM `config`, building the template first if it is
/// missing. The template VM has the template's [`shape`] and scratch bindings of its own.
pub fn ensure(
    template_dir: &Path,
    max_templates: usize,
    config: &VmConfig,
    timeout: Duration,
) -> Result<PathBuf, String> {
    let key = key(&config.shape);
    let dir = template_dir.join(&key);
    if dir.join(vmm::snapshot::STATE_FILE).is_file() {
        touch_used(&dir);
        return Ok(dir);
    }
    vmm::snapshot_support(&config.bindings.host.kvm_device)
        .map_err(|e| format!("this host's KVM cannot save VMs, so no templates: {e}"))?;
    // Templates hold guest memory: owner only.
    super::share::ensure_dir(template_dir, 0o700).map_err(|e| format!("template dir: {e}"))?;
    let lock = Lock::take(&template_dir.join(format!("{key}.lock")))?;
    if dir.join(vmm::snapshot::STATE_FILE).is_file() {
        return Ok(dir); // Built by another pod while we waited.
    }
    let failed = failure_marker(template_dir, &key);
    if let Some(age) = std::fs::metadata(&failed)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .filter(|age| *age < RETRY_AFTER)
    {
        let why = std::fs::read_to_string(&failed).unwrap_or_default();
        return Err(format!(
            "building this template failed {} s ago ({}); not retrying for {} min \
             (`podvisor template create` retries now)",
            age.as_secs(),
            why.trim(),
            RETRY_AFTER.as_secs() / 60
        ));
    }
    let scratch = template_dir.join(format!("{key}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let result = build(&scratch, &dir, config, timeout);
    let _ = std::fs::remove_dir_all(&scratch);
    match &result {
        // Every pod would otherwise pay a failing template boot before its own.
        Err(e) => {
            let _ = std::fs::write(&failed, e.lines().next().unwrap_or_default());
        }
        Ok(()) => {
            let _ = std::fs::remove_file(&failed);
            touch_used(&dir);
        }
    }
    // Released first: the garbage collection takes other templates' locks.
    drop(lock);
    if result.is_ok() {
        collect_garbage(template_dir, max_templates, &key);
    }
    result.map(|()| dir)
}

/// In a template's directory: touched by every pod that uses it.
const USED_FILE: &str = "used";

/// Marks the template in `dir` as used now.
fn touch_used(dir: &Path) {
    let touched = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(USED_FILE))
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    if let Err(e) = touched {
        log::debug!("template {}: mark as used: {e}", dir.display());
    }
}

/// Removes the least recently used templates of `template_dir` beyond the `max` newest
/// (never `keep`); returns the keys removed.
pub fn collect_garbage(template_dir: &Path, max: usize, keep: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(template_dir) else {
        return Vec::new();
    };
    let mut templates: Vec<(std::time::SystemTime, String)> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|k| !k.contains('.') && k != keep)
        .map(|k| {
            let dir = template_dir.join(&k);
            let used = [
                dir.join(USED_FILE),
                dir.join(vmm::snapshot::STATE_FILE),
                dir,
            ]
            .iter()
            .find_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .unwrap_or(UNIX_EPOCH);
            (used, k)
        })
        .collect();
    templates.sort_by_key(|t| std::cmp::Reverse(t.0));
    let mut removed = Vec::new();
    // `keep` is one of the `max`.
    for (_, k) in templates.into_iter().skip(max.saturating_sub(1)) {
        match remove(template_dir, &k) {
            Ok(()) => {
                log::info!(
                    "template {k} removed: more than {max} templates, it was used least recently"
                );
                removed.push(k);
            }
            Err(e) => log::warn!("template garbage collection: {e}"),
        }
    }
    removed
}

/// After a failed build, pods boot cold without trying again for this long.
const RETRY_AFTER: Duration = Duration::from_secs(600);

/// `<template_dir>/<key>.failed`: the first line of the last build error.
fn failure_marker(template_dir: &Path, key: &str) -> PathBuf {
    template_dir.join(format!("{key}.failed"))
}

/// Forgets an earlier build failure of `key` (an explicit `podvisor template create`).
pub fn clear_failure(template_dir: &Path, key: &str) {
    let _ = std::fs::remove_file(failure_marker(template_dir, key));
}

fn build(scratch: &Path, dir: &Path, config: &VmConfig, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    let share_dir = scratch.join("share");
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&share_dir)
        .map_err(|e| format!("template scratch {}: {e}", share_dir.display()))?;
    let mut cfg = VmConfig {
        shape: shape(&config.shape),
        bindings: config.bindings.clone(),
    };
    for s in &mut cfg.bindings.shares {
        s.dir = share_dir.clone();
    }
    if let Some(v) = &mut cfg.bindings.vsock {
        *v = scratch.join("vsock.sock");
    }
    let config_vsock = cfg.bindings.vsock.clone();
    // The template's NICs sit on taps that reach nothing; clones get their pods' taps.
    for (i, t) in cfg.bindings.taps.iter_mut().enumerate() {
        let tap = super::net::tap::create_detached(&format!("pvtpl{i}"))
            .map_err(|e| format!("a tap for the template VM's NIC {i}: {e}"))?;
        *t = vmm::config::TapSource::from(tap);
    }
    let console = scratch.join("console.log");
    cfg.bindings.console = ConsoleConfig::CappedFile(console.clone(), Default::default());
    log::info!("building VM template {} (a cold boot)", dir.display());
    let mut running = Vm::new(cfg, Instant::now())
        .and_then(Vm::start)
        .map_err(|e| format!("template VM: {e}"))?;
    if let Err(reason) = running.wait_for_init(Some(timeout)) {
        let tail = super::file_tail(&console, 30);
        let _ = running.stop("template build failed");
        return Err(format!(
            "the template VM's agent did not come up ({reason}); last console lines:\n{tail}"
        ));
    }
    // Warm the agent: its first RPC connection sets up what every later one reuses (the
    // ttrpc server's first connection, the agent's heap), so each clone does not redo it
    // after restore. SETTLE then lets the connection's threads end before the save.
    if let Some(vsock) = &config_vsock {
        match super::agent::TtrpcAgent::connect(vsock, timeout, || false) {
            Ok((agent, _)) => drop(agent),
            Err(e) => log::warn!("template build: warming the agent: {e}"),
        }
    }
    std::thread::sleep(SETTLE);
    let snap = scratch.join("snapshot");
    let saved = running.pause().and_then(|()| running.snapshot(&snap));
    let report = running.stop("template saved");
    let info = saved.map_err(|e| format!("saving the template: {e}"))?;
    std::fs::rename(&snap, dir).map_err(|e| format!("install template {}: {e}", dir.display()))?;
    log::info!(
        "VM template {} built in {:.1} s ({} MiB of data in a {} MiB memory file; template VM: {})",
        dir.display(),
        started.elapsed().as_secs_f64(),
        info.memory_data_bytes >> 20,
        info.memory_bytes >> 20,
        report.reason
    );
    Ok(())
}

/// Removes a template that could not be restored (a stale or foreign one), so the next pod
/// builds a fresh one.
pub fn discard(dir: &Path) {
    log::warn!("discarding VM template {}", dir.display());
    let _ = std::fs::remove_dir_all(dir);
}

/// A template found in a template directory (`podvisor template list`).
pub struct TemplateEntry {
    /// The key (the directory name).
    pub key: String,
    pub dir: PathBuf,
    /// The saved state, or why it cannot be read (a corrupt or foreign template).
    pub state: Result<vmm::snapshot::SnapshotState, String>,
    /// Bytes on disk (allocated blocks: the memory file is sparse).
    pub disk_bytes: u64,
    /// When it was built.
    pub created: Option<std::time::SystemTime>,
}

/// The templates under `template_dir`, sorted by key (nothing if it does not exist).
pub fn list(template_dir: &Path) -> Result<Vec<TemplateEntry>, String> {
    let entries = match std::fs::read_dir(template_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("template dir {}: {e}", template_dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let key = entry.file_name().to_string_lossy().into_owned();
        // Templates are `<key>/`; locks (`<key>.lock`) and builds in progress
        // (`<key>.tmp-<pid>`) are not.
        if !dir.is_dir() || key.contains('.') {
            continue;
        }
        let state = vmm::snapshot::SnapshotState::read(&dir).map_err(|e| e.to_string());
        let created = std::fs::metadata(dir.join(vmm::snapshot::STATE_FILE))
            .and_then(|m| m.modified())
            .ok();
        out.push(TemplateEntry {
            key,
            disk_bytes: disk_usage(&dir),
            dir,
            state,
            created,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Removes the template `key` under its build lock (a pod building it is waited for; pods
/// already cloned from it keep their mapping of the deleted memory file).
pub fn remove(template_dir: &Path, key: &str) -> Result<(), String> {
    if key.is_empty() || key.contains('/') || key.contains('.') {
        return Err(format!(
            "{key:?} is not a template key (see `podvisor template list`)"
        ));
    }
    let dir = template_dir.join(key);
    if !dir.is_dir() {
        return Err(format!("no template {key} in {}", template_dir.display()));
    }
    // The lock file stays: removing it could let two builders lock different inodes.
    let _lock = Lock::take(&template_dir.join(format!("{key}.lock")))?;
    std::fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))
}

/// Fresh entropy for CreateSandbox (a template clone must not continue its template's
/// random state): 64 bytes from the host, or an error.
pub fn entropy() -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 64];
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most rest.len() bytes into rest.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match n {
            n if n > 0 => filled += n.cast_unsigned(),
            0 => return Err(std::io::Error::other("getrandom returned no bytes")),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"kernel").unwrap();
        VmConfig {
            shape: GuestShape {
                kernel,
                cmdline: "console=ttyS0".into(),
                mem_mib: 256,
                ..GuestShape::default()
            },
            bindings: vmm::HostBindings {
                console: ConsoleConfig::Discard,
                ..Default::default()
            },
        }
    }

    fn nic(tap: &str, mac: u8, mtu: u16) -> vmm::config::NetConfig {
        vmm::config::NetConfig {
            tap: vmm::config::TapSource::Name(tap.into()),
            mac: Some([2, 0, 0, 0, 0, mac]),
            mtu: Some(mtu),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("podvisor-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn key_follows_what_shapes_the_guest() {
        let dir = temp_dir("tkey");
        let a = config(&dir);
        let key_of = |c: &VmConfig| key(&c.shape);
        assert_eq!(key_of(&a), key_of(&a.clone()));
        assert_eq!(key_of(&a).len(), 32);
        let mut more_mem = a.clone();
        more_mem.shape.mem_mib = 512;
        assert_ne!(key_of(&a), key_of(&more_mem));
        let before = key_of(&a);
        std::fs::write(&a.shape.kernel, b"another kernel").unwrap();
        assert_ne!(before, key_of(&a), "a rebuilt kernel makes a new template");
        let with_nic = |n| {
            let mut c = a.clone();
            c.add_nic(n);
            c
        };
        assert_ne!(
            key_of(&a),
            key_of(&with_nic(nic("t0", 1, 1500))),
            "a NIC shapes the guest"
        );
        assert_eq!(
            key_of(&with_nic(nic("t0", 1, 1500))),
            key_of(&with_nic(nic("t1", 2, 1500))),
            "the pod's tap and MAC do not"
        );
        assert_ne!(
            key_of(&with_nic(nic("t0", 1, 1500))),
            key_of(&with_nic(nic("t0", 1, 9000))),
            "the MTU does"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pods_of_any_vcpu_count_share_the_one_vcpu_template_when_vcpus_can_be_parked() {
        let dir = temp_dir("tvcpus");
        let base = config(&dir);
        let with = |vcpus, max_vcpus| {
            let mut c = base.clone();
            c.shape.vcpus = vcpus;
            c.shape.max_vcpus = max_vcpus;
            c
        };
        let one = with(1, 4);
        for vcpus in [2, 4] {
            let pod = with(vcpus, 4);
            assert_eq!(key(&pod.shape), key(&one.shape), "{vcpus} vCPUs");
            assert_eq!(online_after_restore(&pod.shape), Some(vcpus));
            assert_eq!(restore_config(dir.clone(), &pod).shape.unwrap().vcpus, 1);
        }
        assert_eq!(online_after_restore(&one.shape), None);
        // Other vCPU slot counts are other templates (the VM has that many vCPUs).
        assert_eq!(key(&with(2, 2).shape), key(&with(1, 2).shape));
        assert_ne!(key(&with(1, 2).shape), key(&one.shape));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every leaf of `v` (objects and arrays walked), by path.
    fn leaves(v: &serde_json::Value, path: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    leaves(v, format!("{path}/{k}"), out)
                }
            }
            serde_json::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    leaves(v, format!("{path}/{i}"), out)
                }
            }
            _ => out.push(path),
        }
    }

    /// Other values for a leaf: the first that still makes a shape is used.
    fn other_values(v: &serde_json::Value) -> Vec<serde_json::Value> {
        use serde_json::Value;
        match v {
            Value::Bool(b) => vec![Value::Bool(!b)],
            Value::Number(n) => vec![(n.as_u64().unwrap() + 1).into()],
            // Free text, or one of an enum's names (the share's cache policy).
            Value::String(s) => [format!("{s}x"), "never".into(), "always".into()]
                .into_iter()
                .filter(|o| o != s)
                .map(Value::String)
                .collect(),
            Value::Null => panic!("the sample shape leaves an option unset"),
            _ => unreachable!(),
        }
    }

    #[test]
    fn every_shape_field_changes_the_key_and_no_binding_does() {
        let dir = temp_dir("tkey-fields");
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, b"initrd").unwrap();
        // A shape with every option set and every list non-empty, so that each field has a
        // leaf to change.
        let mut pod = config(&dir);
        pod.shape.initrd = Some(initrd);
        pod.add_disk(vmm::config::BlockConfig {
            path: "/pod/disk.img".into(),
            read_only: false,
            id: Some("disk0".into()),
        });
        pod.add_share(vmm::config::ShareConfig::new("share0", &dir, Default::default()).unwrap());
        pod.set_vsock(3, "/pod/v.sock".into());
        pod.add_nic(nic("tap0", 1, 1500));
        let base = key(&pod.shape);
        let json = serde_json::to_value(&pod.shape).unwrap();
        let mut paths = Vec::new();
        leaves(&json, String::new(), &mut paths);
        assert!(paths.len() >= 20, "{paths:?}");
        for path in paths {
            let leaf = json.pointer(&path).unwrap();
            let changed = other_values(leaf)
                .into_iter()
                .find_map(|other| {
                    let mut v = json.clone();
                    *v.pointer_mut(&path).unwrap() = other;
                    serde_json::from_value::<GuestShape>(v).ok()
                })
                .unwrap_or_else(|| panic!("{path}: no other value makes a shape"));
            if path.starts_with("/nics/") && path.contains("/mac") {
                // The template's MACs are its own; the pod's never reach the key.
                assert_eq!(key(&changed), base, "{path}");
            } else {
                assert_ne!(key(&changed), base, "{path} must change the key");
            }
        }
        // Bindings: other paths, taps, console and host settings keep the key.
        let mut other = pod.clone();
        let b = &mut other.bindings;
        b.console = ConsoleConfig::File(dir.join("console"));
        b.disks = vec!["/other/disk.img".into()];
        b.shares[0].dir = dir.join("elsewhere");
        b.shares[0].limits.max_inodes = 1;
        b.vsock = Some("/other/v.sock".into());
        b.taps = vec![vmm::config::TapSource::Name("tap9".into())];
        b.host = vmm::HostSettings {
            kvm_device: "/dev/other-kvm".into(),
            memory: vmm::MemoryKnobs {
                noreserve: false,
                ksm: true,
            },
            quirks: vmm::HostQuirks::Pvm,
            seccomp: vmm::SeccompMode::Off,
            profile_hz: 100,
        };
        assert_eq!(key(&other.shape), base);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_clone_expects_the_templates_shape_with_its_own_bindings() {
        let dir = temp_dir("tkey-restore");
        let mut pod = config(&dir);
        pod.add_nic(nic("podtap", 7, 9000));
        let r = restore_config(dir.join("k"), &pod);
        let expected = r.shape.expect("a clone checks the template's shape");
        assert_eq!(expected.nics[0].mac, Some(template_mac(0)));
        assert_eq!(expected.nics[0].mtu, Some(9000));
        assert_eq!(
            key(&expected),
            key(&pod.shape),
            "the template's shape is its own"
        );
        assert!(matches!(
            &r.bindings.taps[0],
            vmm::config::TapSource::Name(t) if t == "podtap"
        ));
        assert_eq!(r.bindings.console, ConsoleConfig::Discard);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_collection_keeps_the_most_recently_used_templates() {
        let dir = std::env::temp_dir().join(format!("pv-tpl-gc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = std::time::SystemTime::now() - Duration::from_secs(1000);
        for (i, key) in ["aa", "bb", "cc", "dd"].iter().enumerate() {
            std::fs::create_dir_all(dir.join(key)).unwrap();
            let used = std::fs::File::create(dir.join(key).join(USED_FILE)).unwrap();
            used.set_modified(t0 + Duration::from_secs(i as u64 * 10))
                .unwrap();
        }
        // A build in progress and a lock are not templates.
        std::fs::create_dir_all(dir.join("ee.tmp-1")).unwrap();
        std::fs::write(dir.join("aa.lock"), "").unwrap();
        // "aa" is the oldest but was just built: it stays; of the others the newest stay.
        let mut removed = collect_garbage(&dir, 3, "aa");
        removed.sort();
        assert_eq!(removed, ["bb"]);
        for key in ["aa", "cc", "dd", "ee.tmp-1"] {
            assert!(dir.join(key).is_dir(), "{key}");
        }
        touch_used(&dir.join("cc"));
        assert_eq!(collect_garbage(&dir, 2, "aa"), ["dd"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entropy_is_fresh() {
        let (a, b) = (entropy().unwrap(), entropy().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
