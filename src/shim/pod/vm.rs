//! The pod VM: its configuration from the shim's settings, the choice between a template
//! clone and a cold boot, and the thread that starts it and waits for it to stop.
//!
//! A template that cannot be restored is discarded only when the error says the snapshot
//! itself is unusable ([`vmm::VmError::invalidates_snapshot`]); a failure of this host or
//! of this pod's bindings (KVM, memory, a socket, a tap, a thread) leaves the template for
//! the next pod. Either way the VM then boots cold.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm::config::{GuestShape, HostBindings, ShareConfig, DEFAULT_CMDLINE, DEFAULT_GUEST_CID};
use vmm::{
    BalloonControl, ConsoleConfig, GuestProfileHandle, RestoreConfig, Vm, VmConfig, VmError,
    VmReport, VmStatsHandle, VmStopHandle,
};

use super::state::{StateDir, SHARE_TAG};
use super::PodError;
use crate::config::TemplateMode;
use crate::{template, ShimConfig};

/// A pod VM's kernel command line: the VMM's default plus `quiet`. Boot messages stay in
/// the guest's kernel log; only warnings and worse reach the console, where each byte is a
/// trapped port write (measured here: a cold boot to the agent 24.3 s → 21.8 s).
/// `podvisor boot` keeps them on the console (it is for debugging a boot).
fn pod_cmdline() -> String {
    format!("{DEFAULT_CMDLINE} quiet")
}

/// The pod VM's configuration for `config`: its shape, and its bindings to the pod's host
/// paths under `state` and the shim's host settings (a template build replaces the paths
/// with scratch ones; bindings never enter the template key). The pod's NICs are added
/// once its network is wired ([`VmConfig::add_nic`]).
pub fn pod_vm_config(config: &ShimConfig, state: &StateDir) -> Result<VmConfig, PodError> {
    let kernel = config.kernel.clone().ok_or(PodError::NoKernel)?;
    let initrd = config.initrd.clone().ok_or(PodError::NoInitrd)?;
    for (path, var) in [
        (&kernel, "`kernel` or PODVISOR_KERNEL"),
        (&initrd, "`initrd` or PODVISOR_INITRD"),
    ] {
        if !path.is_file() {
            return Err(PodError::NotAFile {
                path: path.clone(),
                var,
            });
        }
    }
    let share = ShareConfig::new(SHARE_TAG, state.shared(), Default::default())
        .map_err(|e| PodError::ShareConfig(e.to_string()))?;
    let mut vm = VmConfig {
        shape: GuestShape {
            kernel,
            initrd: Some(initrd),
            cmdline: pod_cmdline(),
            vcpus: config.vcpus,
            max_vcpus: vcpu_slots(config),
            mem_mib: config.mem_mib,
            balloon: config.balloon,
            ..GuestShape::default()
        },
        bindings: HostBindings {
            console: ConsoleConfig::CappedFile(state.console(), Default::default()),
            host: config.host_settings(),
            ..HostBindings::default()
        },
    };
    vm.add_share(share);
    vm.set_vsock(DEFAULT_GUEST_CID, state.vsock());
    Ok(vm)
}

/// The vCPUs a pod VM has: with `resizable_vcpus`, `max_vcpus` but no more than the host
/// has CPUs (those beyond the pod's `vcpus` parked until an Update brings them online; a
/// parked vCPU costs a thread and the guest's per-CPU memory); else just `vcpus`.
pub fn vcpu_slots(config: &ShimConfig) -> usize {
    vcpu_slots_on(config, host_cpus())
}

fn vcpu_slots_on(config: &ShimConfig, host_cpus: usize) -> usize {
    if config.resizable_vcpus {
        config.max_vcpus.min(host_cpus).max(config.vcpus)
    } else {
        config.vcpus
    }
}

