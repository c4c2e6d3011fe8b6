//! containerd's Task service (v2) on top of the pod VM's agent.
//!
//! Method → agent RPC:
//!
//! | Task method | agent |
//! | --- | --- |
//! | Create | first container: boot the VM, CreateSandbox; stream attaches + CreateContainer (a CRI sandbox container: nothing) |
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
//! A background thread long-polls GetOOMEvent and publishes TaskOOM. When the VM stops on its
//! own (guest panic, agent death), every running process exits with status 255 and its
//! TaskExit is published.
//!
//! containerd sees the shim's PID as every task's PID (as with Kata: the processes live in
//! the VM, the shim process is the VM); `Pids` lists the guest PIDs.

use std::collections::HashMap;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use containerd_shim::api;
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal, Task, TtrpcContext, TtrpcResult};
use podvisor_agent_protocol::agent::{
    CloseStdinRequest, ContainerRequest, CreateContainerRequest, ExecProcessRequest,
    GetOOMEventRequest, ProcessRequest, ResizeTtyRequest, SignalProcessRequest,
    UpdateResourcesRequest,
};
use podvisor_agent_protocol::stream::StreamKind;
use serde_json::Value;

use super::metrics::metrics_any;
use super::oom_events::{OomFilter, Verdict};
use super::pod::{annotations, is_sandbox_container, pod_id};
use super::sandbox::{cleanup_state_dir, ctx, Sandbox, StateDir};
use super::share::RootfsMount;
use super::spec::guest_spec;
use super::stdio::{copy_input, copy_output, OutputSink, StdinState, StdioPaths};
use super::{now, timestamp_ns, ShimConfig};

/// Exit status of processes whose VM stopped under them.
const VM_DIED_STATUS: u32 = 255;
/// How long CloseIO waits for the stdin copy to reach EOF by itself.
const CLOSE_IO_GRACE: Duration = Duration::from_secs(2);

fn status_err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

/// An agent error as containerd should see it: the agent's status code (which follows
/// errdefs) with context, anything else INTERNAL.
fn agent_err(what: &str, e: ttrpc::Error) -> ttrpc::Error {
    match e {
        ttrpc::Error::RpcStatus(s) => status_err(s.code(), format!("{what}: {}", s.message())),
        other => status_err(Code::INTERNAL, format!("{what}: {other}")),
    }
}

fn not_found(id: &str, exec_id: &str) -> ttrpc::Error {
    if exec_id.is_empty() {
        status_err(Code::NOT_FOUND, format!("container {id} not found"))
    } else {
        status_err(
            Code::NOT_FOUND,
            format!("process {exec_id} of container {id} not found"),
        )
    }
}

/// One process: a container's init (empty exec id) or an exec'd one.
#[derive(Debug, Default)]
struct Proc {
    /// PID in the guest (the agent's PID namespace); 0 before it runs.
    guest_pid: u32,
    stdio: StdioPaths,
    status: Status,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    /// TaskExit was (or is being) published: exactly once per process.
    exit_published: bool,
    /// Output copy threads; joined before TaskExit so no output is lost.
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<StdinState>,
    /// A `binary://` logger, reaped on Delete.
    logger: Option<Child>,
    /// Exec processes: the OCI process JSON, until Start.
    spec: Vec<u8>,
}

impl Proc {
    fn is_live(&self) -> bool {
        matches!(
            self.status,
            Status::RUNNING | Status::PAUSED | Status::PAUSING
        )
    }
}

#[derive(Debug)]
struct Container {
    bundle: String,
    /// A CRI sandbox container: the pod itself, no process in the VM.
    sandbox: bool,
    init: Proc,
    execs: HashMap<String, Proc>,
}

impl Container {
    fn proc(&self, exec_id: &str) -> Option<&Proc> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }
    fn proc_mut(&mut self, exec_id: &str) -> Option<&mut Proc> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

/// The pod: its id, host state and running sandbox.
struct Pod {
    id: String,
    state: StateDir,
    sandbox: Arc<Sandbox>,
}

struct Inner {
    namespace: String,
    config: ShimConfig,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    /// Held while the VM boots: one pod per shim.
    pod: Mutex<Option<Pod>>,
    containers: Mutex<HashMap<String, Container>>,
    /// Notified when a process stops or a container is deleted.
    changed: Condvar,
    /// Shutdown has started tearing the pod down (a second Shutdown must not exit early).
    shutting_down: AtomicBool,
}

