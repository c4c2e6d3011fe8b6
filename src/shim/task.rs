//! containerd's Task service (v2): each method translates its request into a call of the
//! pod's containers (`super::containers`) or of the pod (`super::pod`), and a failure into
//! the ttrpc status `ShimError::code` chooses. Nothing else happens here.
//!
//! Method → what runs in the guest:
//!
//! | Task method | agent |
//! | --- | --- |
//! | Create | first container: the pod VM boots, CreateSandbox; stream attaches + CreateContainer (a CRI sandbox container: nothing) |
//! | Start (init) | StartContainer; a thread blocks in WaitProcess and publishes TaskExit |
//! | Start (exec) | stream attaches + ExecProcess; WaitProcess as above |
//! | State, Wait, Connect | none (the shim's records) |
//! | Kill | SignalProcess (`all` for every process of the container) |
//! | Delete (init) / (exec) | RemoveContainer / RemoveProcess |
//! | Exec | none until Start (records the process, TaskExecAdded) |
//! | Pids | ListProcesses |
//! | ResizePty | ResizeTty |
//! | CloseIO | CloseStdin with the byte count forwarded so far |
//! | Pause / Resume | PauseContainer / ResumeContainer (cgroup freezer) |
//! | Update | UpdateResources (OCI LinuxResources JSON) |
//! | Stats | Stats (→ io.containerd.cgroups.v2.Metrics) |
//! | Shutdown (no container left) | DestroySandbox, VM stop, host state removed |
//! | Checkpoint | NotImplemented |
//!
//! containerd sees the shim's PID as every task's PID (as with Kata: the processes live in
//! the VM, the shim process is the VM); `Pids` lists the guest PIDs.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use containerd_shim::api;
use containerd_shim::protos::events::task::{TaskCreate, TaskIO};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal, Task, TtrpcContext, TtrpcResult};
use serde_json::Value;

use super::containers::process::Exit;
use super::containers::{ContainerKind, ContainerSpec, Containers, EventSink};
use super::error::ShimError;
use super::grouping::{is_sandbox_container, pod_id, valid_id};
use super::metrics::metrics_any;
use super::pod::{ContainerMounts, PodFactory, PodHost, PodRequest, PodRuntime, StateDir, VmPods};
use super::share::RootfsMount;
use super::spec::BundleSpec;
use super::stdio::{OutputSink, StdioPaths};
use super::timeline::Timeline;
use super::ShimConfig;

/// containerd's event publisher, as the container layer's event sink.
struct Publisher {
    publisher: RemotePublisher,
    namespace: String,
}

impl EventSink for Publisher {
    fn publish(&self, topic: String, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), &topic, &self.namespace, event)
        {
            log::warn!("publishing {topic}: {e}");
        }
    }
}

struct Inner {
    events: Arc<dyn EventSink>,
    pods: Arc<dyn PodFactory>,
    exit: Arc<ExitSignal>,
    /// One pod per shim; held while it comes up.
    pod: Mutex<Option<Arc<dyn PodRuntime>>>,
    containers: Arc<Containers>,
    /// Shutdown has started tearing the pod down (a second Shutdown must not exit early).
    shutting_down: AtomicBool,
}

/// The Task service of one shim (one pod). Each Task method is an inherent method with a
/// typed error (callable without ttrpc, as the KVM-free tests do); the `Task` impl below
/// only turns the error into a ttrpc status.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

fn stdio_paths(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.to_string(),
        stdout: stdout.to_string(),
        stderr: stderr.to_string(),
        terminal,
    }
}

/// containerd's stdout/stderr values must be paths or log URIs podvisor can serve.
fn check_sinks(stdio: &StdioPaths) -> Result<(), ShimError> {
    for uri in [&stdio.stdout, &stdio.stderr] {
        OutputSink::parse(uri).map_err(ShimError::InvalidRequest)?;
    }
    Ok(())
}

fn check_json_object(bytes: &[u8], what: &str) -> Result<(), ShimError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(_)) => Ok(()),
        _ => Err(ShimError::InvalidRequest(format!(
            "{what}: not a JSON object"
        ))),
    }
}

