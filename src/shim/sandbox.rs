//! The pod's VM and its agent: boot the VM in this process (kernel + agent initramfs, a
//! virtio-fs share rooted at `<state>/shared`, the hybrid vsock at `<state>/vsock.sock`, the
//! console in `<state>/console.log`), wait for the agent, set the sandbox up; at the end
//! destroy it, wait for the VM to stop and remove the host state.
//!
//! Pod network (issue 9, see `super::net`): a pod whose sandbox spec joins a network
//! namespace (CRI + CNI) gets that namespace wired to a tap per CNI interface, one
//! virtio-net NIC on each tap, and the agent configures the guest NICs after CreateSandbox.
//! Such pods start from templates too: a template of the same NIC count and MTUs, whose
//! NICs are bound to this pod's taps on restore (the agent then gives them the CNI
//! interfaces' MACs).

use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use podvisor_agent_protocol::agent::{
    ConfigureNetworkRequest, CreateSandboxRequest, DestroySandboxRequest, GetVersionRequest,
    GetVersionResponse, SharedMount,
};
use podvisor_agent_protocol::agent_ttrpc::AgentClient;
use podvisor_agent_protocol::stream::{StreamHeader, StreamKind};
use podvisor_agent_protocol::vsock::{connect_hybrid_vsock, connect_hybrid_vsock_once};
use podvisor_agent_protocol::{ttrpc, PROTOCOL_VERSION, RPC_VSOCK_PORT, STREAM_VSOCK_PORT};
use vmm::config::{
    NetConfig, RestoreConfig, ShareConfig, TapSource, VsockConfig, DEFAULT_CMDLINE,
    DEFAULT_GUEST_CID,
};
use vmm::{ConsoleConfig, Vm, VmConfig, VmReport, VmStopHandle};

use super::config::TemplateMode;
use super::net::PodNetwork;
use super::share::{self, PodShare, ShareError};
use super::{file_tail, ShimConfig};

/// virtio-fs tag of the pod's share.
pub const SHARE_TAG: &str = "podvisor";
/// Where the agent mounts the share in the guest.
pub const SHARED_IN_GUEST: &str = "/run/podvisor/shared";
/// One agent RPC until [`set_rpc_timeout`] (container creation forks and execs in a guest
/// that may be slow).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(300);
/// The bound of one agent RPC in this process: the pod's `agent_timeout` (one pod per shim
/// process), set once when its sandbox is created.
static POD_RPC_TIMEOUT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// Bounds every later agent RPC of this process by `timeout` (the first call wins).
pub fn set_rpc_timeout(timeout: Duration) {
    let _ = POD_RPC_TIMEOUT.set(timeout);
}
/// Console lines quoted in errors.
const TAIL_LINES: usize = 30;

/// An RPC context bounded by the pod's `agent_timeout` ([`RPC_TIMEOUT`] before it is set).
pub fn ctx() -> ttrpc::context::Context {
    let timeout = POD_RPC_TIMEOUT.get().copied().unwrap_or(RPC_TIMEOUT);
    ttrpc::context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64)
}

/// Host paths of a pod's state.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    /// The virtio-fs root: the guest's read-only view of the pod's share (`super::share`).
    pub fn shared(&self) -> PathBuf {
        PodShare::view_dir(&self.root)
    }
    pub fn vsock(&self) -> PathBuf {
        self.root.join("vsock.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.root.join("console.log")
    }
    /// The same directory as the guest sees it.
    pub fn container_in_guest(id: &str) -> String {
        format!("{SHARED_IN_GUEST}/{id}")
    }
}

