//! containerd's Task service (v2) on top of the pod VM's agent.
//!
//! Implemented: Create, Start, State, Wait, Kill, Delete, Connect, Shutdown (what
//! `ctr run --rm` needs) for a container's init process. Every other method, exec
//! processes and terminal mode answer UNIMPLEMENTED.
//!
//! Method → agent RPC: Create → (first container: boot the VM, CreateSandbox) stream
//! attaches + CreateContainer; Start → StartContainer, then a thread blocks in WaitProcess
//! and publishes TaskExit; Kill → SignalProcess; Delete → RemoveContainer; Shutdown (no
//! containers left) → DestroySandbox.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use containerd_shim::api;
use containerd_shim::event::Event;
use containerd_shim::mount::mount_rootfs;
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskIO, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::Status;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal, Task, TtrpcContext, TtrpcResult};
use podvisor_agent_protocol::agent::{
    ContainerRequest, CreateContainerRequest, ProcessRequest, SignalProcessRequest,
};
use podvisor_agent_protocol::stream::StreamKind;
use serde_json::Value;

use super::sandbox::{cleanup_state_dir, ctx, unmount_below, Sandbox, StateDir};
use super::stdio::{copy_input, copy_output, StdioPaths};
use super::{now, timestamp_ns, ShimConfig};

fn status_err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn unimplemented(method: &str) -> ttrpc::Error {
    status_err(
        Code::UNIMPLEMENTED,
        format!("podvisor: {method} is not implemented yet"),
    )
}

/// An agent error as containerd should see it: the agent's status code (which follows
/// errdefs) with context, anything else INTERNAL.
fn agent_err(what: &str, e: ttrpc::Error) -> ttrpc::Error {
    match e {
        ttrpc::Error::RpcStatus(s) => status_err(s.code(), format!("{what}: {}", s.message())),
        other => status_err(Code::INTERNAL, format!("{what}: {other}")),
    }
}

/// The bundle's OCI spec adapted for the guest: the rootfs is the share's copy, host-only
/// settings (hooks, AppArmor/SELinux labels) are dropped. The agent sets cgroupsPath.
pub fn guest_spec(config_json: &[u8], rootfs_in_guest: &str) -> Result<Vec<u8>, String> {
    let mut spec: Value =
        serde_json::from_slice(config_json).map_err(|e| format!("config.json: {e}"))?;
    let obj = spec
        .as_object_mut()
        .ok_or("config.json is not a JSON object")?;
    obj.remove("hooks");
    obj.insert(
        "root".into(),
        serde_json::json!({
            "path": rootfs_in_guest,
            "readonly": obj.get("root").and_then(|r| r.get("readonly")).cloned()
                .unwrap_or(Value::Bool(false)),
        }),
    );
    if let Some(process) = obj.get_mut("process").and_then(Value::as_object_mut) {
        process.remove("apparmorProfile");
        process.remove("selinuxLabel");
    }
    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("mountLabel");
    }
    serde_json::to_vec(&spec).map_err(|e| e.to_string())
}

#[derive(Debug)]
struct Container {
    bundle: String,
    pid: u32,
    stdio: StdioPaths,
    status: Status,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    /// Output copy threads; joined before TaskExit so no output is lost.
    outputs: Vec<JoinHandle<()>>,
}

struct Inner {
    id: String,
    namespace: String,
    config: ShimConfig,
    state: StateDir,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    /// Held while the VM boots: one sandbox per shim.
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Container>>,
    /// Notified when a container stops or is deleted.
    changed: Condvar,
}