/// The host's online CPUs (not this process's share: the pod's cgroup may limit that).
fn host_cpus() -> usize {
    // SAFETY: sysconf reads a value of the system; no memory is involved.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

/// How the pod VM comes up.
pub enum VmSource {
    /// A cold boot.
    Boot(VmConfig),
    /// A clone of a template; if it cannot be restored, the VM boots cold.
    Template(Box<RestoreConfig>, VmConfig),
}

impl VmSource {
    /// How the VM comes up, for the pod's timeline: `template` or `boot`.
    pub fn kind(&self) -> &'static str {
        match self {
            VmSource::Boot(_) => "boot",
            VmSource::Template(..) => "template",
        }
    }

    /// A template clone when the settings allow one and a template can be had, else a
    /// cold boot of `vm`.
    pub fn choose(pod: &str, config: &ShimConfig, vm: VmConfig) -> VmSource {
        match config.template {
            TemplateMode::Off => VmSource::Boot(vm),
            TemplateMode::Auto if !config.template_allowed() => {
                log::info!(
                    "pod {pod}: its annotations chose {} vCPU(s) and {} MiB, not a shape in \
                     template_shapes: booting cold",
                    config.vcpus,
                    config.mem_mib
                );
                VmSource::Boot(vm)
            }
            TemplateMode::Auto => match template::ensure(
                &config.template_dir,
                config.max_templates,
                &vm,
                config.agent_timeout,
            ) {
                Ok(dir) => VmSource::Template(Box::new(template::restore_config(dir, &vm)), vm),
                Err(e) => {
                    log::warn!("no VM template ({e}); booting the pod VM cold");
                    VmSource::Boot(vm)
                }
            },
        }
    }
}

/// Starts the VM `source` describes: a clone, else (or when the clone fails) a cold boot.
/// `discard` drops a template whose snapshot is unusable.
fn start<T>(
    source: VmSource,
    restore: impl FnOnce(&RestoreConfig) -> Result<T, VmError>,
    boot: impl FnOnce(VmConfig) -> Result<T, VmError>,
    discard: impl FnOnce(&Path),
) -> Result<T, VmError> {
    match source {
        VmSource::Boot(config) => boot(config),
        VmSource::Template(rc, config) => {
            let t = Instant::now();
            match restore(&rc) {
                Ok(vm) => {
                    log::info!(
                        "pod VM restored from template {} in {:.1} ms",
                        rc.snapshot.display(),
                        t.elapsed().as_secs_f64() * 1000.0
                    );
                    Ok(vm)
                }
                Err(e) => {
                    if e.invalidates_snapshot() {
                        log::warn!(
                            "template {} is unusable ({e}): discarding it; booting the pod VM cold",
                            rc.snapshot.display()
                        );
                        discard(&rc.snapshot);
                    } else {
                        log::warn!(
                            "cannot restore template {}: {e}; booting the pod VM cold (the \
                             template is kept: the error is not about it)",
                            rc.snapshot.display()
                        );
                    }
                    boot(config)
                }
            }
        }
    }
}

/// Called once when the pod VM has stopped, with the reason.
pub type OnVmExit = Box<dyn FnOnce(String) + Send>;

/// A started pod VM: its waiting thread and its handles.
pub struct VmThread {
    pub handle: JoinHandle<VmReport>,
    pub stop: VmStopHandle,
    pub balloon: Option<BalloonControl>,
    pub stats: VmStatsHandle,
    /// The guest profile, when `guest_profile_hz` asks for one.
    pub profile: Option<GuestProfileHandle>,
}

/// What the VM's thread hands back once the VM runs.
struct Handles {
    stop: VmStopHandle,
    balloon: Option<BalloonControl>,
    stats: VmStatsHandle,
    profile: Option<GuestProfileHandle>,
}