/// The pod VM's configuration for `config`, with the pod's host paths under `state` (a
/// template build replaces them with scratch ones; they do not enter the template key).
pub fn pod_vm_config(config: &ShimConfig, state: &StateDir) -> Result<VmConfig, String> {
    let kernel = config.kernel.clone().ok_or(
        "no guest kernel: set `kernel` in the podvisor config file \
         (/etc/podvisor/config.toml) or PODVISOR_KERNEL in containerd's environment \
         (`make guest-kernel` prints the path)",
    )?;
    let initrd = config.initrd.clone().ok_or(
        "no agent initramfs: set `initrd` in the podvisor config file \
         (/etc/podvisor/config.toml) or PODVISOR_INITRD in containerd's environment \
         (`make rootfs` builds out/agent-test.cpio)",
    )?;
    for (path, var) in [
        (&kernel, "`kernel` or PODVISOR_KERNEL"),
        (&initrd, "`initrd` or PODVISOR_INITRD"),
    ] {
        if !path.is_file() {
            return Err(format!(
                "{} ({var}: podvisor config file or containerd's environment) is not a file",
                path.display()
            ));
        }
    }
    let share = ShareConfig::new(SHARE_TAG, state.shared(), Default::default())
        .map_err(|e| format!("virtio-fs share: {e}"))?;
    Ok(VmConfig {
        kernel,
        initrd: Some(initrd),
        cmdline: DEFAULT_CMDLINE.to_string(),
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        console: ConsoleConfig::CappedFile(state.console(), Default::default()),
        disks: Vec::new(),
        shares: vec![share],
        vsock: Some(VsockConfig {
            guest_cid: DEFAULT_GUEST_CID,
            uds_path: state.vsock(),
        }),
        net: Vec::new(),
    })
}

/// A running pod VM with its agent.
pub struct Sandbox {
    pub state: StateDir,
    pub client: AgentClient,
    /// The pod's share (until teardown, which closes it so that its mounts can go).
    share: Mutex<Option<PodShare>>,
    vm: Mutex<Option<JoinHandle<VmReport>>>,
    stop: VmStopHandle,
    /// DestroySandbox was sent.
    destroyed: std::sync::atomic::AtomicBool,
    /// The wiring of the pod's network namespace; torn down after the VM stopped.
    network: Mutex<Option<PodNetwork>>,
}

/// Called once when the pod VM has stopped, with the reason.
pub type OnVmExit = Box<dyn FnOnce(String) + Send>;

/// How the pod VM comes up.
enum VmSource {
    /// A cold boot.
    Boot(VmConfig),
    /// A clone of a template; on failure, the template is discarded and the VM boots cold.
    Template(RestoreConfig, VmConfig),
}

/// Builds, starts and waits for a VM in its own thread; `ready` gets the start result,
/// `on_exit` runs when a started VM stops.
fn vm_thread(
    source: VmSource,
    ready: mpsc::Sender<Result<VmStopHandle, String>>,
    on_exit: OnVmExit,
) -> JoinHandle<VmReport> {
    std::thread::Builder::new()
        .name("vm-wait".into())
        .spawn(move || {
            let started = match source {
                VmSource::Boot(config) => Vm::new(config, Instant::now()).and_then(Vm::start),
                VmSource::Template(restore, config) => {
                    let t = Instant::now();
                    match Vm::restore(&restore, Instant::now()).and_then(Vm::start) {
                        Ok(vm) => {
                            log::info!(
                                "pod VM restored from template {} in {:.1} ms",
                                restore.snapshot.display(),
                                t.elapsed().as_secs_f64() * 1000.0
                            );
                            Ok(vm)
                        }
                        Err(e) => {
                            log::warn!(
                                "cannot restore template {}: {e}; booting the pod VM cold",
                                restore.snapshot.display()
                            );
                            super::template::discard(&restore.snapshot);
                            Vm::new(config, Instant::now()).and_then(Vm::start)
                        }
                    }
                }
            };
            match started {
                Ok(running) => {
                    let _ = ready.send(Ok(running.stop_handle()));
                    let report = running.wait(None);
                    log::info!("VM stopped: {}", report.reason);
                    on_exit(report.reason.to_string());
                    report
                }
                Err(e) => {
                    let msg = e.to_string();
                    let _ = ready.send(Err(msg.clone()));
                    VmReport {
                        reason: vmm::ExitReason::Stopped(msg),
                        timings: Default::default(),
                        console_tail: String::new(),
                    }
                }
            }
        })
        .expect("spawn the VM thread")
}

