//! Pod templates: a booted pod VM, snapshotted once, that every later pod restores as a
//! copy-on-write clone instead of booting (`template = "auto"`).
//!
//! A template is keyed by what shapes the booted guest: the podvisor version, the kernel and
//! initrd (path, size, modification time), vCPUs, memory, the command line and the NICs'
//! number and MTUs (a template VM's NICs sit on taps in a detached network namespace;
//! clones bind their pods' taps and the agent gives the NIC the pod's MAC). It lives in
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

use sha2::{Digest, Sha256};
use vmm::{ConsoleConfig, Vm, VmConfig};

/// How long the agent may run after its marker before the template is saved (it has just
/// started listening; let it settle in accept()).
const SETTLE: Duration = Duration::from_secs(2);

/// The template key of `config` (the pod VM's configuration before host paths are bound).
pub fn key(config: &VmConfig) -> String {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION"));
    for path in std::iter::once(&config.kernel).chain(config.initrd.iter()) {
        h.update(path.to_string_lossy().as_bytes());
        if let Ok(m) = std::fs::metadata(path) {
            h.update(m.len().to_le_bytes());
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .unwrap_or_default();
            h.update(mtime.as_nanos().to_le_bytes());
        }
    }
    h.update(config.vcpus.to_le_bytes());
    h.update(config.mem_mib.to_le_bytes());
    h.update(config.cmdline.as_bytes());
    for s in &config.shares {
        h.update(s.tag.as_bytes());
    }
    if let Some(v) = &config.vsock {
        h.update(v.guest_cid.to_le_bytes());
    }
    // The NICs' number and MTUs shape the guest (the MTU caps what the guest may set);
    // their taps and MACs are the pod's.
    if !config.net.is_empty() {
        h.update(b"net");
        for n in &config.net {
            h.update(n.mtu.unwrap_or(0).to_le_bytes());
        }
    }
    let d = h.finalize();
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
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

/// The template directory for `config`, building the template first if it is missing.
/// `config`'s share and vsock are replaced by scratch ones for the template VM.
pub fn ensure(
    template_dir: &Path,
    max_templates: usize,
    config: &VmConfig,
    timeout: Duration,
) -> Result<PathBuf, String> {
    let key = key(config);
    let dir = template_dir.join(&key);
    if dir.join(vmm::snapshot::STATE_FILE).is_file() {
        touch_used(&dir);
        return Ok(dir);
    }
    vmm::snapshot_support()
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
    let mut cfg = config.clone();
    for s in &mut cfg.shares {
        s.dir = share_dir.clone();
    }
    if let Some(v) = &mut cfg.vsock {
        v.uds_path = scratch.join("vsock.sock");
    }
    // The template's NICs sit on taps that reach nothing; clones get their pods' taps.
    for (i, n) in cfg.net.iter_mut().enumerate() {
        let tap = super::net::tap::create_detached(&format!("pvtpl{i}"))
            .map_err(|e| format!("a tap for the template VM's NIC {i}: {e}"))?;
        n.tap = vmm::config::TapSource::from(tap);
        n.mac = Some([0x02, 0x70, 0x76, 0, 0, i as u8]);
    }
    let console = scratch.join("console.log");
    cfg.console = ConsoleConfig::CappedFile(console.clone(), Default::default());
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
            n if n > 0 => filled += n as usize,
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
            kernel,
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            mem_mib: 256,
            console: ConsoleConfig::Discard,
            disks: Vec::new(),
            shares: Vec::new(),
            vsock: None,
            net: Vec::new(),
        }
    }

    #[test]
    fn key_follows_what_shapes_the_guest() {
        let dir = std::env::temp_dir().join(format!("podvisor-tkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = config(&dir);
        assert_eq!(key(&a), key(&a.clone()));
        assert_eq!(key(&a).len(), 32);
        let more_mem = VmConfig {
            mem_mib: 512,
            ..a.clone()
        };
        assert_ne!(key(&a), key(&more_mem));
        let console = VmConfig {
            console: ConsoleConfig::File(dir.join("c")),
            ..a.clone()
        };
        assert_eq!(key(&a), key(&console), "host paths do not change the guest");
        let before = key(&a);
        std::fs::write(&a.kernel, b"another kernel").unwrap();
        assert_ne!(before, key(&a), "a rebuilt kernel makes a new template");
        let nic = |tap: &str, mac: u8, mtu: u16| vmm::config::NetConfig {
            tap: vmm::config::TapSource::Name(tap.into()),
            mac: Some([2, 0, 0, 0, 0, mac]),
            mtu: Some(mtu),
        };
        let with_nic = |n: vmm::config::NetConfig| VmConfig {
            net: vec![n],
            ..a.clone()
        };
        assert_ne!(
            key(&a),
            key(&with_nic(nic("t0", 1, 1500))),
            "a NIC shapes the guest"
        );
        assert_eq!(
            key(&with_nic(nic("t0", 1, 1500))),
            key(&with_nic(nic("t1", 2, 1500))),
            "the pod's tap and MAC do not"
        );
        assert_ne!(
            key(&with_nic(nic("t0", 1, 1500))),
            key(&with_nic(nic("t0", 1, 9000))),
            "the MTU does"
        );
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
