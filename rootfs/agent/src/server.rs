//! The ttrpc `Agent` service: decodes requests, calls the sandbox, encodes replies and
//! errors (ttrpc status codes, see `error`).
//!
//! The agent uses ttrpc's sync server, not the async one: no tokio in the binary (the async
//! server brings tokio, futures and tokio-vsock: a larger static binary for the guest
//! initramfs, whose size is boot time on nested hosts), and threads only where work blocks:
//! per connection a reader, a writer and a small pool of handler threads that grows only
//! while handlers block (WaitProcess, GetOOMEvent) and shrinks back after.

use std::sync::Arc;
use std::time::Duration;

use podvisor_agent_protocol::agent::*;
use podvisor_agent_protocol::agent_ttrpc::Agent;
use podvisor_agent_protocol::PROTOCOL_VERSION;
use ttrpc::TtrpcContext;

use crate::cpus::Cpus;
use crate::error::{RpcError, RpcResult};
use crate::sandbox::Sandbox;

/// The service registered with the ttrpc server.
pub struct AgentService {
    sandbox: Arc<Sandbox>,
    /// The guest's CPUs (none for an agent that must not change them).
    cpus: Option<Cpus>,
}

impl AgentService {
    pub fn new(sandbox: Arc<Sandbox>, cpus: Option<Cpus>) -> Self {
        Self { sandbox, cpus }
    }
}

/// `reply` for requests whose answer is Empty.
fn done(method: &str, result: RpcResult<()>) -> Reply<Empty> {
    reply(method, result.map(|()| Empty::new()))
}

type Reply<T> = ttrpc::Result<T>;

/// Runs one container operation and, at debug level, logs what it cost the guest
/// (`crate::cost`; reading the guest's counters is itself costly where the guest kernel is
/// slow, and so is every console byte: nothing of this on the default path).
fn metered<T>(method: &str, id: &str, f: impl FnOnce() -> RpcResult<T>) -> RpcResult<T> {
    if !log::log_enabled!(log::Level::Debug) {
        return f();
    }
    let meter = crate::cost::Meter::start();
    let result = f();
    if result.is_ok() {
        log::debug!("{method} {id}: {}", meter.finish());
    }
    result
}

/// Logs a failed request and turns the result into ttrpc's.
fn reply<T>(method: &str, result: RpcResult<T>) -> Reply<T> {
    result.map_err(|err| {
        log::warn!("{method}: {err}");
        err.into()
    })
}

impl Agent for AgentService {
    fn get_version(
        &self,
        _ctx: &TtrpcContext,
        _req: GetVersionRequest,
    ) -> ttrpc::Result<GetVersionResponse> {
        let mut resp = GetVersionResponse::new();
        resp.protocol_version = PROTOCOL_VERSION;
        resp.agent_version = env!("CARGO_PKG_VERSION").to_string();
        Ok(resp)
    }

    fn health(&self, _ctx: &TtrpcContext, _req: HealthRequest) -> ttrpc::Result<HealthResponse> {
        let mut resp = HealthResponse::new();
        resp.status = health_response::Status::SERVING.into();
        Ok(resp)
    }

    fn create_sandbox(&self, _: &TtrpcContext, req: CreateSandboxRequest) -> Reply<Empty> {
        done("CreateSandbox", self.sandbox.create(&req))
    }

    fn configure_network(&self, _: &TtrpcContext, req: ConfigureNetworkRequest) -> Reply<Empty> {
        done("ConfigureNetwork", self.sandbox.configure_network(&req))
    }

    fn destroy_sandbox(&self, _: &TtrpcContext, _req: DestroySandboxRequest) -> Reply<Empty> {
        done("DestroySandbox", self.sandbox.destroy())
    }

    fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> Reply<CreateContainerResponse> {
        let pid = metered("CreateContainer", &req.container_id, || {
            self.sandbox.create_container(&req)
        });
        reply(
            "CreateContainer",
            pid.map(|pid| CreateContainerResponse {
                pid,
                ..Default::default()
            }),
        )
    }