/// The Task service of one shim (one pod).
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(
        id: &str,
        namespace: &str,
        config: ShimConfig,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        let state = StateDir {
            root: config.run_dir.join(id),
        };
        Self {
            inner: Arc::new(Inner {
                id: id.to_string(),
                namespace: namespace.to_string(),
                config,
                state,
                publisher,
                exit,
                sandbox: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                changed: Condvar::new(),
            }),
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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

    /// The pod's sandbox, booting the VM on first use.
    fn sandbox(&self) -> Result<Arc<Sandbox>, String> {
        let mut slot = self.inner.sandbox.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sb) = slot.as_ref() {
            if sb.vm_stopped() {
                return Err("the pod VM has stopped".into());
            }
            return Ok(sb.clone());
        }
        let sb = Arc::new(Sandbox::create(
            &self.inner.id,
            &self.inner.config,
            self.inner.state.clone(),
        )?);
        *slot = Some(sb.clone());
        Ok(sb)
    }

    fn existing_sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.inner
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| status_err(Code::FAILED_PRECONDITION, "the pod VM is not running"))
    }

    /// Mounts containerd's rootfs mounts at `target` (or binds the bundle's rootfs).
    fn mount_rootfs(req: &api::CreateTaskRequest, target: &Path) -> containerd_shim::Result<()> {
        std::fs::create_dir_all(target).map_err(|e| {
            containerd_shim::Error::Other(format!("create {}: {e}", target.display()))
        })?;
        if req.rootfs.is_empty() {
            let src = PathBuf::from(&req.bundle).join("rootfs");
            let src = src.to_string_lossy();
            return mount_rootfs(Some("bind"), Some(&src), &["rbind".to_string()], target);
        }
        for m in &req.rootfs {
            mount_rootfs(Some(&m.type_), Some(&m.source), &m.options, target)?;
        }
        Ok(())
    }

    /// The part of Create that can fail after the rootfs is mounted.
    fn create_in_guest(
        &self,
        req: &api::CreateTaskRequest,
        stdio: &StdioPaths,
        spec: Vec<u8>,
    ) -> Result<(u32, Vec<JoinHandle<()>>), ttrpc::Error> {
        let sb = self
            .sandbox()
            .map_err(|e| status_err(Code::FAILED_PRECONDITION, format!("pod VM: {e}")))?;
        let id = req.id.as_str();
        let attach = |kind, path: &str| -> TtrpcResult<Option<std::os::unix::net::UnixStream>> {
            if path.is_empty() {
                return Ok(None);
            }
            sb.attach_stream(kind, id, "")
                .map(Some)
                .map_err(|e| status_err(Code::INTERNAL, e))
        };
        let stdin = attach(StreamKind::Stdin, &stdio.stdin)?;
        let stdout = attach(StreamKind::Stdout, &stdio.stdout)?;
        let stderr = attach(StreamKind::Stderr, &stdio.stderr)?;

        let mut creq = CreateContainerRequest::new();
        creq.container_id = id.to_string();
        creq.oci_spec_json = spec;
        creq.rootfs = format!("{}/rootfs", StateDir::container_in_guest(id));
        let mut flags = podvisor_agent_protocol::agent::Stdio::new();
        flags.stdin = stdin.is_some();
        flags.stdout = stdout.is_some();
        flags.stderr = stderr.is_some();
        creq.stdio = Some(flags).into();
        let pid = sb
            .client
            .create_container(ctx(), &creq)
            .map_err(|e| agent_err("agent CreateContainer", e))?
            .pid;

        let mut outputs = Vec::new();
        if let Some(conn) = stdout {
            outputs.push(copy_output(conn, stdio.stdout.clone()));
        }
        if let Some(conn) = stderr {
            outputs.push(copy_output(conn, stdio.stderr.clone()));
        }
        if let Some(conn) = stdin {
            // Not joined: it ends when containerd closes the FIFO.
            drop(copy_input(stdio.stdin.clone(), conn));
        }
        Ok((pid, outputs))
    }

    /// Waits for the init process of `id` in the agent, then publishes TaskExit and marks
    /// the container stopped (in that order: containerd wants the event before Wait
    /// returns).
    fn spawn_exit_waiter(&self, sb: Arc<Sandbox>, id: String, pid: u32) {
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("exit-wait".into())
            .spawn(move || {
                let mut req = ProcessRequest::new();
                req.container_id = id.clone();
                let (status, at) = match sb.client.wait_process(Context::default(), &req) {
                    Ok(r) => (r.exit_status as u32, timestamp_ns(r.exited_at_ns)),
                    Err(e) => {
                        log::error!("agent WaitProcess({id}): {e}");
                        (255, now())
                    }
                };
                let outputs = this
                    .containers()
                    .get_mut(&id)
                    .map(|c| std::mem::take(&mut c.outputs))
                    .unwrap_or_default();
                for t in outputs {
                    let _ = t.join();
                }
                this.publish(TaskExit {
                    container_id: id.clone(),
                    id: id.clone(),
                    pid,
                    exit_status: status,
                    exited_at: MessageField::some(at.clone()),
                    ..Default::default()
                });
                if let Some(c) = this.containers().get_mut(&id) {
                    c.status = Status::STOPPED;
                    c.exit_status = status;
                    c.exited_at = Some(at);
                }
                this.inner.changed.notify_all();
            });
        if let Err(e) = spawned {
            log::error!("cannot spawn the exit waiter: {e}");
        }
    }

    fn teardown(&self) {
        let sb = self
            .inner
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(sb) = sb {
            sb.destroy();
        }
        cleanup_state_dir(&self.inner.state.root);
    }
}

