//! The pod's containers and their processes: the records containerd asks about, the
//! state machine each process follows ([`process::ProcState`]), and the agent calls that
//! move it, with the task events each step publishes.
//!
//! What this layer needs of the pod is narrow (`PodHost`: the agent, the share's mounts,
//! whether the VM is down), so it runs against a fake agent in unit tests.
//!
//! Rules it keeps:
//! - a CRI sandbox container ([`ContainerKind::Sandbox`]) is the pod itself: nothing runs
//!   for it in the guest; Start and Kill only change its record;
//! - TaskExit is published exactly once per started process, before Wait returns and
//!   after its output is drained;
//! - a process is deleted only when created or stopped; Delete releases what its stdio
//!   held and, for a container, its host mounts;
//! - when the VM stops, every live process exits with [`VM_DIED_STATUS`].

mod io;
pub mod process;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::types::task::Status;
use oci_spec::runtime::LinuxResources;

use super::agent::{NewContainer, StatsResponse};
use super::error::ShimError;
use super::oom_events::{OomFilter, Verdict};
use super::pod::{ContainerLimits, ContainerMounts, PodHost};
use super::stdio::{FirstBytes, StdioPaths};
use super::timeline;
use super::{now, timestamp_ns};
use process::{Exit, ProcState, Process};

/// Exit status of processes whose VM stopped under them.
pub const VM_DIED_STATUS: u32 = 255;
/// How long CloseIO waits for the stdin copy to reach EOF by itself.
const CLOSE_IO_GRACE: Duration = Duration::from_secs(2);
/// How long a process's reported exit waits for its output to be copied: the agent already
/// waited for the output to close, so an output still open now is held by a leftover
/// process (a background child); it is copied on, but the exit is not held back by it.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Where task events go (containerd's publisher; a recorder in tests).
pub trait EventSink: Send + Sync {
    fn publish(&self, topic: String, event: Box<dyn MessageDyn>);
}

fn emit<E: Event + 'static>(sink: &dyn EventSink, event: E) {
    sink.publish(event.topic(), Box::new(event));
}

/// What a container is to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerKind {
    /// Runs its process in the guest.
    Workload,
    /// A CRI sandbox container: the pod itself, no process in the guest.
    Sandbox,
}

#[derive(Debug)]
struct Container {
    bundle: String,
    kind: ContainerKind,
    init: Process,
    execs: HashMap<String, Process>,
}

impl Container {
    fn proc(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    fn proc_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }

    /// Every process with its exec id (empty for the init).
    fn procs_mut(&mut self) -> impl Iterator<Item = (&str, &mut Process)> {
        std::iter::once(("", &mut self.init))
            .chain(self.execs.iter_mut().map(|(k, v)| (k.as_str(), v)))
    }
}

/// Pause or Resume.
#[derive(Debug, Clone, Copy)]
enum Freeze {
    Pause,
    Resume,
}

/// A container to create.
#[derive(Debug)]
pub struct ContainerSpec {
    pub id: String,
    pub bundle: String,
    pub kind: ContainerKind,
    pub stdio: StdioPaths,
    pub mounts: ContainerMounts,
    /// The OCI spec adapted for the guest (JSON).
    pub spec_json: Vec<u8>,
    /// The container's limits, which the pod's VM size follows.
    pub limits: ContainerLimits,
}

/// A process as State reports it.
#[derive(Debug, Clone)]
pub struct ProcessView {
    pub bundle: String,
    pub status: Status,
    pub stdio: StdioPaths,
    pub exit: Option<Exit>,
}

/// The containers of one pod.
pub struct Containers {
    namespace: String,
    events: Arc<dyn EventSink>,
    map: Mutex<HashMap<String, Container>>,
    /// Notified when a process stops or a container is deleted.
    changed: Condvar,
}

fn refused(id: &str, exec_id: &str, r: process::Refused) -> ShimError {
    ShimError::State {
        id: id.to_string(),
        exec_id: exec_id.to_string(),
        problem: r.0,
    }
}

