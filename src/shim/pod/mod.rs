//! The pod: its VM's whole life in this process. Create makes the state dir and the share,
//! wires the pod network, starts the VM (template clone or cold boot, [`vm`]), waits for
//! the agent and sets the sandbox up in it; containers are mounted into and unmounted from
//! the share through [`PodHost`]; destroy tears the sandbox down, stops the VM, unwires the
//! network and removes the state dir.
//!
//! Pod network: a pod whose sandbox spec joins a network namespace (CRI + CNI) gets that
//! namespace wired to a tap per CNI interface (`super::net`), one virtio-net NIC on each
//! tap, and the agent configures the guest NICs after CreateSandbox. Template clones get
//! this pod's taps as restore bindings.

mod cgroup;
pub mod resize;
mod state;
pub mod vm;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use podvisor_agent_protocol::agent::{CreateSandboxRequest, SharedMount};
use podvisor_agent_protocol::vsock::connect_hybrid_vsock;
use podvisor_agent_protocol::{PORT_FORWARD_VSOCK_PORT, PROTOCOL_VERSION};

/// How long a port-forward connection to the agent may take to be accepted.
const FORWARD_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
use vmm::config::{NetConfig, TapSource};

pub use cgroup::{CgroupError, PodCgroup};
pub use resize::{ContainerLimits, PodSize, ResizeError, Resizer};
pub use state::{cleanup_state_dir, StateDir, SHARED_IN_GUEST, SHARE_TAG};
pub use vm::{pod_vm_config, OnVmExit};

use super::agent::{Agent, AgentError, TtrpcAgent};
use super::net::{NetError, PodNetwork};
use super::share::{self, PodShare, RootfsMount, ShareError};
use super::spec::HostBind;
use super::timeline::{phase, Timeline};
use super::{file_tail, template, ShimConfig};

/// Console lines quoted in errors.
const TAIL_LINES: usize = 30;