/// Stops a VM whose sandbox could not be set up, waits for it, and returns `msg`.
fn abandon(stop: &VmStopHandle, vm: JoinHandle<VmReport>, msg: String) -> Result<Sandbox, String> {
    stop.stop("the sandbox could not be set up");
    let _ = vm.join();
    Err(msg)
}

/// The pod's network wiring, when its sandbox spec names a network namespace (`netns`).
fn pod_network(id: &str, netns: Option<&Path>) -> Result<Option<PodNetwork>, String> {
    match netns {
        None => {
            log::info!(
                "pod {id}: the sandbox spec joins no network namespace (`ctr run`, or a \
                 hostNetwork pod): the VM gets no NIC, loopback only"
            );
            Ok(None)
        }
        Some(path) => PodNetwork::setup(path)
            .map(Some)
            .map_err(|e| format!("pod network: {e}")),
    }
}

/// The agent's ConfigureNetwork for a wired pod.
fn configure_network(client: &AgentClient, req: &ConfigureNetworkRequest) -> Result<(), String> {
    client
        .configure_network(ctx(), req)
        .map(drop)
        .map_err(|e| match e {
            ttrpc::Error::RpcStatus(s) => {
                format!("agent ConfigureNetwork ({:?}): {}", s.code(), s.message())
            }
            other => format!("agent ConfigureNetwork: {other}"),
        })
}