impl Containers {
    pub fn new(namespace: &str, events: Arc<dyn EventSink>) -> Arc<Self> {
        Arc::new(Self {
            namespace: namespace.to_string(),
            events,
            map: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on process (`id`, `exec_id`) under the lock.
    fn with_proc<R>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Container) -> R,
    ) -> Result<R, ShimError> {
        let mut cs = self.lock();
        let c = cs.get_mut(id).ok_or_else(|| ShimError::not_found(id, ""))?;
        if c.proc(exec_id).is_none() {
            return Err(ShimError::not_found(id, exec_id));
        }
        Ok(f(c))
    }

    fn kind(&self, id: &str) -> Result<ContainerKind, ShimError> {
        self.with_proc(id, "", |c| c.kind)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Creates a container: for a workload, its mounts in the share, its streams and the
    /// container in the guest (undone in reverse order when a step fails).
    pub fn create(&self, pod: &Arc<dyn PodHost>, spec: ContainerSpec) -> Result<(), ShimError> {
        if self.contains(&spec.id) {
            return Err(ShimError::ContainerExists(spec.id));
        }
        let mut init = Process::new(spec.stdio, Vec::new());
        if spec.kind == ContainerKind::Workload {
            if let Err(e) =
                self.create_in_guest(pod, &spec.id, &spec.mounts, spec.spec_json, &mut init)
            {
                let agent = pod.agent();
                if init.guest_pid != 0 {
                    if let Err(e) = agent.remove_container(&spec.id) {
                        log::warn!("{e} (after a failed Create of {})", spec.id);
                    }
                }
                if let Err(e) = pod.unmount(&spec.id) {
                    log::warn!("Create {} failed; its host mounts: {e}", spec.id);
                }
                init.io.abort();
                return Err(e);
            }
        }
        if spec.kind == ContainerKind::Workload {
            // A pod created with its limits is already at this size; a container added
            // later may change it. The container runs either way (its limit is enforced in
            // the guest): a VM that cannot follow is logged, not a failed Create.
            if let Err(e) = pod.set_limits(&spec.id, spec.limits) {
                log::warn!("Create {}: {e}", spec.id);
            }
        }
        let mut cs = self.lock();
        if cs.contains_key(&spec.id) {
            return Err(ShimError::ContainerExists(spec.id));
        }
        cs.insert(
            spec.id,
            Container {
                bundle: spec.bundle,
                kind: spec.kind,
                init,
                execs: HashMap::new(),
            },
        );
        Ok(())
    }

    fn create_in_guest(
        &self,
        pod: &Arc<dyn PodHost>,
        id: &str,
        mounts: &ContainerMounts,
        spec_json: Vec<u8>,
        init: &mut Process,
    ) -> Result<(), ShimError> {
        // The pod's first workload container has the container phases of its timeline.
        let timeline = pod.timeline().filter(|t| t.claim(id));
        let mark = |phase| {
            if let Some(t) = &timeline {
                t.mark_container(id, phase);
            }
        };
        pod.mount(id, mounts)?;
        mark(timeline::phase::ROOTFS);
        let agent = pod.agent();
        let (streams, flags) = io::attach(agent.as_ref(), id, "", &init.stdio)?;
        init.guest_pid = agent.create_container(NewContainer {
            id: id.to_string(),
            spec_json,
            rootfs: pod.guest_rootfs(id),
            stdio: flags,
        })?;
        mark(timeline::phase::CONTAINER);
        let first_output = timeline.map(|t| {
            let id = id.to_string();
            Box::new(move || t.mark_container(&id, timeline::phase::OUTPUT)) as FirstBytes
        });
        io::wire(
            id,
            &self.namespace,
            &init.stdio,
            streams,
            &mut init.io,
            first_output,
        )
    }

    /// Starts a created process: the container's init, or an exec.
    pub fn start(
        self: &Arc<Self>,
        pod: &Arc<dyn PodHost>,
        id: &str,
        exec_id: &str,
    ) -> Result<(), ShimError> {
        let (kind, state) = self.with_proc(id, exec_id, |c| {
            let p = c.proc(exec_id).expect("checked by with_proc");
            (c.kind, p.state.clone())
        })?;
        if state != ProcState::Created {
            return Err(refused(
                id,
                exec_id,
                process::Refused("is not in the created state"),
            ));
        }
        let pid = std::process::id();
        if !exec_id.is_empty() {
            return self.start_exec(pod, id, exec_id);
        }
        if kind == ContainerKind::Workload {
            pod.agent().start_container(id)?;
            if let Some(t) = pod.timeline() {
                t.mark_container(id, timeline::phase::START);
            }
        }
        self.with_proc(id, "", |c| c.init.state.start())?
            .map_err(|r| refused(id, "", r))?;
        emit(
            self.events.as_ref(),
            TaskStart {
                container_id: id.to_string(),
                pid,
                ..Default::default()
            },
        );
        if kind == ContainerKind::Workload {
            self.spawn_exit_waiter(pod, id, "")?;
        }
        Ok(())
    }

    fn start_exec(
        self: &Arc<Self>,
        pod: &Arc<dyn PodHost>,
        id: &str,
        exec_id: &str,
    ) -> Result<(), ShimError> {
        let (stdio, spec) = self.with_proc(id, exec_id, |c| {
            let p = c.proc_mut(exec_id).expect("checked by with_proc");
            (p.stdio.clone(), std::mem::take(&mut p.spec))
        })?;
        let agent = pod.agent();
        let (streams, flags) = io::attach(agent.as_ref(), id, exec_id, &stdio)?;
        let pid = agent.exec_process(id, exec_id, spec, flags)?;
        self.with_proc(id, exec_id, |c| {
            let p = c.proc_mut(exec_id).expect("checked by with_proc");
            p.guest_pid = pid;
            p.state.start().map_err(|r| refused(id, exec_id, r))?;
            io::wire(id, &self.namespace, &p.stdio, streams, &mut p.io, None)
        })??;
        emit(
            self.events.as_ref(),
            TaskExecStarted {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                pid: std::process::id(),
                ..Default::default()
            },
        );
        self.spawn_exit_waiter(pod, id, exec_id)
    }

    /// Waits for a started process in the agent, drains its output, then reports its
    /// exit. If no thread can wait, the process is killed and reported as exited now
    /// (a process nobody waits for would leave Wait hanging).
    fn spawn_exit_waiter(
        self: &Arc<Self>,
        pod: &Arc<dyn PodHost>,
        id: &str,
        exec_id: &str,
    ) -> Result<(), ShimError> {
        let this = self.clone();
        let agent = pod.agent();
        let (id, exec_id) = (id.to_string(), exec_id.to_string());
        let (tid, texec) = (id.clone(), exec_id.clone());
        let spawned = std::thread::Builder::new()
            .name("exit-wait".into())
            .spawn(move || {
                let exit = match agent.wait_process(&tid, &texec) {
                    Ok(e) => Exit {
                        status: e.status,
                        at: timestamp_ns(e.at_ns),
                    },
                    Err(e) => {
                        log::error!("{e} ({tid} {texec})");
                        Exit {
                            status: VM_DIED_STATUS,
                            at: now(),
                        }
                    }
                };
                let outputs = this
                    .lock()
                    .get_mut(&tid)
                    .and_then(|c| c.proc_mut(&texec))
                    .map(|p| std::mem::take(&mut p.io.outputs))
                    .unwrap_or_default();
                let deadline = std::time::Instant::now() + OUTPUT_DRAIN;
                for t in outputs {
                    while !t.is_finished() && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if t.is_finished() {
                        let _ = t.join();
                    } else {
                        log::warn!(
                            "{tid} {texec}: output still open {OUTPUT_DRAIN:?} after the exit \
                             (a leftover process holds it?): reporting the exit, copying on"
                        );
                    }
                }
                this.finish(&tid, &texec, exit);
            });
        match spawned {
            Ok(_) => Ok(()),
            Err(source) => {
                let agent = pod.agent();
                if let Err(e) = agent.signal_process(&id, &exec_id, libc::SIGKILL as u32, false) {
                    log::warn!("{e} (no exit waiter for {id} {exec_id})");
                }
                self.finish(
                    &id,
                    &exec_id,
                    Exit {
                        status: VM_DIED_STATUS,
                        at: now(),
                    },
                );
                Err(ShimError::Thread {
                    what: "exit waiter",
                    source,
                })
            }
        }
    }

    /// Reports a started process's exit once: TaskExit first, then `Stopped` (containerd
    /// wants the event before Wait returns).
    fn finish(&self, id: &str, exec_id: &str, exit: Exit) {
        if self.begin_exit(id, exec_id) {
            self.report_exit(id, exec_id, exit);
        }
    }

    /// Claims the report of a started process's exit; false if another caller has it.
    fn begin_exit(&self, id: &str, exec_id: &str) -> bool {
        let mut cs = self.lock();
        cs.get_mut(id)
            .and_then(|c| c.proc_mut(exec_id))
            .is_some_and(|p| p.state.begin_exit())
    }

    /// The claimed report: TaskExit, then `Stopped`.
    fn report_exit(&self, id: &str, exec_id: &str, exit: Exit) {
        emit(
            self.events.as_ref(),
            TaskExit {
                container_id: id.to_string(),
                id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
                pid: std::process::id(),
                exit_status: exit.status,
                exited_at: MessageField::some(exit.at.clone()),
                ..Default::default()
            },
        );
        if let Some(p) = self.lock().get_mut(id).and_then(|c| c.proc_mut(exec_id)) {
            p.state.exited(exit);
        }
        self.changed.notify_all();
    }

    pub fn state(&self, id: &str, exec_id: &str) -> Result<ProcessView, ShimError> {
        self.with_proc(id, exec_id, |c| {
            let p = c.proc(exec_id).expect("checked by with_proc");
            ProcessView {
                bundle: c.bundle.clone(),
                status: p.state.status(),
                stdio: p.stdio.clone(),
                exit: p.state.exit().cloned(),
            }
        })
    }

    /// Blocks until the process has stopped.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, ShimError> {
        let mut cs = self.lock();
        loop {
            let p = cs
                .get(id)
                .ok_or_else(|| ShimError::not_found(id, ""))?
                .proc(exec_id)
                .ok_or_else(|| ShimError::not_found(id, exec_id))?;
            if let Some(exit) = p.state.exit() {
                return Ok(exit.clone());
            }
            cs = self.changed.wait(cs).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn kill(
        self: &Arc<Self>,
        pod: &Arc<dyn PodHost>,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ShimError> {
        let (kind, state) = self.with_proc(id, exec_id, |c| {
            (c.kind, c.proc(exec_id).expect("checked").state.clone())
        })?;
        if matches!(state, ProcState::Stopped(_)) {
            return Err(ShimError::Finished {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            });
        }
        match kind {
            ContainerKind::Workload => Ok(pod.agent().signal_process(id, exec_id, signal, all)?),
            // The pod's own task: any signal but 0 ends it (the VM stays until Shutdown).
            ContainerKind::Sandbox if signal == 0 => Ok(()),
            ContainerKind::Sandbox => {
                let exit = Exit {
                    status: 128 + signal,
                    at: now(),
                };
                let unstarted =
                    self.with_proc(id, "", |c| c.init.state.stop_unstarted(exit.clone()))?;
                if unstarted {
                    self.changed.notify_all();
                } else if self.begin_exit(id, "") {
                    // As a process's exit comes after the Kill that caused it, the exit is
                    // reported after Kill has answered: containerd deletes the task and
                    // shuts the shim's connection down once it sees the exit, which must
                    // not overtake the answer to its Kill.
                    let (this, id_owned, exit_owned) = (self.clone(), id.to_string(), exit.clone());
                    let spawned = std::thread::Builder::new()
                        .name("sandbox-exit".into())
                        .spawn(move || this.report_exit(&id_owned, "", exit_owned));
                    if let Err(e) = spawned {
                        log::warn!("no thread to report {id}'s exit ({e}): reporting it now");
                        self.report_exit(id, "", exit);
                    }
                }
                Ok(())
            }
        }
    }

    /// Deletes a created or stopped process (the container, for its init).
    pub fn delete(
        &self,
        pod: &Arc<dyn PodHost>,
        id: &str,
        exec_id: &str,
    ) -> Result<Exit, ShimError> {
        let kind = self.with_proc(id, exec_id, |c| {
            let p = c.proc(exec_id).expect("checked by with_proc");
            p.state.check_deletable().map(|()| c.kind)
        })?;
        let kind = kind.map_err(|r| refused(id, exec_id, r))?;
        if kind == ContainerKind::Workload && !pod.is_down() {
            let agent = pod.agent();
            let removed = if exec_id.is_empty() {
                agent.remove_container(id)
            } else {
                agent.remove_process(id, exec_id)
            };
            if let Err(e) = removed {
                log::warn!("{e} (Delete {id} {exec_id})");
            }
        }
        let removed = {
            let mut cs = self.lock();
            if exec_id.is_empty() {
                cs.remove(id).map(|c| c.init)
            } else {
                cs.get_mut(id).and_then(|c| c.execs.remove(exec_id))
            }
        };
        self.changed.notify_all();
        let mut p = removed.ok_or_else(|| ShimError::not_found(id, exec_id))?;
        p.io.release();
        if exec_id.is_empty() && kind == ContainerKind::Workload {
            if let Err(e) = pod.unmount(id) {
                log::warn!("Delete {id}: its host mounts: {e}");
            }
            if !pod.is_down() {
                if let Err(e) = pod.forget_container(id) {
                    log::warn!("Delete {id}: {e}");
                }
            }
        }
        let exit = p.state.exit().cloned().unwrap_or_else(|| Exit {
            status: 0,
            at: now(),
        });
        if exec_id.is_empty() {
            emit(
                self.events.as_ref(),
                TaskDelete {
                    container_id: id.to_string(),
                    id: id.to_string(),
                    pid: std::process::id(),
                    exit_status: exit.status,
                    exited_at: MessageField::some(exit.at.clone()),
                    ..Default::default()
                },
            );
        }
        Ok(exit)
    }

    /// Records an exec process (it runs at Start).
    pub fn add_exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        spec: Vec<u8>,
    ) -> Result<(), ShimError> {
        self.with_proc(id, "", |c| {
            if c.kind == ContainerKind::Sandbox {
                return Err(ShimError::SandboxContainer(id.to_string()));
            }
            if !c.init.state.is_live() {
                return Err(refused(id, "", process::Refused("is not running")));
            }
            if c.execs.contains_key(exec_id) {
                return Err(ShimError::ExecExists {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                });
            }
            c.execs
                .insert(exec_id.to_string(), Process::new(stdio, spec));
            Ok(())
        })??;
        emit(
            self.events.as_ref(),
            TaskExecAdded {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// The container's guest PIDs (none for a sandbox container).
    pub fn pids(&self, pod: &Arc<dyn PodHost>, id: &str) -> Result<Vec<u32>, ShimError> {
        match self.kind(id)? {
            ContainerKind::Sandbox => Ok(Vec::new()),
            ContainerKind::Workload => Ok(pod.agent().list_processes(id)?),
        }
    }

    pub fn resize_pty(
        &self,
        pod: &Arc<dyn PodHost>,
        id: &str,
        exec_id: &str,
        cols: u32,
        rows: u32,
    ) -> Result<(), ShimError> {
        let terminal = self.with_proc(id, exec_id, |c| {
            c.proc(exec_id).expect("checked").stdio.terminal
        })?;
        if !terminal {
            return Err(refused(id, exec_id, process::Refused("has no terminal")));
        }
        Ok(pod.agent().resize_tty(id, exec_id, cols, rows)?)
    }

    /// The client closed its end of stdin: the copy reaches EOF and half-closes the
    /// stream by itself. If it does not (another writer keeps the FIFO open), the agent
    /// closes stdin after what was forwarded so far.
    pub fn close_stdin(
        &self,
        pod: &Arc<dyn PodHost>,
        id: &str,
        exec_id: &str,
    ) -> Result<(), ShimError> {
        let stdin = self.with_proc(id, exec_id, |c| {
            c.proc(exec_id).expect("checked").io.stdin.clone()
        })?;
        let Some(stdin) = stdin else {
            return Ok(());
        };
        if stdin.wait_done(CLOSE_IO_GRACE) {
            return Ok(());
        }
        Ok(pod.agent().close_stdin(id, exec_id, stdin.bytes())?)
    }

    pub fn pause(&self, pod: &Arc<dyn PodHost>, id: &str) -> Result<(), ShimError> {
        self.freeze(pod, id, Freeze::Pause)?;
        let event = TaskPaused {
            container_id: id.to_string(),
            ..Default::default()
        };
        emit(self.events.as_ref(), event);
        Ok(())
    }

    pub fn resume(&self, pod: &Arc<dyn PodHost>, id: &str) -> Result<(), ShimError> {
        self.freeze(pod, id, Freeze::Resume)?;
        let event = TaskResumed {
            container_id: id.to_string(),
            ..Default::default()
        };
        emit(self.events.as_ref(), event);
        Ok(())
    }

    /// Pause or Resume of a container's processes (the cgroup freezer in the guest).
    fn freeze(&self, pod: &Arc<dyn PodHost>, id: &str, op: Freeze) -> Result<(), ShimError> {
        let transition = match op {
            Freeze::Pause => ProcState::pause,
            Freeze::Resume => ProcState::resume,
        };
        let (kind, mut state) = self.with_proc(id, "", |c| (c.kind, c.init.state.clone()))?;
        transition(&mut state).map_err(|r| refused(id, "", r))?;
        if kind == ContainerKind::Workload {
            let agent = pod.agent();
            match op {
                Freeze::Pause => agent.pause_container(id)?,
                Freeze::Resume => agent.resume_container(id)?,
            }
        }
        // It may have exited meanwhile: then it stays as the exit left it.
        let _ = self.with_proc(id, "", |c| transition(&mut c.init.state));
        Ok(())
    }

    /// `resources`: OCI LinuxResources JSON (a sandbox container has nothing to update).
    /// The container's limits change in the guest first, then the pod's VM follows its
    /// new memory limit (see `pod::resize`): lowered, the guest gives the memory back
    /// before this returns.
    pub fn update(
        &self,
        pod: &Arc<dyn PodHost>,
        id: &str,
        resources: Vec<u8>,
    ) -> Result<(), ShimError> {
        match self.kind(id)? {
            ContainerKind::Sandbox => Ok(()),
            ContainerKind::Workload => {
                let parsed: LinuxResources = serde_json::from_slice(&resources).map_err(|e| {
                    ShimError::InvalidRequest(format!(
                        "update of {id}: the OCI LinuxResources: {e}"
                    ))
                })?;
                pod.agent().update_resources(id, resources)?;
                Ok(pod.set_limits(id, ContainerLimits::of(Some(&parsed)))?)
            }
        }
    }

    /// The container's cgroup statistics (empty for a sandbox container).
    pub fn stats(&self, pod: &Arc<dyn PodHost>, id: &str) -> Result<StatsResponse, ShimError> {
        match self.kind(id)? {
            ContainerKind::Sandbox => Ok(StatsResponse::new()),
            ContainerKind::Workload => Ok(pod.agent().stats(id)?),
        }
    }

    /// The VM stopped: every live process exits with [`VM_DIED_STATUS`]; processes that
    /// never started stop without a report.
    pub fn vm_exited(&self, reason: &str) {
        let live: Vec<(String, String)> = {
            let mut cs = self.lock();
            let mut live = Vec::new();
            for (id, c) in cs.iter_mut() {
                for (exec_id, p) in c.procs_mut() {
                    let exit = Exit {
                        status: VM_DIED_STATUS,
                        at: now(),
                    };
                    if p.state.is_live() {
                        live.push((id.clone(), exec_id.to_string()));
                    } else {
                        p.state.stop_unstarted(exit);
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
            let exit = Exit {
                status: VM_DIED_STATUS,
                at: now(),
            };
            self.finish(&id, &exec_id, exit);
        }
        self.changed.notify_all();
    }

    /// Long-polls the agent's OOM reports and publishes those of this pod's workload
    /// containers (rate-limited, [`OomFilter`]) until the VM is down.
    pub fn watch_ooms(self: &Arc<Self>, pod: Arc<dyn PodHost>) -> Result<(), ShimError> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || {
                let agent = pod.agent();
                let mut filter = OomFilter::default();
                loop {
                    match agent.get_oom_event() {
                        Ok(id) => this.oom(&mut filter, id),
                        Err(e) => {
                            if pod.is_down() {
                                return;
                            }
                            log::debug!("{e}");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            })
            .map(drop)
            .map_err(|source| ShimError::Thread {
                what: "OOM watcher",
                source,
            })
    }

    fn oom(&self, filter: &mut OomFilter, id: String) {
        let owned = self
            .lock()
            .get(&id)
            .is_some_and(|c| c.kind == ContainerKind::Workload);
        match filter.admit(&id, owned, std::time::Instant::now()) {
            Verdict::Publish => {
                log::info!("OOM in container {id}");
                emit(
                    self.events.as_ref(),
                    TaskOOM {
                        container_id: id,
                        ..Default::default()
                    },
                );
            }
            Verdict::Drop { log: true, dropped } => log::warn!(
                "dropped {dropped} guest OOM report(s), the last for {:?}: not a container of \
                 this pod, or too frequent",
                id.chars().take(80).collect::<String>()
            ),
            Verdict::Drop { .. } => {}
        }
    }
}