/// Why the pod VM could not be brought up; each says what to fix where it can.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(
        "no guest kernel: set `kernel` in the podvisor config file (/etc/podvisor/config.toml) \
         or PODVISOR_KERNEL in containerd's environment (`make guest-kernel` prints the path)"
    )]
    NoKernel,
    #[error(
        "no agent initramfs: set `initrd` in the podvisor config file \
         (/etc/podvisor/config.toml) or PODVISOR_INITRD in containerd's environment \
         (`make rootfs` builds out/agent-test.cpio)"
    )]
    NoInitrd,
    #[error("{} ({var}: podvisor config file or containerd's environment) is not a file", path.display())]
    NotAFile { path: PathBuf, var: &'static str },
    #[error("virtio-fs share: {0}")]
    ShareConfig(String),
    #[error("pod state dir: {0}")]
    StateDir(ShareError),
    #[error("pod share: {0}")]
    Share(ShareError),
    #[error("pod network: {0}")]
    Network(#[from] NetError),
    #[error("pod network: a tap fd for the VM: {0}")]
    TapFd(std::io::Error),
    #[error("cannot start the pod VM: {0}")]
    Vm(vmm::VmError),
    #[error("cannot start the VM thread: {0}")]
    VmThread(std::io::Error),
    #[error("the VM thread died while starting the VM")]
    VmThreadDied,
    #[error("{reason}\nlast guest console lines ({}):\n{tail}", console.display())]
    AgentUnreachable {
        reason: String,
        console: PathBuf,
        tail: String,
    },
    #[error("the agent speaks protocol {0}, this shim {PROTOCOL_VERSION}")]
    Protocol(u32),
    #[error("no fresh host entropy for the pod VM: {0}")]
    Entropy(std::io::Error),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// What a container needs mounted in the pod's share before the guest creates it.
#[derive(Debug, Clone, Default)]
pub struct ContainerMounts {
    /// containerd's rootfs mounts (empty: the bundle's `rootfs` directory).
    pub rootfs: Vec<RootfsMount>,
    pub bundle_rootfs: PathBuf,
    pub readonly: bool,
    /// Mount destinations in the container, with whether each is a directory: made in a
    /// read-only rootfs before it turns read-only.
    pub mountpoints: Vec<(String, bool)>,
    pub binds: Vec<HostBind>,
}

/// The pod as its containers see it: the agent, the share's mounts, whether it is down.
pub trait PodHost: Send + Sync {
    fn agent(&self) -> Arc<dyn Agent>;
    /// Mounts container `id`'s rootfs and binds into the pod's share.
    fn mount(&self, id: &str, mounts: &ContainerMounts) -> Result<(), ShareError>;
    /// Removes what [`Self::mount`] made.
    fn unmount(&self, id: &str) -> Result<(), ShareError>;
    /// The container's rootfs as the guest sees it.
    fn guest_rootfs(&self, id: &str) -> String;
    /// The VM stopped or is being torn down: the agent will not answer.
    fn is_down(&self) -> bool;
    /// The pod's start timeline (none for a pod without one).
    fn timeline(&self) -> Option<Arc<Timeline>> {
        None
    }
    /// Workload container `id` now has `limits`: the pod's VM follows (see [`resize`]). A
    /// pod without a VM of its own size has nothing to do.
    fn set_limits(&self, id: &str, limits: ContainerLimits) -> Result<(), ResizeError> {
        let _ = (id, limits);
        Ok(())
    }
    /// Workload container `id` is gone: its limit leaves the pod's size.
    fn forget_container(&self, id: &str) -> Result<(), ResizeError> {
        let _ = id;
        Ok(())
    }
}

/// A pod as the task service holds it: what containers need, and its own life.
pub trait PodRuntime: PodHost {
    fn id(&self) -> &str;
    /// Where the pod's host state lives (recorded in bundles for `shim delete`).
    fn run_dir(&self) -> Option<PathBuf>;
    /// Tears the pod down; it is down afterwards.
    fn destroy(&self);
}

/// How the task service brings a pod up: a VM in this process ([`VmPods`]), or in tests an
/// agent running on the host.
pub trait PodFactory: Send + Sync {
    /// Brings up the pod `req` describes with `config`; `on_exit` runs once when it stops
    /// by itself.
    fn create(
        &self,
        req: &PodRequest,
        config: &ShimConfig,
        on_exit: OnVmExit,
    ) -> Result<Arc<dyn PodRuntime>, PodError>;
}

/// What the sandbox's spec says about the pod.
#[derive(Debug, Clone, Copy)]
pub struct PodRequest<'a> {
    pub id: &'a str,
    /// The guest's hostname (empty: the pod id).
    pub hostname: &'a str,
    /// The network namespace CNI made for the pod, if any.
    pub netns: Option<&'a Path>,
    /// The pod's host cgroup (`linux.cgroupsPath`), which the shim process joins.
    pub cgroups_path: Option<&'a str>,
    /// The pod's kernel parameters (the sandbox spec's `linux.sysctl`), set in the VM.
    pub sysctls: &'a std::collections::HashMap<String, String>,
    /// The pod's start timeline, marked as the pod comes up.
    pub timeline: &'a Arc<Timeline>,
}

/// Pods as VMs of this process ([`Pod::create`]).
pub struct VmPods;

impl PodFactory for VmPods {
    fn create(
        &self,
        req: &PodRequest,
        config: &ShimConfig,
        on_exit: OnVmExit,
    ) -> Result<Arc<dyn PodRuntime>, PodError> {
        Ok(Arc::new(Pod::create(req, config, on_exit)?))
    }
}

/// A running pod VM with its agent.
pub struct Pod {
    id: String,
    state: StateDir,
    agent: Arc<TtrpcAgent>,
    /// The pod's share (until teardown, which closes it so that its mounts can go).
    share: Mutex<Option<PodShare>>,
    vm: Mutex<Option<vm::VmThread>>,
    /// Teardown has begun.
    destroyed: AtomicBool,
    /// The wiring of the pod's network namespace; undone after the VM stopped.
    network: Mutex<Option<PodNetwork>>,
    /// The pod's host cgroup, which this process joined; left at teardown.
    cgroup: Mutex<Option<PodCgroup>>,
    /// The VM's size as its containers' limits want it.
    size: Resizer,
    /// The pod's start, phase by phase.
    timeline: Arc<Timeline>,
}

/// The pod's network wiring, when its sandbox spec names a network namespace (`netns`).
fn pod_network(id: &str, netns: Option<&Path>) -> Result<Option<PodNetwork>, PodError> {
    match netns {
        None => {
            log::info!(
                "pod {id}: the sandbox spec joins no network namespace (`ctr run`, or a \
                 hostNetwork pod): the VM gets no NIC, loopback only"
            );
            Ok(None)
        }
        Some(path) => Ok(Some(PodNetwork::setup(path)?)),
    }
}

/// The agent's CreateSandbox for pod `id`.
fn sandbox_request(
    id: &str,
    hostname: &str,
    sysctls: &std::collections::HashMap<String, String>,
) -> Result<CreateSandboxRequest, PodError> {
    let mut req = CreateSandboxRequest::new();
    req.sandbox_id = id.to_string();
    req.sysctls = sysctls.clone();
    // Per-pod identity (a template clone starts with the template's clock and pool).
    req.entropy = template::entropy().map_err(PodError::Entropy)?;
    req.realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    req.hostname = if hostname.is_empty() { id } else { hostname }
        .chars()
        .take(63)
        .collect();
    let mut mount = SharedMount::new();
    mount.fstype = "virtiofs".into();
    mount.source = SHARE_TAG.into();
    mount.target = SHARED_IN_GUEST.into();
    req.mounts.push(mount);
    Ok(req)
}

/// What is up of a pod being created, undone in reverse when a later step fails.
struct Partial {
    state: StateDir,
    cgroup: Option<PodCgroup>,
    share: Option<PodShare>,
    network: Option<PodNetwork>,
    vm: Option<vm::VmThread>,
}

impl Partial {
    /// Undoes what is up, in reverse: stops the VM (with `reason`, unless it stopped by
    /// itself) and waits for it, closes the share (its descriptors would keep the share's
    /// mounts busy), unwires the network, removes the state dir, and last, once the VM is
    /// gone, leaves the pod's cgroup. A failed create and a pod's teardown both end here.
    fn undo(mut self, reason: &str) {
        if let Some(vm) = self.vm.take() {
            if !vm.handle.is_finished() {
                vm.stop.stop(reason);
            }
            if let Ok(report) = vm.handle.join() {
                log::info!("pod VM stopped: {}", report.reason);
            }
        }
        drop(self.share.take());
        if let Some(net) = self.network.take() {
            let netns = net.netns().to_string();
            match net.teardown() {
                Ok(()) => log::info!("pod network {netns} unwired"),
                Err(e) => log::warn!("pod network teardown: {e}"),
            }
        }
        let _ = cleanup_state_dir(&self.state.root);
        drop(self.cgroup.take());
    }
}

/// What `m` holds, taken out (a poisoned lock still gives it up: teardown must go on).
fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
    m.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// The shim process joins the pod's cgroup; a failure is logged (the pod then runs, not
/// accounted to its cgroup, as before).
fn join_cgroup(id: &str, path: &str) -> Option<PodCgroup> {
    match PodCgroup::join(std::process::id(), path) {
        Ok(cg) => {
            log::info!("pod {id}: the shim process joined cgroup {path}");
            Some(cg)
        }
        Err(e) => {
            log::warn!("pod {id}: its VM is not accounted to the pod's cgroup: {e}");
            None
        }
    }
}

impl Pod {
    /// Brings the pod up: state dir, share, network, VM, agent, sandbox. `netns` is the
    /// pod's network namespace (CRI/CNI), if any. On failure nothing of it is left: no VM,
    /// no network wiring, no state dir.
    pub fn create(
        req: &PodRequest,
        config: &ShimConfig,
        on_exit: OnVmExit,
    ) -> Result<Pod, PodError> {
        let id = req.id;
        if config.seccomp != vmm::SeccompMode::Enforce {
            log::warn!(
                "pod {id}: seccomp = {:?}: the VMM's guest-facing threads are not confined",
                config.seccomp
            );
        }
        let state = StateDir {
            root: config.run_dir.join(id),
        };
        share::create_pod_dir(&config.run_dir, &state.root).map_err(PodError::StateDir)?;
        req.timeline.set_file(state.timeline());
        let mut partial = Partial {
            state,
            cgroup: req.cgroups_path.and_then(|path| join_cgroup(id, path)),
            share: None,
            network: None,
            vm: None,
        };
        match Self::bring_up(req, config, on_exit, &mut partial) {
            Ok(agent) => Ok(Pod {
                timeline: req.timeline.clone(),
                size: Resizer::new(
                    id,
                    PodSize::new(
                        config.mem_mib,
                        u32::try_from(config.vcpus).unwrap_or(u32::MAX),
                        u32::try_from(vm::vcpu_slots(config)).unwrap_or(u32::MAX),
                        config.sizing_rules(),
                    ),
                    partial.vm.as_ref().and_then(|vm| vm.balloon.clone()),
                    config.agent_timeout,
                ),
                id: id.to_string(),
                state: partial.state.clone(),
                agent: Arc::new(agent),
                share: Mutex::new(partial.share.take()),
                vm: Mutex::new(partial.vm.take()),
                destroyed: AtomicBool::new(false),
                network: Mutex::new(partial.network.take()),
                cgroup: Mutex::new(partial.cgroup.take()),
            }),
            Err(e) => {
                req.timeline.finish(false);
                partial.undo("the sandbox could not be set up");
                Err(e)
            }
        }
    }

    fn bring_up(
        req: &PodRequest,
        config: &ShimConfig,
        on_exit: OnVmExit,
        partial: &mut Partial,
    ) -> Result<TtrpcAgent, PodError> {
        let (id, timeline) = (req.id, req.timeline);
        let state = partial.state.clone();
        partial.share = Some(PodShare::create(&state.root).map_err(PodError::Share)?);
        let mut vm_config = pod_vm_config(config, &state)?;
        partial.network = pod_network(id, req.netns)?;
        // One NIC per wired interface, with the CNI interface's MAC and MTU.
        for nic in partial.network.iter().flat_map(|n| &n.nics) {
            vm_config.add_nic(NetConfig {
                tap: TapSource::from(nic.tap_fd().map_err(PodError::TapFd)?),
                mac: Some(nic.mac),
                mtu: Some(nic.mtu),
            });
        }
        let online_after_restore = template::online_after_restore(&vm_config.shape);
        let source = vm::VmSource::choose(id, config, vm_config);
        let restored = matches!(source, vm::VmSource::Template(..));
        timeline.set_source(source.kind());
        timeline.mark(phase::SOURCE);
        let started = vm::spawn(source, on_exit)?;
        timeline.set_vm(started.stats.clone());
        if let (Some(profile), Some(kernel)) = (&started.profile, &config.kernel) {
            timeline.set_profile(profile.clone(), &kernel.with_file_name("System.map"));
        }
        timeline.mark(phase::VM);
        let vm = partial.vm.insert(started);
        log::info!("pod VM {id} started; waiting for the agent");
        let booted = Instant::now();
        let (agent, version) = TtrpcAgent::connect(&state.vsock(), config.agent_timeout, || {
            vm.handle.is_finished()
        })
        .map_err(|reason| PodError::AgentUnreachable {
            reason,
            console: state.console(),
            tail: file_tail(&state.console(), TAIL_LINES),
        })?;
        if version.protocol_version != PROTOCOL_VERSION {
            return Err(PodError::Protocol(version.protocol_version));
        }
        log::info!(
            "agent {} answered {:.1} s after the VM started",
            version.agent_version,
            booted.elapsed().as_secs_f64()
        );
        // A template has one vCPU online; the pod's others are parked in it. (Had the
        // restore failed, the cold boot brought them up already: the call changes nothing.)
        if let (true, Some(vcpus)) = (restored, online_after_restore) {
            let start = Instant::now();
            let wanted = u32::try_from(vcpus).unwrap_or(u32::MAX);
            let online = agent.set_online_cpus(wanted)?;
            log::info!(
                "pod {id}: {online} vCPUs online after the restore, in {:.0} ms",
                start.elapsed().as_secs_f64() * 1000.0
            );
        }
        timeline.mark(phase::AGENT);
        agent.create_sandbox(sandbox_request(id, req.hostname, req.sysctls)?)?;
        timeline.mark(phase::SANDBOX);
        // The guest NICs get the CNI interfaces' names, addresses and routes before any
        // container runs (they share the VM's network namespace).
        if let Some(net) = &mut partial.network {
            agent.configure_network(&net.request)?;
            let vsock = state.vsock();
            let connect: crate::net::forward::Connect = Arc::new(move || {
                connect_hybrid_vsock(&vsock, PORT_FORWARD_VSOCK_PORT, FORWARD_CONNECT_TIMEOUT)
            });
            // Without it the pod runs; only PortForward cannot reach it.
            if let Err(e) = net.forward_ports(connect) {
                log::warn!(
                    "pod {id}: port forwarding is off: {e} (it needs BPF sk_lookup, Linux 5.9+, \
                     and CAP_BPF or CAP_SYS_ADMIN)"
                );
            }
            timeline.mark(phase::NETWORK);
        }
        Ok(agent)
    }

    /// Whether the VM has stopped.
    fn vm_stopped(&self) -> bool {
        self.vm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|vm| vm.handle.is_finished())
    }

    fn with_share<R>(
        &self,
        f: impl FnOnce(&PodShare) -> Result<R, ShareError>,
    ) -> Result<R, ShareError> {
        let share = self.share.lock().unwrap_or_else(|p| p.into_inner());
        match share.as_ref() {
            Some(share) => f(share),
            None => Err(ShareError::TornDown),
        }
    }

    /// Tears the pod down: DestroySandbox, then the VM stops, the share closes, the
    /// network is unwired and the state dir removed. The agent answers DestroySandbox once
    /// it has removed what was left, detached its mounts and synced the guest's file
    /// systems (data written to host volumes is on the host then): nothing in the guest
    /// needs to run any more, so the vCPUs are stopped right away instead of waiting for
    /// the guest kernel to reboot itself, which an emulated guest kernel under load takes
    /// minutes to do. If the agent does not answer (the guest died or hangs) the VM is
    /// stopped too.
    pub fn destroy(&self) {
        self.destroyed.store(true, Ordering::SeqCst);
        self.timeline.finish(false);
        if let Err(e) = self.agent.destroy_sandbox() {
            log::warn!("{e}; stopping the VM without it");
        }
        let parts = Partial {
            state: self.state.clone(),
            cgroup: take(&self.cgroup),
            share: take(&self.share),
            network: take(&self.network),
            vm: take(&self.vm),
        };
        parts.undo("pod teardown (after DestroySandbox)");
    }
}