impl Sandbox {
    /// Boots the pod VM and sets up the sandbox in the agent; `netns` is the pod's network
    /// namespace (CRI/CNI), if any. On failure nothing runs any more and the network wiring
    /// is undone (the caller removes the state directory).
    pub fn create(
        id: &str,
        hostname: &str,
        config: &ShimConfig,
        state: StateDir,
        netns: Option<&Path>,
        on_exit: OnVmExit,
    ) -> Result<Sandbox, String> {
        set_rpc_timeout(config.agent_timeout);
        vmm::seccomp::set_mode(config.seccomp);
        if config.seccomp != vmm::seccomp::Mode::Enforce {
            log::warn!(
                "pod {id}: seccomp = {:?}: the VMM's guest-facing threads are not confined",
                config.seccomp
            );
        }
        share::create_pod_dir(&config.run_dir, &state.root)
            .map_err(|e| format!("pod state dir: {e}"))?;
        let share = PodShare::create(&state.root).map_err(|e| format!("pod share: {e}"))?;
        let mut vm_config = pod_vm_config(config, &state)?;
        let network = pod_network(id, netns)?;
        // One NIC per wired interface, with the CNI interface's MAC and MTU.
        vm_config.net = network
            .iter()
            .flat_map(|n| &n.nics)
            .map(|nic| {
                Ok(NetConfig {
                    tap: TapSource::from(nic.tap_fd()?),
                    mac: Some(nic.mac),
                    mtu: Some(nic.mtu),
                })
            })
            .collect::<std::io::Result<_>>()
            .map_err(|e| format!("pod network: a tap fd for the VM: {e}"))?;
        let source = match config.template {
            TemplateMode::Off => VmSource::Boot(vm_config),
            TemplateMode::Auto if !config.template_allowed() => {
                log::info!(
                    "pod {id}: its annotations chose {} vCPU(s) and {} MiB, not a shape in \
                     template_shapes: booting cold",
                    config.vcpus,
                    config.mem_mib
                );
                VmSource::Boot(vm_config)
            }
            TemplateMode::Auto => match super::template::ensure(
                &config.template_dir,
                config.max_templates,
                &vm_config,
                config.agent_timeout,
            ) {
                Ok(dir) => VmSource::Template(
                    RestoreConfig {
                        console: vm_config.console.clone(),
                        shares: Some(vm_config.shares.clone()),
                        vsock: vm_config.vsock.clone(),
                        // This pod's taps; MAC and MTU stay the template's (the agent
                        // gives the NIC the CNI interface's MAC).
                        net: Some(
                            vm_config
                                .net
                                .iter()
                                .map(|n| NetConfig {
                                    tap: n.tap.clone(),
                                    mac: None,
                                    mtu: None,
                                })
                                .collect(),
                        ),
                        // The agent sets the wall clock at CreateSandbox.
                        ..RestoreConfig::new(dir)
                    },
                    vm_config,
                ),
                Err(e) => {
                    log::warn!("no VM template ({e}); booting the pod VM cold");
                    VmSource::Boot(vm_config)
                }
            },
        };
        let (tx, rx) = mpsc::channel();
        let vm = vm_thread(source, tx, on_exit);
        let stop = match rx.recv() {
            Ok(Ok(stop)) => stop,
            Ok(Err(e)) => {
                let _ = vm.join();
                return Err(format!("cannot start the pod VM: {e}"));
            }
            Err(_) => return Err("the VM thread died while starting the VM".into()),
        };
        // From here on, a failure stops the VM before returning: nothing keeps running.
        log::info!("pod VM {id} started; waiting for the agent");

        let booted = Instant::now();
        let (client, version) = match wait_for_agent(&state, &vm, config.agent_timeout) {
            Ok(v) => v,
            Err(e) => {
                let tail = file_tail(&state.console(), TAIL_LINES);
                return abandon(
                    &stop,
                    vm,
                    format!(
                        "{e}\nlast guest console lines ({}):\n{tail}",
                        state.console().display(),
                    ),
                );
            }
        };
        if version.protocol_version != PROTOCOL_VERSION {
            return abandon(
                &stop,
                vm,
                format!(
                    "the agent speaks protocol {}, this shim {PROTOCOL_VERSION}",
                    version.protocol_version
                ),
            );
        }
        log::info!(
            "agent {} answered {:.1} s after the VM started",
            version.agent_version,
            booted.elapsed().as_secs_f64()
        );

        let mut req = CreateSandboxRequest::new();
        req.sandbox_id = id.to_string();
        // Per-pod identity (a template clone starts with the template's clock and pool).
        req.entropy = match super::template::entropy() {
            Ok(e) => e,
            Err(e) => {
                return abandon(
                    &stop,
                    vm,
                    format!("no fresh host entropy for the pod VM: {e}"),
                )
            }
        };
        req.realtime_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        req.hostname = if hostname.is_empty() { id } else { hostname }
            .chars()
            .take(63)
            .collect();
        let mut mount = SharedMount::new();
        mount.fstype = "virtiofs".into();
        mount.source = SHARE_TAG.into();
        mount.target = SHARED_IN_GUEST.into();
        req.mounts.push(mount);
        if let Err(e) = client.create_sandbox(ctx(), &req) {
            return abandon(&stop, vm, format!("agent CreateSandbox: {e}"));
        }
        // The guest NICs get the CNI interfaces' names, addresses and routes before any
        // container runs (they share the VM's network namespace).
        if let Some(net) = &network {
            if let Err(e) = configure_network(&client, &net.request) {
                return abandon(&stop, vm, e);
            }
        }
        Ok(Sandbox {
            state,
            client,
            share: Mutex::new(Some(share)),
            vm: Mutex::new(Some(vm)),
            stop,
            destroyed: Default::default(),
            network: Mutex::new(network),
        })
    }

    /// Runs `f` on the pod's share; fails once the pod is torn down.
    pub fn with_share<R>(
        &self,
        f: impl FnOnce(&PodShare) -> Result<R, ShareError>,
    ) -> Result<R, String> {
        let share = self.share.lock().unwrap_or_else(|p| p.into_inner());
        let share = share.as_ref().ok_or("the pod is being torn down")?;
        f(share).map_err(|e| e.to_string())
    }