fn check_init(exec_id: &str, method: &str) -> TtrpcResult<()> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        Err(unimplemented(&format!("{method} of an exec process")))
    }
}

fn not_found(id: &str) -> ttrpc::Error {
    status_err(Code::NOT_FOUND, format!("container {id} not found"))
}

impl Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        log::info!("Create {id} (bundle {})", req.bundle);
        if id.is_empty() || id.contains('/') || id == "." || id == ".." {
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
            return Err(unimplemented("Create from a checkpoint"));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        stdio
            .check()
            .map_err(|e| status_err(Code::UNIMPLEMENTED, e))?;
        let config = std::fs::read(Path::new(&req.bundle).join("config.json"))
            .map_err(|e| status_err(Code::INVALID_ARGUMENT, format!("bundle config.json: {e}")))?;
        let spec = guest_spec(
            &config,
            &format!("{}/rootfs", StateDir::container_in_guest(&id)),
        )
        .map_err(|e| status_err(Code::INVALID_ARGUMENT, e))?;

        let dir = self.inner.state.container(&id);
        let rootfs = dir.join("rootfs");
        let created = Self::mount_rootfs(&req, &rootfs)
            .map_err(|e| status_err(Code::INTERNAL, format!("mount the rootfs: {e}")))
            .and_then(|()| self.create_in_guest(&req, &stdio, spec));
        let (pid, outputs) = match created {
            Ok(v) => v,
            Err(e) => {
                log::error!("Create {id}: {e}");
                unmount_below(&dir);
                let _ = std::fs::remove_dir_all(&dir);
                let no_sandbox = self
                    .inner
                    .sandbox
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_none();
                if no_sandbox {
                    cleanup_state_dir(&self.inner.state.root);
                }
                return Err(e);
            }
        };
        self.containers().insert(
            id.clone(),
            Container {
                bundle: req.bundle.clone(),
                pid,
                stdio: stdio.clone(),
                status: Status::CREATED,
                exit_status: 0,
                exited_at: None,
                outputs,
            },
        );
        self.publish(TaskCreate {
            container_id: id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: stdio.stdin,
                stdout: stdio.stdout,
                stderr: stdio.stderr,
                terminal: stdio.terminal,
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
        check_init(&req.exec_id, "Start")?;
        let pid = {
            let containers = self.containers();
            let c = containers.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            if c.status != Status::CREATED {
                return Err(status_err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is not in the created state", req.id),
                ));
            }
            c.pid
        };
        let sb = self.existing_sandbox()?;
        let mut creq = ContainerRequest::new();
        creq.container_id = req.id.clone();
        sb.client
            .start_container(ctx(), &creq)
            .map_err(|e| agent_err("agent StartContainer", e))?;
        if let Some(c) = self.containers().get_mut(&req.id) {
            c.status = Status::RUNNING;
        }
        self.publish(TaskStart {
            container_id: req.id.clone(),
            pid,
            ..Default::default()
        });
        self.spawn_exit_waiter(sb, req.id.clone(), pid);
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
        check_init(&req.exec_id, "State")?;
        let containers = self.containers();
        let c = containers.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: c.pid,
            status: c.status.into(),
            stdin: c.stdio.stdin.clone(),
            stdout: c.stdio.stdout.clone(),
            stderr: c.stdio.stderr.clone(),
            terminal: c.stdio.terminal,
            exit_status: c.exit_status,
            exited_at: c.exited_at.clone().into(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        check_init(&req.exec_id, "Wait")?;
        let mut containers = self.containers();
        loop {
            let c = containers.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            if c.status == Status::STOPPED {
                return Ok(api::WaitResponse {
                    exit_status: c.exit_status,
                    exited_at: c.exited_at.clone().into(),
                    ..Default::default()
                });
            }
            containers = self
                .inner
                .changed
                .wait(containers)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        check_init(&req.exec_id, "Kill")?;
        let status = self
            .containers()
            .get(&req.id)
            .map(|c| c.status)
            .ok_or_else(|| not_found(&req.id))?;
        if status == Status::STOPPED {
            return Err(status_err(
                Code::NOT_FOUND,
                format!("process of container {} already finished", req.id),
            ));
        }
        let sb = self.existing_sandbox()?;
        let mut sreq = SignalProcessRequest::new();
        sreq.container_id = req.id.clone();
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
        check_init(&req.exec_id, "Delete")?;
        let (pid, status) = {
            let containers = self.containers();
            let c = containers.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            (c.pid, c.status)
        };
        if status == Status::RUNNING {
            return Err(status_err(
                Code::FAILED_PRECONDITION,
                format!("container {} is running: kill it first", req.id),
            ));
        }
        if let Ok(sb) = self.existing_sandbox() {
            let mut creq = ContainerRequest::new();
            creq.container_id = req.id.clone();
            if let Err(e) = sb.client.remove_container(ctx(), &creq) {
                log::warn!("agent RemoveContainer({}): {e}", req.id);
            }
        }
        let dir = self.inner.state.container(&req.id);
        unmount_below(&dir);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            log::warn!("remove {}: {e}", dir.display());
        }
        let c = self.containers().remove(&req.id);
        self.inner.changed.notify_all();
        let (exit_status, exited_at) = c
            .map(|c| (c.exit_status, c.exited_at.unwrap_or_else(now)))
            .unwrap_or_else(|| (0, now()));
        self.publish(TaskDelete {
            container_id: req.id.clone(),
            id: req.id.clone(),
            pid,
            exit_status,
            exited_at: MessageField::some(exited_at.clone()),
            ..Default::default()
        });
        Ok(api::DeleteResponse {
            pid,
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.containers().get(&req.id).map_or(0, |c| c.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if !self.containers().is_empty() {
            return Ok(api::Empty::new());
        }
        log::info!("Shutdown: destroying the pod VM");
        self.teardown();
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, _req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        Err(unimplemented("Pids"))
    }

    fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Pause"))
    }

    fn resume(&self, _ctx: &TtrpcContext, _req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Resume"))
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Checkpoint"))
    }

    fn exec(&self, _ctx: &TtrpcContext, _req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Exec"))
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unimplemented("ResizePty"))
    }

    fn close_io(&self, _ctx: &TtrpcContext, _req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("CloseIO"))
    }

    fn update(&self, _ctx: &TtrpcContext, _req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Update"))
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        _req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Err(unimplemented("Stats"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapts_the_spec_for_the_guest() {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "/run/containerd/io.containerd.runtime.v2.task/default/c/rootfs"},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "process": {"args": ["echo"], "apparmorProfile": "cri-containerd.apparmor.d"},
            "linux": {"mountLabel": "x", "namespaces": [{"type": "pid"}]}
        });
        let out = guest_spec(
            &serde_json::to_vec(&spec).unwrap(),
            "/run/podvisor/shared/c/rootfs",
        )
        .unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["root"]["path"], "/run/podvisor/shared/c/rootfs");
        assert_eq!(out["root"]["readonly"], false);
        assert!(out.get("hooks").is_none());
        assert!(out["process"].get("apparmorProfile").is_none());
        assert!(out["linux"].get("mountLabel").is_none());
        assert_eq!(out["linux"]["namespaces"][0]["type"], "pid");
        assert!(guest_spec(b"[]", "/x").is_err());
    }
}