/// The Task service of one shim (one pod).
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(
        namespace: &str,
        config: ShimConfig,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                config,
                publisher,
                exit,
                pod: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                changed: Condvar::new(),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn pod(&self) -> MutexGuard<'_, Option<Pod>> {
        self.inner.pod.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish<E: Event + 'static>(&self, event: E) {
        let topic = event.topic();
        if let Err(e) = self.inner.publisher.publish(
            Context::default(),
            &topic,
            &self.inner.namespace,
            Box::new(event),
        ) {
            log::warn!("publishing {topic}: {e}");
        }
    }

    /// The pod's sandbox and state, booting the VM on first use.
    fn sandbox_for(
        &self,
        pod: &str,
        hostname: &str,
        netns: Option<&Path>,
        config: &ShimConfig,
    ) -> Result<(Arc<Sandbox>, StateDir), ttrpc::Error> {
        let mut slot = self.pod();
        if let Some(p) = slot.as_ref() {
            if p.id != pod {
                return Err(status_err(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "this shim serves pod {}, not {pod}: containers of one pod need the \
                         same io.kubernetes.cri.sandbox-id or io.podvisor.sandbox-id",
                        p.id
                    ),
                ));
            }
            if p.sandbox.vm_stopped() {
                return Err(status_err(
                    Code::FAILED_PRECONDITION,
                    format!("the VM of pod {pod} has stopped"),
                ));
            }
            return Ok((p.sandbox.clone(), p.state.clone()));
        }
        let state = StateDir {
            root: config.run_dir.join(pod),
        };
        let this = self.clone();
        let on_exit = Box::new(move |reason: String| this.vm_exited(&reason));
        let sb =
            Sandbox::create(pod, hostname, config, state.clone(), netns, on_exit).map_err(|e| {
                let _ = cleanup_state_dir(&state.root);
                status_err(Code::FAILED_PRECONDITION, format!("pod VM: {e}"))
            })?;
        let sb = Arc::new(sb);
        self.spawn_oom_watcher(sb.clone());
        *slot = Some(Pod {
            id: pod.to_string(),
            state: state.clone(),
            sandbox: sb.clone(),
        });
        Ok((sb, state))
    }

    fn sandbox(&self) -> TtrpcResult<(Arc<Sandbox>, StateDir)> {
        self.pod()
            .as_ref()
            .map(|p| (p.sandbox.clone(), p.state.clone()))
            .ok_or_else(|| status_err(Code::FAILED_PRECONDITION, "the pod VM is not running"))
    }

    /// Mounts container `id`'s rootfs and the spec's host binds in the pod's share.
    fn host_mounts(
        sb: &Sandbox,
        req: &api::CreateTaskRequest,
        spec: &super::spec::GuestSpec,
    ) -> Result<(), String> {
        let id = req.id.as_str();
        let rootfs: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let bundle_rootfs = Path::new(&req.bundle).join("rootfs");
        let mountpoints: Vec<(String, bool)> = spec
            .mountpoints
            .iter()
            .map(|(dest, source)| {
                let is_dir = source
                    .as_ref()
                    .is_none_or(|s| std::fs::metadata(s).map_or(true, |m| m.is_dir()));
                (dest.clone(), is_dir)
            })
            .collect();
        sb.with_share(|share| {
            share.add_container(id)?;
            share.mount_rootfs(
                id,
                &rootfs,
                &bundle_rootfs,
                spec.root_readonly,
                &mountpoints,
            )?;
            for (n, b) in spec.binds.iter().enumerate() {
                share.bind(id, n, Path::new(&b.source), b.recursive, b.readonly)?;
            }
            Ok(())
        })
    }

    /// Attaches the streams `stdio` asks for and returns them with the agent's flags.
    fn attach_streams(
        sb: &Sandbox,
        id: &str,
        exec_id: &str,
        stdio: &StdioPaths,
    ) -> TtrpcResult<(Streams, podvisor_agent_protocol::agent::Stdio)> {
        let attach = |kind| {
            sb.attach_stream(kind, id, exec_id)
                .map_err(|e| status_err(Code::INTERNAL, e))
        };
        let mut flags = podvisor_agent_protocol::agent::Stdio::new();
        let mut s = Streams::default();
        if stdio.terminal {
            s.pty = Some(attach(StreamKind::Pty)?);
            flags.terminal = true;
        } else {
            if !stdio.stdin.is_empty() {
                s.stdin = Some(attach(StreamKind::Stdin)?);
            }
            if !stdio.stdout.is_empty() {
                s.stdout = Some(attach(StreamKind::Stdout)?);
            }
            if !stdio.stderr.is_empty() {
                s.stderr = Some(attach(StreamKind::Stderr)?);
            }
            flags.stdin = s.stdin.is_some();
            flags.stdout = s.stdout.is_some();
            flags.stderr = s.stderr.is_some();
        }
        Ok((s, flags))
    }

    /// Starts the copy threads of a process whose streams the agent took.
    fn wire_streams(&self, id: &str, p: &mut Proc, s: Streams) -> TtrpcResult<()> {
        let w = p
            .stdio
            .output_writers(id, &self.inner.namespace)
            .map_err(|e| status_err(Code::INVALID_ARGUMENT, e))?;
        p.logger = w.logger;
        if let Some(pty) = s.pty {
            let input = pty
                .try_clone()
                .map_err(|e| status_err(Code::INTERNAL, format!("clone the pty stream: {e}")))?;
            if let Some(out) = w.stdout {
                p.outputs.push(copy_output(pty, out));
            }
            if !p.stdio.stdin.is_empty() {
                p.stdin = Some(copy_input(p.stdio.stdin.clone(), input));
            }
            return Ok(());
        }
        if let (Some(conn), Some(out)) = (s.stdout, w.stdout) {
            p.outputs.push(copy_output(conn, out));
        }
        if let (Some(conn), Some(out)) = (s.stderr, w.stderr) {
            p.outputs.push(copy_output(conn, out));
        }
        if let Some(conn) = s.stdin {
            p.stdin = Some(copy_input(p.stdio.stdin.clone(), conn));
        }
        Ok(())
    }

    /// The part of Create that runs in the guest, after the rootfs is mounted.
    fn create_in_guest(
        &self,
        sb: &Sandbox,
        id: &str,
        spec: Vec<u8>,
        p: &mut Proc,
    ) -> TtrpcResult<()> {
        let (streams, flags) = Self::attach_streams(sb, id, "", &p.stdio)?;
        let mut creq = CreateContainerRequest::new();
        creq.container_id = id.to_string();
        creq.oci_spec_json = spec;
        creq.rootfs = format!("{}/rootfs", StateDir::container_in_guest(id));
        creq.stdio = Some(flags).into();
        p.guest_pid = sb
            .client
            .create_container(ctx(), &creq)
            .map_err(|e| agent_err("agent CreateContainer", e))?
            .pid;
        self.wire_streams(id, p, streams)
    }

    /// Publishes TaskExit for a process once and marks it stopped, in that order
    /// (containerd wants the event before Wait returns).
    fn finish(&self, id: &str, exec_id: &str, status: u32, at: Timestamp) {
        {
            let mut cs = self.containers();
            let Some(p) = cs.get_mut(id).and_then(|c| c.proc_mut(exec_id)) else {
                return;
            };
            if p.exit_published {
                return;
            }
            p.exit_published = true;
        }
        self.publish(TaskExit {
            container_id: id.to_string(),
            id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
            pid: std::process::id(),
            exit_status: status,
            exited_at: MessageField::some(at.clone()),
            ..Default::default()
        });
        if let Some(p) = self
            .containers()
            .get_mut(id)
            .and_then(|c| c.proc_mut(exec_id))
        {
            p.status = Status::STOPPED;
            p.exit_status = status;
            p.exited_at = Some(at);
        }
        self.inner.changed.notify_all();
    }

    /// Waits for a process in the agent, drains its output, then [`Self::finish`]es it.
    fn spawn_exit_waiter(&self, sb: Arc<Sandbox>, id: String, exec_id: String) {
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("exit-wait".into())
            .spawn(move || {
                let mut req = ProcessRequest::new();
                req.container_id = id.clone();
                req.exec_id = exec_id.clone();
                let (status, at) = match sb.client.wait_process(Context::default(), &req) {
                    Ok(r) => (r.exit_status as u32, timestamp_ns(r.exited_at_ns)),
                    Err(e) => {
                        log::error!("agent WaitProcess({id} {exec_id}): {e}");
                        (VM_DIED_STATUS, now())
                    }
                };
                let outputs = this
                    .containers()
                    .get_mut(&id)
                    .and_then(|c| c.proc_mut(&exec_id))
                    .map(|p| std::mem::take(&mut p.outputs))
                    .unwrap_or_default();
                for t in outputs {
                    let _ = t.join();
                }
                this.finish(&id, &exec_id, status, at);
            });
        if let Err(e) = spawned {
            log::error!("cannot spawn the exit waiter: {e}");
        }
    }

    /// Long-polls the agent's OOM events and publishes them until the VM stops.
    fn spawn_oom_watcher(&self, sb: Arc<Sandbox>) {
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || {
                let mut oom = OomFilter::default();
                loop {
                    match sb
                        .client
                        .get_oom_event(Context::default(), &GetOOMEventRequest::new())
                    {
                        Ok(ev) => {
                            let id = ev.container_id;
                            let owned = this.containers().get(&id).is_some_and(|c| !c.sandbox);
                            match oom.admit(&id, owned, std::time::Instant::now()) {
                                Verdict::Publish => {
                                    log::info!("OOM in container {id}");
                                    this.publish(TaskOOM {
                                        container_id: id,
                                        ..Default::default()
                                    });
                                }
                                Verdict::Drop { log: true, dropped } => log::warn!(
                                    "dropped {dropped} guest OOM report(s), the last for {:?}: \
                                 not a container of this pod, or too frequent",
                                    id.chars().take(80).collect::<String>()
                                ),
                                Verdict::Drop { .. } => {}
                            }
                        }
                        Err(e) => {
                            if sb.vm_stopped() || sb.destroyed() {
                                return;
                            }
                            log::debug!("agent GetOOMEvent: {e}");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot spawn the OOM watcher: {e}");
        }
    }

    /// The VM stopped: every process still running exits with [`VM_DIED_STATUS`].
    fn vm_exited(&self, reason: &str) {
        let live: Vec<(String, String)> = {
            let mut cs = self.containers();
            let mut live = Vec::new();
            for (id, c) in cs.iter_mut() {
                for (exec_id, p) in std::iter::once((String::new(), &mut c.init))
                    .chain(c.execs.iter_mut().map(|(k, v)| (k.clone(), v)))
                {
                    if p.is_live() {
                        live.push((id.clone(), exec_id));
                    } else if p.status == Status::CREATED {
                        p.status = Status::STOPPED;
                        p.exit_status = VM_DIED_STATUS;
                        p.exited_at = Some(now());
                    }
                }
            }
            live
        };
        if !live.is_empty() {
            log::error!(
                "the pod VM stopped ({reason}): {} process(es) exit with status {VM_DIED_STATUS}",
                live.len()
            );
        }
        for (id, exec_id) in live {
            self.finish(&id, &exec_id, VM_DIED_STATUS, now());
        }
        self.inner.changed.notify_all();
    }

    /// Destroys the sandbox and removes the host state.
    fn teardown(&self) {
        let pod = self.pod().take();
        if let Some(p) = pod {
            p.sandbox.destroy();
            let _ = cleanup_state_dir(&p.state.root);
        }
    }

    fn do_create(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        let id = req.id.as_str();
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        for uri in [&stdio.stdout, &stdio.stderr] {
            OutputSink::parse(uri).map_err(|e| status_err(Code::INVALID_ARGUMENT, e))?;
        }
        let raw = std::fs::read(Path::new(&req.bundle).join("config.json"))
            .map_err(|e| status_err(Code::INVALID_ARGUMENT, format!("bundle config.json: {e}")))?;
        let spec_value: Value = serde_json::from_slice(&raw)
            .map_err(|e| status_err(Code::INVALID_ARGUMENT, format!("config.json: {e}")))?;
        let ann = annotations(&spec_value);
        let pod = pod_id(id, &ann);
        let sandbox_container = is_sandbox_container(&ann);
        let spec = guest_spec(&raw, &StateDir::container_in_guest(id))
            .map_err(|e| status_err(Code::INVALID_ARGUMENT, e))?;
        // The first Create of the shim brings up the pod's VM: its settings are the config
        // file (runtime options' ConfigPath), the environment and the pod's annotations.
        let config = if self.pod().is_none() {
            let config = ShimConfig::load(req.options.as_ref())
                .and_then(|c| c.with_annotations(&ann))
                .map_err(|e| status_err(Code::INVALID_ARGUMENT, e.to_string()))?;
            config.apply_log_level();
            config
        } else {
            self.inner.config.clone()
        };
        let hostname = spec_value
            .get("hostname")
            .and_then(Value::as_str)
            .unwrap_or("");

        let netns = super::net::netns_path(&spec_value);
        let (sb, state) = self.sandbox_for(&pod, hostname, netns.as_deref(), &config)?;
        // For `shim delete` after a SIGKILL: where this pod's state is.
        if let Some(run_dir) = state.root.parent() {
            if let Err(e) = super::config::record_run_dir(Path::new(&req.bundle), run_dir) {
                log::warn!("Create {id}: record the run dir in the bundle: {e}");
            }
        }
        let mut p = Proc {
            stdio,
            status: Status::CREATED,
            ..Default::default()
        };
        if !sandbox_container {
            let created = Self::host_mounts(&sb, req, &spec)
                .map_err(|e| status_err(Code::INTERNAL, format!("host mounts: {e}")))
                .and_then(|()| self.create_in_guest(&sb, id, spec.json, &mut p));
            if let Err(e) = created {
                if p.guest_pid != 0 {
                    let mut creq = ContainerRequest::new();
                    creq.container_id = id.to_string();
                    if let Err(e) = sb.client.remove_container(ctx(), &creq) {
                        log::warn!("agent RemoveContainer({id}) after a failed Create: {e}");
                    }
                }
                if let Err(e) = sb.with_share(|share| share.remove_container(id)) {
                    log::warn!("Create {id} failed; its host mounts: {e}");
                }
                if let Some(mut l) = p.logger.take() {
                    let _ = l.kill();
                    let _ = l.wait();
                }
                return Err(e);
            }
        }
        self.containers().insert(
            id.to_string(),
            Container {
                bundle: req.bundle.clone(),
                sandbox: sandbox_container,
                init: p,
                execs: HashMap::new(),
            },
        );
        Ok(std::process::id())
    }

    /// Runs `f` on process (`id`, `exec_id`) under the lock.
    fn with_proc<R>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&Container, &Proc) -> R,
    ) -> TtrpcResult<R> {
        let cs = self.containers();
        let c = cs.get(id).ok_or_else(|| not_found(id, ""))?;
        let p = c.proc(exec_id).ok_or_else(|| not_found(id, exec_id))?;
        Ok(f(c, p))
    }

    fn start_exec(&self, id: &str, exec_id: &str) -> TtrpcResult<()> {
        let (sb, _) = self.sandbox()?;
        let (stdio, spec) =
            self.with_proc(id, exec_id, |_, p| (p.stdio.clone(), p.spec.clone()))?;
        let (streams, flags) = Self::attach_streams(&sb, id, exec_id, &stdio)?;
        let mut ereq = ExecProcessRequest::new();
        ereq.container_id = id.to_string();
        ereq.exec_id = exec_id.to_string();
        ereq.oci_process_json = spec;
        ereq.stdio = Some(flags).into();
        let pid = sb
            .client
            .exec_process(ctx(), &ereq)
            .map_err(|e| agent_err("agent ExecProcess", e))?
            .pid;
        {
            let mut cs = self.containers();
            let p = cs
                .get_mut(id)
                .and_then(|c| c.proc_mut(exec_id))
                .ok_or_else(|| not_found(id, exec_id))?;
            p.guest_pid = pid;
            p.status = Status::RUNNING;
            self.wire_streams(id, p, streams)?;
        }
        self.publish(TaskExecStarted {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            pid: std::process::id(),
            ..Default::default()
        });
        self.spawn_exit_waiter(sb, id.to_string(), exec_id.to_string());
        Ok(())
    }
}

