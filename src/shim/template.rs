//! Pod templates: a booted pod VM, snapshotted once, that every later pod restores as a
//! copy-on-write clone instead of booting (`template = "auto"`).
//!
//! A template is keyed by what shapes the booted guest: the podvisor version, the kernel and
//! initrd (path, size, modification time), vCPUs, memory and the command line. It lives in
//! `<template_dir>/<key>/` (`state` + sparse `memory`, `vmm::snapshot`'s format). The first
//! pod that needs a missing template builds it under an exclusive `flock` on
//! `<template_dir>/<key>.lock`, so concurrent pods wait for one build instead of racing: a
//! template VM (its own scratch share and vsock socket) boots until the agent is listening
//! (the boot-timer marker), is paused and saved to `<key>.tmp-<pid>`, which is renamed into
//! place, and stops.
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
    config: &VmConfig,
    timeout: Duration,
) -> Result<PathBuf, String> {
    let key = key(config);
    let dir = template_dir.join(&key);
    if dir.join(vmm::snapshot::STATE_FILE).is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(template_dir)
        .map_err(|e| format!("template dir {}: {e}", template_dir.display()))?;
    let _lock = Lock::take(&template_dir.join(format!("{key}.lock")))?;
    if dir.join(vmm::snapshot::STATE_FILE).is_file() {
        return Ok(dir); // Built by another pod while we waited.
    }
    let scratch = template_dir.join(format!("{key}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let result = build(&scratch, &dir, config, timeout);
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| dir)
}

fn build(scratch: &Path, dir: &Path, config: &VmConfig, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    let share_dir = scratch.join("share");
    std::fs::create_dir_all(&share_dir)
        .map_err(|e| format!("template scratch {}: {e}", share_dir.display()))?;
    let mut cfg = config.clone();
    for s in &mut cfg.shares {
        s.dir = share_dir.clone();
    }
    if let Some(v) = &mut cfg.vsock {
        v.uds_path = scratch.join("vsock.sock");
    }
    let console = scratch.join("console.log");
    cfg.console = ConsoleConfig::File(console.clone());
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

/// Fresh entropy for a clone's CreateSandbox.
pub fn entropy() -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    buf.truncate(n.max(0) as usize);
    buf
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
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entropy_is_fresh() {
        let (a, b) = (entropy(), entropy());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