    /// Whether the VM has stopped.
    pub fn vm_stopped(&self) -> bool {
        match self.vm.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(vm) => vm.is_finished(),
            None => true,
        }
    }

    /// A stream connection attached to (container, exec, kind).
    pub fn attach_stream(
        &self,
        kind: StreamKind,
        container: &str,
        exec: &str,
    ) -> Result<UnixStream, String> {
        let mut conn = connect_hybrid_vsock(&self.state.vsock(), STREAM_VSOCK_PORT, RPC_TIMEOUT)
            .map_err(|e| format!("stream connection: {e}"))?;
        StreamHeader::new(kind, container, exec)
            .attach(&mut conn)
            .map_err(|e| format!("attach {kind:?} stream of {container}: {e}"))?;
        Ok(conn)
    }

    /// Whether [`Self::destroy`] has begun.
    pub fn destroyed(&self) -> bool {
        self.destroyed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// DestroySandbox, then stops the VM. The agent answers DestroySandbox once it has
    /// removed what was left, detached its mounts and synced the guest's file systems
    /// (data written to host volumes is on the host then): nothing in the guest needs to
    /// run any more, so the vCPUs are stopped right away instead of waiting for the guest
    /// kernel to reboot itself, which an emulated guest kernel under load takes minutes to
    /// do. If the agent does not answer (the guest died or hangs) the VM is stopped too.
    pub fn destroy(&self) {
        self.destroyed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self
            .client
            .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        {
            log::warn!("agent DestroySandbox: {e}; stopping the VM without it");
        }
        let Some(vm) = self.vm.lock().unwrap().take() else {
            return;
        };
        if !vm.is_finished() {
            self.stop.stop("pod teardown (after DestroySandbox)");
        }
        if let Ok(report) = vm.join() {
            log::info!("pod VM stopped: {}", report.reason);
        }
        // Its descriptors would keep the share's mounts busy.
        drop(self.share.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.teardown_network();
    }

    /// Undoes the pod network wiring (the VM no longer holds the taps).
    fn teardown_network(&self) {
        let network = self
            .network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(net) = network {
            let netns = net.netns().to_string();
            match net.teardown() {
                Ok(()) => log::info!("pod network {netns} unwired"),
                Err(e) => log::warn!("pod network teardown: {e}"),
            }
        }
    }
}

/// How long one GetVersion may take while the agent comes up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to the agent's RPC port and asks its version, retrying until it answers; fails
/// early if the VM stopped, and after `timeout`. A connection can be reset once right after
/// a template restore (the guest handles the vsock transport-reset event late), hence the
/// retry of the whole exchange, not only of the connect.
fn wait_for_agent(
    state: &StateDir,
    vm: &JoinHandle<VmReport>,
    timeout: Duration,
) -> Result<(AgentClient, GetVersionResponse), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if vm.is_finished() {
            return Err("the pod VM stopped before its agent answered".into());
        }
        let err =
            match connect_hybrid_vsock_once(&state.vsock(), RPC_VSOCK_PORT, Duration::from_secs(5))
            {
                Ok(stream) => match ttrpc::Client::new(stream.into_raw_fd()) {
                    Ok(c) => {
                        let client = AgentClient::new(c);
                        let probe = ttrpc::context::with_timeout(PROBE_TIMEOUT.as_nanos() as i64);
                        match client.get_version(probe, &GetVersionRequest::new()) {
                            Ok(v) => return Ok((client, v)),
                            Err(e) => format!("agent GetVersion: {e}"),
                        }
                    }
                    Err(e) => format!("ttrpc client on the vsock: {e}"),
                },
                Err(e) => e.to_string(),
            };
        if Instant::now() >= deadline {
            return Err(format!(
                "the guest agent did not answer on vsock port {RPC_VSOCK_PORT} within \
                 {timeout:?}: {err}"
            ));
        }
        log::debug!("agent not ready yet: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Removes a pod's host state: unmounts what is mounted below it, then deletes it without
/// crossing a mount (also logged when it fails).
pub fn cleanup_state_dir(dir: &Path) -> Result<(), String> {
    share::remove_pod_dir(dir).map_err(|e| {
        let msg = format!("remove the pod state {}: {e}", dir.display());
        log::warn!("{msg}");
        msg
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_requests_are_bounded_by_the_pods_agent_timeout() {
        set_rpc_timeout(Duration::from_secs(1234));
        // The first setting wins: the process serves one pod.
        set_rpc_timeout(Duration::from_secs(1));
        assert_eq!(ctx().timeout_nano, 1_234_000_000_000);
    }
}