impl PodRuntime for Pod {
    fn id(&self) -> &str {
        &self.id
    }

    fn run_dir(&self) -> Option<PathBuf> {
        self.state.root.parent().map(Path::to_path_buf)
    }

    fn destroy(&self) {
        Pod::destroy(self);
    }
}

impl PodHost for Pod {
    fn agent(&self) -> Arc<dyn Agent> {
        self.agent.clone()
    }

    fn mount(&self, id: &str, m: &ContainerMounts) -> Result<(), ShareError> {
        self.with_share(|share| {
            share.add_container(id)?;
            share.mount_rootfs(id, &m.rootfs, &m.bundle_rootfs, m.readonly, &m.mountpoints)?;
            for (n, b) in m.binds.iter().enumerate() {
                share.bind(
                    id,
                    n,
                    Path::new(&b.source),
                    b.recursive,
                    b.readonly,
                    b.follow_host,
                )?;
            }
            Ok(())
        })
    }

    fn unmount(&self, id: &str) -> Result<(), ShareError> {
        self.with_share(|share| share.remove_container(id))
    }

    fn guest_rootfs(&self, id: &str) -> String {
        format!("{}/rootfs", StateDir::container_in_guest(id))
    }

    fn is_down(&self) -> bool {
        self.destroyed.load(Ordering::SeqCst) || self.vm_stopped()
    }

    fn timeline(&self) -> Option<Arc<Timeline>> {
        Some(self.timeline.clone())
    }

    fn set_limits(&self, id: &str, limits: ContainerLimits) -> Result<(), ResizeError> {
        self.size
            .update(self.agent.as_ref(), |plan| plan.set(id, limits))
    }

    fn forget_container(&self, id: &str) -> Result<(), ResizeError> {
        self.size
            .update(self.agent.as_ref(), |plan| plan.remove(id))
    }
}