/// Builds, starts and waits for the VM in its own thread; returns once it runs, or with
/// the error that kept it from running. `on_exit` runs when the started VM stops.
pub fn spawn(source: VmSource, on_exit: OnVmExit) -> Result<VmThread, PodError> {
    let (ready, started) = mpsc::channel::<Result<Handles, VmError>>();
    let handle = std::thread::Builder::new()
        .name("vm-wait".into())
        .spawn(move || {
            let running = start(
                source,
                |rc| Vm::restore(rc, Instant::now()).and_then(Vm::start),
                |config| Vm::new(config, Instant::now()).and_then(Vm::start),
                template::discard,
            );
            match running {
                Ok(running) => {
                    let _ = ready.send(Ok(Handles {
                        stop: running.stop_handle(),
                        balloon: running.balloon(),
                        stats: running.stats(),
                        profile: running.profile(),
                    }));
                    let report = running.wait(None);
                    log::info!("VM stopped: {}", report.reason);
                    on_exit(report.reason.to_string());
                    report
                }
                Err(e) => {
                    let reason = vmm::ExitReason::Stopped(e.to_string());
                    let _ = ready.send(Err(e));
                    VmReport {
                        reason,
                        timings: Default::default(),
                        console_tail: String::new(),
                    }
                }
            }
        })
        .map_err(PodError::VmThread)?;
    match started.recv() {
        Ok(Ok(h)) => Ok(VmThread {
            handle,
            stop: h.stop,
            balloon: h.balloon,
            stats: h.stats,
            profile: h.profile,
        }),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(PodError::Vm(e))
        }
        Err(_) => Err(PodError::VmThreadDied),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::path::PathBuf;

    use vmm::SnapshotError;

    use super::*;

    fn vm_config() -> VmConfig {
        VmConfig {
            shape: GuestShape {
                kernel: "/k".into(),
                cmdline: String::new(),
                ..GuestShape::default()
            },
            bindings: HostBindings {
                console: ConsoleConfig::Discard,
                ..HostBindings::default()
            },
        }
    }

    /// Restores with `restore_err`; whether the template was discarded and the VM booted.
    fn restore_failing_with(restore_err: VmError) -> (bool, bool) {
        let discarded = Cell::new(false);
        let booted = Cell::new(false);
        let source = VmSource::Template(
            Box::new(RestoreConfig::new(PathBuf::from("/tpl"))),
            vm_config(),
        );
        let r = start(
            source,
            |_| Err::<(), _>(restore_err),
            |_| {
                booted.set(true);
                Ok(())
            },
            |dir| {
                assert_eq!(dir, Path::new("/tpl"));
                discarded.set(true)
            },
        );
        assert!(r.is_ok());
        (discarded.get(), booted.get())
    }

    #[test]
    fn a_template_is_discarded_only_when_its_snapshot_is_unusable() {
        let corrupt = VmError::Snapshot(SnapshotError::Corrupt {
            path: "/tpl/state".into(),
            reason: "short".into(),
        });
        assert_eq!(restore_failing_with(corrupt), (true, true));
        // A socket in use, no memory, a thread: the template is fine.
        for e in [
            VmError::Snapshot(SnapshotError::Io {
                path: "/tpl/memory".into(),
                source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
            }),
            VmError::Spawner(std::io::Error::from(std::io::ErrorKind::WouldBlock)),
            VmError::KvmApiVersion(11),
        ] {
            assert_eq!(restore_failing_with(e), (false, true));
        }
    }

    #[test]
    fn a_garbage_snapshot_is_an_unusable_one() {
        let dir = std::env::temp_dir().join(format!("podvisor-garbage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [vmm::snapshot::STATE_FILE, vmm::snapshot::MEMORY_FILE] {
            std::fs::write(dir.join(f), b"not a snapshot").unwrap();
        }
        let e = Vm::restore(&RestoreConfig::new(dir.clone()), Instant::now())
            .err()
            .expect("garbage restores");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.invalidates_snapshot(), "{e}");
    }

    #[test]
    fn a_vm_has_max_vcpus_up_to_the_hosts_cpus_and_at_least_its_own() {
        let config = |vcpus, max_vcpus, resizable_vcpus| ShimConfig {
            vcpus,
            max_vcpus,
            resizable_vcpus,
            ..ShimConfig::default()
        };
        assert_eq!(vcpu_slots_on(&config(1, 8, true), 2), 2);
        assert_eq!(vcpu_slots_on(&config(1, 8, true), 16), 8);
        assert_eq!(vcpu_slots_on(&config(4, 8, true), 2), 4);
        assert_eq!(vcpu_slots_on(&config(2, 8, false), 16), 2);
    }

    #[test]
    fn pods_boot_quiet() {
        let line = pod_cmdline();
        assert!(line.starts_with(DEFAULT_CMDLINE), "{line}");
        assert!(line.split(' ').any(|w| w == "quiet"), "{line}");
    }

    #[test]
    fn a_boot_never_touches_templates() {
        let r = start(
            VmSource::Boot(vm_config()),
            |_| -> Result<u8, VmError> { panic!("no restore") },
            |_| Ok(1),
            |_| panic!("no discard"),
        );
        assert_eq!(r.unwrap(), 1);
    }
}