    fn start_container(&self, _: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        done(
            "StartContainer",
            metered("StartContainer", &req.container_id, || {
                self.sandbox.start_container(&req.container_id)
            }),
        )
    }

    fn remove_container(&self, _: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        done(
            "RemoveContainer",
            self.sandbox.remove_container(&req.container_id),
        )
    }

    fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> Reply<ExecProcessResponse> {
        let pid = metered("ExecProcess", &req.exec_id, || self.sandbox.exec(&req));
        reply(
            "ExecProcess",
            pid.map(|pid| ExecProcessResponse {
                pid,
                ..Default::default()
            }),
        )
    }

    fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> Reply<Empty> {
        let result = self
            .sandbox
            .signal(&req.container_id, &req.exec_id, req.signal, req.all);
        done("SignalProcess", result)
    }

    fn wait_process(&self, _: &TtrpcContext, req: ProcessRequest) -> Reply<WaitProcessResponse> {
        let exit = self.sandbox.wait(&req.container_id, &req.exec_id);
        reply(
            "WaitProcess",
            exit.map(|exit| WaitProcessResponse {
                exit_status: exit.status,
                exited_at_ns: exit.at_ns,
                ..Default::default()
            }),
        )
    }

    fn remove_process(&self, _: &TtrpcContext, req: ProcessRequest) -> Reply<Empty> {
        done(
            "RemoveProcess",
            self.sandbox.remove_exec(&req.container_id, &req.exec_id),
        )
    }

    fn close_stdin(&self, _: &TtrpcContext, req: CloseStdinRequest) -> Reply<Empty> {
        let result = self
            .sandbox
            .close_stdin(&req.container_id, &req.exec_id, req.stdin_bytes);
        done("CloseStdin", result)
    }

    fn resize_tty(&self, _: &TtrpcContext, req: ResizeTtyRequest) -> Reply<Empty> {
        let result = self
            .sandbox
            .resize(&req.container_id, &req.exec_id, req.rows, req.columns);
        done("ResizeTty", result)
    }

    fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> Reply<ListProcessesResponse> {
        let pids = self.sandbox.pids(&req.container_id);
        reply(
            "ListProcesses",
            pids.map(|pids| ListProcessesResponse {
                pids,
                ..Default::default()
            }),
        )
    }

    fn stats(&self, _: &TtrpcContext, req: ContainerRequest) -> Reply<StatsResponse> {
        reply("Stats", self.sandbox.stats(&req.container_id))
    }

    fn update_resources(&self, _: &TtrpcContext, req: UpdateResourcesRequest) -> Reply<Empty> {
        done(
            "UpdateResources",
            self.sandbox
                .update(&req.container_id, &req.oci_resources_json),
        )
    }

    fn set_online_cpus(
        &self,
        _: &TtrpcContext,
        req: SetOnlineCpusRequest,
    ) -> Reply<SetOnlineCpusResponse> {
        let result = match &self.cpus {
            Some(cpus) => cpus
                .set_online(req.count)
                .map(|online| SetOnlineCpusResponse {
                    online,
                    ..Default::default()
                }),
            None => Err(RpcError::FailedPrecondition(
                "this agent changes no CPUs (a host test agent without --cpu-dir)".into(),
            )),
        };
        reply("SetOnlineCpus", result)
    }

    fn pause_container(&self, _: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        done(
            "PauseContainer",
            self.sandbox.set_paused(&req.container_id, true),
        )
    }

    fn resume_container(&self, _: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        done(
            "ResumeContainer",
            self.sandbox.set_paused(&req.container_id, false),
        )
    }

    fn get_oom_event(&self, ctx: &TtrpcContext, _req: GetOOMEventRequest) -> Reply<OOMEvent> {
        // Honour the client's deadline so a long poll ends with DEADLINE_EXCEEDED.
        let timeout = u64::try_from(ctx.timeout_nano)
            .ok()
            .filter(|&nanos| nanos > 0)
            .map(Duration::from_nanos);
        let id = self.sandbox.next_oom(timeout);
        reply(
            "GetOOMEvent",
            id.map(|container_id| OOMEvent {
                container_id,
                ..Default::default()
            }),
        )
    }
}