fn check_id(kind: &'static str, id: &str) -> Result<(), ShimError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ShimError::InvalidId {
            kind,
            id: id.to_string(),
        })
    }
}

/// What the share needs for container `req.id`: containerd's rootfs mounts and the spec's
/// host binds.
fn container_mounts(req: &api::CreateTaskRequest, spec: &BundleSpec) -> ContainerMounts {
    let guest = &spec.guest;
    ContainerMounts {
        rootfs: req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect(),
        bundle_rootfs: Path::new(&req.bundle).join("rootfs"),
        readonly: guest.root_readonly,
        mountpoints: guest
            .mountpoints
            .iter()
            .map(|(dest, source)| {
                let is_dir = source
                    .as_ref()
                    .is_none_or(|s| std::fs::metadata(s).map_or(true, |m| m.is_dir()));
                (dest.clone(), is_dir)
            })
            .collect(),
        binds: guest.binds.clone(),
    }
}

impl Service {
    /// The shim's service: pods are VMs of this process, events go to containerd.
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        let events = Arc::new(Publisher {
            publisher,
            namespace: namespace.to_string(),
        });
        Self::with(namespace, events, Arc::new(VmPods), exit)
    }

    /// A service whose pods come from `pods` and whose events go to `events`.
    pub fn with(
        namespace: &str,
        events: Arc<dyn EventSink>,
        pods: Arc<dyn PodFactory>,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                containers: Containers::new(namespace, events.clone()),
                events,
                pods,
                exit,
                pod: Mutex::new(None),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<Arc<dyn PodRuntime>>> {
        self.inner.pod.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pod(&self) -> Result<Arc<dyn PodHost>, ShimError> {
        match self.slot().as_ref() {
            Some(p) => Ok(p.clone()),
            None => Err(ShimError::NoPod),
        }
    }

    /// The pod, for a request about container `id`: an unknown container is NOT_FOUND
    /// (as containerd expects when it cleans up), whether or not a pod runs.
    fn pod_of(&self, id: &str) -> Result<Arc<dyn PodHost>, ShimError> {
        if !self.containers().contains(id) {
            return Err(ShimError::ContainerNotFound(id.to_string()));
        }
        self.pod()
    }

    fn containers(&self) -> &Arc<Containers> {
        &self.inner.containers
    }

    /// The pod `spec` belongs to, brought up by the first Create. Its settings are the
    /// config file (runtime options' ConfigPath), the environment and the pod's annotations.
    fn pod_for(
        &self,
        spec: &BundleSpec,
        id: &str,
        options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
        received: Instant,
    ) -> Result<Arc<dyn PodRuntime>, ShimError> {
        let pod_id = pod_id(id, &spec.annotations);
        let mut slot = self.slot();
        if let Some(p) = slot.as_ref() {
            if p.id() != pod_id {
                return Err(ShimError::WrongPod {
                    serving: p.id().to_string(),
                    requested: pod_id,
                });
            }
            if p.is_down() {
                return Err(ShimError::VmStopped(pod_id));
            }
            return Ok(p.clone());
        }
        let config = ShimConfig::load(options)?.with_annotations(&spec.annotations)?;
        config.apply_log_level();
        let containers = self.inner.containers.clone();
        let on_exit = Box::new(move |reason: String| containers.vm_exited(&reason));
        let timeline = Timeline::new(&pod_id, received);
        let request = PodRequest {
            id: &pod_id,
            hostname: &spec.hostname,
            netns: spec.netns.as_deref(),
            cgroups_path: spec.cgroups_path.as_deref(),
            sysctls: &spec.sysctls,
            timeline: &timeline,
        };
        let pod = self.inner.pods.create(&request, &config, on_exit)?;
        let host: Arc<dyn PodHost> = pod.clone();
        if let Err(e) = self.inner.containers.watch_ooms(host) {
            pod.destroy();
            return Err(e);
        }
        *slot = Some(pod.clone());
        Ok(pod)
    }

    /// `received`: when the Create arrived (the pod's timeline starts there).
    fn create_container(
        &self,
        req: &api::CreateTaskRequest,
        received: Instant,
    ) -> Result<(), ShimError> {
        let id = req.id.as_str();
        let stdio = stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        check_sinks(&stdio)?;
        let spec = BundleSpec::read(Path::new(&req.bundle), &StateDir::container_in_guest(id))?;
        let pod = self.pod_for(&spec, id, req.options.as_ref(), received)?;
        // For `shim delete` after a SIGKILL: where this pod's state is.
        if let Some(run_dir) = pod.run_dir() {
            if let Err(e) = super::config::record_run_dir(Path::new(&req.bundle), &run_dir) {
                log::warn!("Create {id}: record the run dir in the bundle: {e}");
            }
        }
        let kind = if is_sandbox_container(&spec.annotations) {
            ContainerKind::Sandbox
        } else {
            ContainerKind::Workload
        };
        let container = ContainerSpec {
            id: id.to_string(),
            bundle: req.bundle.clone(),
            kind,
            stdio,
            mounts: container_mounts(req, &spec),
            limits: spec.limits,
            spec_json: spec.guest.json,
        };
        let host: Arc<dyn PodHost> = pod;
        self.containers().create(&host, container)
    }

    /// Destroys the pod (VM, network, host state).
    fn teardown(&self) {
        let pod = self.slot().take();
        if let Some(p) = pod {
            p.destroy();
        }
    }

    /// Create: the first container brings the pod up.
    pub fn create_task(
        &self,
        req: &api::CreateTaskRequest,
    ) -> Result<api::CreateTaskResponse, ShimError> {
        let received = Instant::now();
        log::info!("Create {} (bundle {})", req.id, req.bundle);
        check_id("container", &req.id)?;
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unsupported(
                "podvisor cannot restore a container from a checkpoint",
            ));
        }
        if self.containers().contains(&req.id) {
            return Err(ShimError::ContainerExists(req.id.clone()));
        }
        self.create_container(req, received).inspect_err(|e| {
            log::error!("Create {}: {e}", req.id);
            // A pod whose first container failed keeps nothing.
            if self.containers().is_empty() && self.slot().is_some() {
                self.teardown();
            }
        })?;
        let pid = std::process::id();
        self.inner.events.publish(
            "/tasks/create".into(),
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    pub fn start_task(&self, req: &api::StartRequest) -> Result<api::StartResponse, ShimError> {
        let pod = self.pod_of(&req.id)?;
        self.containers().start(&pod, &req.id, &req.exec_id)?;
        Ok(api::StartResponse {
            pid: std::process::id(),
            ..Default::default()
        })
    }

    pub fn task_state(&self, req: &api::StateRequest) -> Result<api::StateResponse, ShimError> {
        let v = self.containers().state(&req.id, &req.exec_id)?;
        let (exit_status, exited_at) = v.exit.as_ref().map(exit_fields).unwrap_or_default();
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: v.bundle,
            pid: std::process::id(),
            status: v.status.into(),
            stdin: v.stdio.stdin,
            stdout: v.stdio.stdout,
            stderr: v.stdio.stderr,
            terminal: v.stdio.terminal,
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    pub fn wait_task(&self, req: &api::WaitRequest) -> Result<api::WaitResponse, ShimError> {
        let (exit_status, exited_at) = exit_fields(&self.containers().wait(&req.id, &req.exec_id)?);
        Ok(api::WaitResponse {
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    pub fn kill_task(&self, req: &api::KillRequest) -> Result<api::Empty, ShimError> {
        let pod = self.pod_of(&req.id)?;
        self.containers()
            .kill(&pod, &req.id, &req.exec_id, req.signal, req.all)?;
        Ok(api::Empty::new())
    }

    pub fn delete_task(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse, ShimError> {
        let pod = self.pod_of(&req.id)?;
        let (exit_status, exited_at) =
            exit_fields(&self.containers().delete(&pod, &req.id, &req.exec_id)?);
        Ok(api::DeleteResponse {
            pid: std::process::id(),
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    pub fn exec_process(&self, req: &api::ExecProcessRequest) -> Result<api::Empty, ShimError> {
        check_id("exec", &req.exec_id)?;
        let stdio = stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        check_sinks(&stdio)?;
        let spec = req.spec.value.clone();
        check_json_object(&spec, "exec spec: the OCI process")?;
        self.containers()
            .add_exec(&req.id, &req.exec_id, stdio, spec)?;
        Ok(api::Empty::new())
    }

    pub fn task_pids(&self, req: &api::PidsRequest) -> Result<api::PidsResponse, ShimError> {
        let pod = self.pod_of(&req.id)?;
        let pids = self.containers().pids(&pod, &req.id)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    pub fn resize_pty(&self, req: &api::ResizePtyRequest) -> Result<api::Empty, ShimError> {
        let pod = self.pod_of(&req.id)?;
        self.containers()
            .resize_pty(&pod, &req.id, &req.exec_id, req.width, req.height)?;
        Ok(api::Empty::new())
    }

    pub fn close_io(&self, req: &api::CloseIORequest) -> Result<api::Empty, ShimError> {
        if req.stdin {
            let pod = self.pod_of(&req.id)?;
            self.containers().close_stdin(&pod, &req.id, &req.exec_id)?;
        }
        Ok(api::Empty::new())
    }

    pub fn pause_task(&self, req: &api::PauseRequest) -> Result<api::Empty, ShimError> {
        let pod = self.pod_of(&req.id)?;
        self.containers().pause(&pod, &req.id)?;
        Ok(api::Empty::new())
    }

    pub fn resume_task(&self, req: &api::ResumeRequest) -> Result<api::Empty, ShimError> {
        let pod = self.pod_of(&req.id)?;
        self.containers().resume(&pod, &req.id)?;
        Ok(api::Empty::new())
    }

    pub fn update_task(&self, req: &api::UpdateTaskRequest) -> Result<api::Empty, ShimError> {
        let resources = req.resources.value.clone();
        check_json_object(&resources, "update: the OCI LinuxResources")?;
        let pod = self.pod_of(&req.id)?;
        self.containers().update(&pod, &req.id, resources)?;
        Ok(api::Empty::new())
    }

    pub fn task_stats(&self, req: &api::StatsRequest) -> Result<api::StatsResponse, ShimError> {
        let pod = self.pod_of(&req.id)?;
        let stats = self.containers().stats(&pod, &req.id)?;
        let any = metrics_any(&stats).map_err(ShimError::Internal)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    /// Shutdown: with no container left, the pod is torn down and the process exits.
    pub fn shutdown_pod(&self) {
        if !self.containers().is_empty() || self.inner.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        // Answer first: destroying the VM (vCPU threads, guest memory, the pod network) can
        // take longer under load than containerd waits for this call (3 s). The process
        // exits once the teardown is done.
        log::info!("Shutdown: destroying the pod VM");
        let finish = |svc: &Service| {
            svc.teardown();
            svc.inner.exit.signal();
        };
        let svc = self.clone();
        let spawned = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || finish(&svc));
        if let Err(e) = spawned {
            log::warn!("Shutdown: no thread for the teardown ({e}); tearing down before answering");
            finish(self);
        }
    }
}

/// A process's exit as containerd's responses carry it.
fn exit_fields(exit: &Exit) -> (u32, MessageField<Timestamp>) {
    (exit.status, MessageField::some(exit.at.clone()))
}

impl Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        Ok(self.create_task(&req)?)
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        Ok(self.start_task(&req)?)
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(self.task_state(&req)?)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        Ok(self.wait_task(&req)?)
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        Ok(self.kill_task(&req)?)
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.delete_task(&req)?)
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        Ok(self.exec_process(&req)?)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        Ok(self.task_pids(&req)?)
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        Ok(Service::resize_pty(self, &req)?)
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        Ok(Service::close_io(self, &req)?)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Ok(self.pause_task(&req)?)
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        Ok(self.resume_task(&req)?)
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Ok(self.update_task(&req)?)
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Ok(self.task_stats(&req)?)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        self.shutdown_pod();
        Ok(api::Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(ShimError::Unsupported(
            "podvisor does not checkpoint single containers (CRIU does not run in the pod VM); \
             pod templates snapshot whole VMs instead",
        )
        .into())
    }
}