/// The agent streams of one process.
#[derive(Default)]
struct Streams {
    stdin: Option<std::os::unix::net::UnixStream>,
    stdout: Option<std::os::unix::net::UnixStream>,
    stderr: Option<std::os::unix::net::UnixStream>,
    pty: Option<std::os::unix::net::UnixStream>,
}

impl Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        log::info!("Create {id} (bundle {})", req.bundle);
        if !super::pod::valid_id(&id) {
            return Err(status_err(
                Code::INVALID_ARGUMENT,
                format!("invalid container id {id:?}"),
            ));
        }
        if self.containers().contains_key(&id) {
            return Err(status_err(
                Code::ALREADY_EXISTS,
                format!("container {id} already exists"),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(status_err(
                Code::UNIMPLEMENTED,
                "podvisor cannot restore a container from a checkpoint",
            ));
        }
        let pid = self.do_create(&req).inspect_err(|e| {
            log::error!("Create {id}: {e}");
            // A pod whose first container failed keeps nothing.
            if self.containers().is_empty() && self.pod().is_some() {
                self.teardown();
            }
        })?;
        self.publish(TaskCreate {
            container_id: id.clone(),
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
        });
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let (status, sandbox) =
            self.with_proc(&req.id, &req.exec_id, |c, p| (p.status, c.sandbox))?;
        if status != Status::CREATED {
            return Err(status_err(
                Code::FAILED_PRECONDITION,
                format!(
                    "process {} {} is not in the created state",
                    req.id, req.exec_id
                ),
            ));
        }
        let pid = std::process::id();
        if !req.exec_id.is_empty() {
            self.start_exec(&req.id, &req.exec_id)?;
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let sb = if sandbox {
            None
        } else {
            let (sb, _) = self.sandbox()?;
            let mut creq = ContainerRequest::new();
            creq.container_id = req.id.clone();
            sb.client
                .start_container(ctx(), &creq)
                .map_err(|e| agent_err("agent StartContainer", e))?;
            Some(sb)
        };
        if let Some(c) = self.containers().get_mut(&req.id) {
            c.init.status = Status::RUNNING;
        }
        self.publish(TaskStart {
            container_id: req.id.clone(),
            pid,
            ..Default::default()
        });
        if let Some(sb) = sb {
            self.spawn_exit_waiter(sb, req.id.clone(), String::new());
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.with_proc(&req.id, &req.exec_id, |c, p| api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: c.bundle.clone(),
            pid: std::process::id(),
            status: p.status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: p.exit_status,
            exited_at: p.exited_at.clone().into(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut cs = self.containers();
        loop {
            let p = cs
                .get(&req.id)
                .ok_or_else(|| not_found(&req.id, ""))?
                .proc(&req.exec_id)
                .ok_or_else(|| not_found(&req.id, &req.exec_id))?;
            if p.status == Status::STOPPED {
                return Ok(api::WaitResponse {
                    exit_status: p.exit_status,
                    exited_at: p.exited_at.clone().into(),
                    ..Default::default()
                });
            }
            cs = self
                .inner
                .changed
                .wait(cs)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (status, sandbox) =
            self.with_proc(&req.id, &req.exec_id, |c, p| (p.status, c.sandbox))?;
        if status == Status::STOPPED {
            return Err(status_err(
                Code::NOT_FOUND,
                format!("process {} {} already finished", req.id, req.exec_id),
            ));
        }
        if sandbox {
            // The pod's own task: any signal but 0 ends it (the VM stays until Shutdown).
            if req.signal != 0 {
                if status == Status::CREATED {
                    if let Some(c) = self.containers().get_mut(&req.id) {
                        c.init.status = Status::STOPPED;
                        c.init.exit_status = 128 + req.signal;
                        c.init.exited_at = Some(now());
                    }
                    self.inner.changed.notify_all();
                } else {
                    self.finish(&req.id, "", 128 + req.signal, now());
                }
            }
            return Ok(api::Empty::new());
        }
        let (sb, _) = self.sandbox()?;
        let mut sreq = SignalProcessRequest::new();
        sreq.container_id = req.id.clone();
        sreq.exec_id = req.exec_id.clone();
        sreq.signal = req.signal;
        sreq.all = req.all;
        sb.client
            .signal_process(ctx(), &sreq)
            .map_err(|e| agent_err("agent SignalProcess", e))?;
        Ok(api::Empty::new())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (status, sandbox) =
            self.with_proc(&req.id, &req.exec_id, |c, p| (p.status, c.sandbox))?;
        if matches!(status, Status::RUNNING | Status::PAUSED | Status::PAUSING) {
            return Err(status_err(
                Code::FAILED_PRECONDITION,
                format!(
                    "process {} {} is running: kill it first",
                    req.id, req.exec_id
                ),
            ));
        }
        let sb = self.sandbox().ok().filter(|(sb, _)| !sb.vm_stopped());
        if let (Some((sb, _)), false) = (&sb, sandbox) {
            let result = if req.exec_id.is_empty() {
                let mut creq = ContainerRequest::new();
                creq.container_id = req.id.clone();
                sb.client.remove_container(ctx(), &creq)
            } else {
                let mut preq = ProcessRequest::new();
                preq.container_id = req.id.clone();
                preq.exec_id = req.exec_id.clone();
                sb.client.remove_process(ctx(), &preq)
            };
            if let Err(e) = result {
                log::warn!("agent remove {} {}: {e}", req.id, req.exec_id);
            }
        }
        let removed = {
            let mut cs = self.containers();
            if req.exec_id.is_empty() {
                cs.remove(&req.id).map(|c| c.init)
            } else {
                cs.get_mut(&req.id)
                    .and_then(|c| c.execs.remove(&req.exec_id))
            }
        };
        self.inner.changed.notify_all();
        let Some(mut p) = removed else {
            return Err(not_found(&req.id, &req.exec_id));
        };
        if let Some(stdin) = p.stdin.take() {
            // Its client may never have opened the FIFO: end the copy, closing the FIFO and
            // the stream. (A deleted container's execs went with it: dropping the last
            // handle of their stdin does the same.)
            stdin.close();
        }
        if let Some(mut logger) = p.logger.take() {
            // Its pipes closed with the output threads; it exits by itself.
            let _ = logger.wait();
        }
        if req.exec_id.is_empty() && !sandbox {
            if let Ok((sb, _)) = self.sandbox() {
                if let Err(e) = sb.with_share(|share| share.remove_container(&req.id)) {
                    log::warn!("Delete {}: its host mounts: {e}", req.id);
                }
            }
        }
        let exited_at = p.exited_at.unwrap_or_else(now);
        let pid = std::process::id();
        if req.exec_id.is_empty() {
            self.publish(TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid,
                exit_status: p.exit_status,
                exited_at: MessageField::some(exited_at.clone()),
                ..Default::default()
            });
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: p.exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        if !super::pod::valid_id(&req.exec_id) {
            return Err(status_err(
                Code::INVALID_ARGUMENT,
                format!("invalid exec id {:?}", req.exec_id),
            ));
        }
        for uri in [&req.stdout, &req.stderr] {
            OutputSink::parse(uri).map_err(|e| status_err(Code::INVALID_ARGUMENT, e))?;
        }
        let spec = req.spec.value.clone();
        match serde_json::from_slice::<Value>(&spec) {
            Ok(Value::Object(_)) => {}
            _ => {
                return Err(status_err(
                    Code::INVALID_ARGUMENT,
                    "exec spec: not an OCI process JSON object",
                ))
            }
        }
        {
            let mut cs = self.containers();
            let c = cs.get_mut(&req.id).ok_or_else(|| not_found(&req.id, ""))?;
            if c.sandbox {
                return Err(status_err(
                    Code::FAILED_PRECONDITION,
                    "the pod sandbox container runs no process to exec into",
                ));
            }
            if !c.init.is_live() {
                return Err(status_err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is not running", req.id),
                ));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(status_err(
                    Code::ALREADY_EXISTS,
                    format!(
                        "exec {} already exists in container {}",
                        req.exec_id, req.id
                    ),
                ));
            }
            c.execs.insert(
                req.exec_id.clone(),
                Proc {
                    stdio: StdioPaths {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                    },
                    status: Status::CREATED,
                    spec,
                    ..Default::default()
                },
            );
        }
        self.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let sandbox = self.with_proc(&req.id, "", |c, _| c.sandbox)?;
        let mut resp = api::PidsResponse::new();
        if sandbox {
            return Ok(resp);
        }
        let (sb, _) = self.sandbox()?;
        let mut creq = ContainerRequest::new();
        creq.container_id = req.id.clone();
        let pids = sb
            .client
            .list_processes(ctx(), &creq)
            .map_err(|e| agent_err("agent ListProcesses", e))?
            .pids;
        resp.processes = pids
            .into_iter()
            .map(|pid| ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(resp)
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let terminal = self.with_proc(&req.id, &req.exec_id, |_, p| p.stdio.terminal)?;
        if !terminal {
            return Err(status_err(
                Code::FAILED_PRECONDITION,
                format!("process {} {} has no terminal", req.id, req.exec_id),
            ));
        }
        let (sb, _) = self.sandbox()?;
        let mut rreq = ResizeTtyRequest::new();
        rreq.container_id = req.id.clone();
        rreq.exec_id = req.exec_id.clone();
        rreq.columns = req.width;
        rreq.rows = req.height;
        sb.client
            .resize_tty(ctx(), &rreq)
            .map_err(|e| agent_err("agent ResizeTty", e))?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let stdin = self.with_proc(&req.id, &req.exec_id, |_, p| p.stdin.clone())?;
        let (Some(stdin), true) = (stdin, req.stdin) else {
            return Ok(api::Empty::new());
        };
        // The client closed its end of the FIFO: the copy reaches EOF and half-closes the
        // stream by itself. If it does not (another writer keeps the FIFO open), the agent
        // closes stdin after what was forwarded so far.
        if stdin.wait_done(CLOSE_IO_GRACE) {
            return Ok(api::Empty::new());
        }
        let (sb, _) = self.sandbox()?;
        let mut creq = CloseStdinRequest::new();
        creq.container_id = req.id.clone();
        creq.exec_id = req.exec_id.clone();
        creq.stdin_bytes = stdin.bytes();
        sb.client
            .close_stdin(ctx(), &creq)
            .map_err(|e| agent_err("agent CloseStdin", e))?;
        Ok(api::Empty::new())
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let (status, sandbox) = self.with_proc(&req.id, "", |c, p| (p.status, c.sandbox))?;
        if status != Status::RUNNING {
            return Err(status_err(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        if !sandbox {
            let (sb, _) = self.sandbox()?;
            let mut creq = ContainerRequest::new();
            creq.container_id = req.id.clone();
            sb.client
                .pause_container(ctx(), &creq)
                .map_err(|e| agent_err("agent PauseContainer", e))?;
        }
        if let Some(c) = self.containers().get_mut(&req.id) {
            if c.init.status == Status::RUNNING {
                c.init.status = Status::PAUSED;
            }
        }
        self.publish(TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let (status, sandbox) = self.with_proc(&req.id, "", |c, p| (p.status, c.sandbox))?;
        if status != Status::PAUSED {
            return Err(status_err(
                Code::FAILED_PRECONDITION,
                format!("container {} is not paused", req.id),
            ));
        }
        if !sandbox {
            let (sb, _) = self.sandbox()?;
            let mut creq = ContainerRequest::new();
            creq.container_id = req.id.clone();
            sb.client
                .resume_container(ctx(), &creq)
                .map_err(|e| agent_err("agent ResumeContainer", e))?;
        }
        if let Some(c) = self.containers().get_mut(&req.id) {
            if c.init.status == Status::PAUSED {
                c.init.status = Status::RUNNING;
            }
        }
        self.publish(TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let sandbox = self.with_proc(&req.id, "", |c, _| c.sandbox)?;
        let resources = req.resources.value.clone();
        if serde_json::from_slice::<Value>(&resources).map_or(true, |v| !v.is_object()) {
            return Err(status_err(
                Code::INVALID_ARGUMENT,
                "update: resources are not an OCI LinuxResources JSON object",
            ));
        }
        if sandbox {
            return Ok(api::Empty::new());
        }
        let (sb, _) = self.sandbox()?;
        let mut ureq = UpdateResourcesRequest::new();
        ureq.container_id = req.id.clone();
        ureq.oci_resources_json = resources;
        sb.client
            .update_resources(ctx(), &ureq)
            .map_err(|e| agent_err("agent UpdateResources", e))?;
        Ok(api::Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let sandbox = self.with_proc(&req.id, "", |c, _| c.sandbox)?;
        let stats = if sandbox {
            Default::default()
        } else {
            let (sb, _) = self.sandbox()?;
            let mut creq = ContainerRequest::new();
            creq.container_id = req.id.clone();
            sb.client
                .stats(ctx(), &creq)
                .map_err(|e| agent_err("agent Stats", e))?
        };
        let any = metrics_any(&stats).map_err(|e| status_err(Code::INTERNAL, e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
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
        if !self.containers().is_empty() {
            return Ok(api::Empty::new());
        }
        if self.inner.shutting_down.swap(true, Ordering::SeqCst) {
            return Ok(api::Empty::new());
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
        Ok(api::Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status_err(
            Code::UNIMPLEMENTED,
            "podvisor does not checkpoint single containers (CRIU does not run in the pod VM); \
             pod templates snapshot whole VMs instead",
        ))
    }
}
