//! [`Agent`] over ttrpc on the pod VM's hybrid vsock (the agent's RPC port), and the
//! per-stream connections on its stream port.

use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podvisor_agent_protocol::agent::{
    CloseStdinRequest, ContainerRequest, CreateContainerRequest, DestroySandboxRequest,
    ExecProcessRequest, GetOOMEventRequest, GetVersionRequest, ProcessRequest, ResizeTtyRequest,
    SetOnlineCpusRequest, SignalProcessRequest, Stdio, UpdateResourcesRequest,
};
use podvisor_agent_protocol::agent_ttrpc::AgentClient;
use podvisor_agent_protocol::stream::StreamHeader;
use podvisor_agent_protocol::vsock::{connect_hybrid_vsock, connect_hybrid_vsock_once};
use podvisor_agent_protocol::{ttrpc, RPC_VSOCK_PORT, STREAM_VSOCK_PORT};

use super::{
    Agent, AgentError, ConfigureNetworkRequest, CreateSandboxRequest, GetVersionResponse,
    GuestExit, NewContainer, StatsResponse, StdioFlags, StreamKind,
};

/// How long one GetVersion may take while the agent comes up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting a stream may take.
const STREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(300);

/// Where stream connections go.
enum StreamEndpoint {
    /// The VM's hybrid vsock socket (the agent's stream port).
    HybridVsock(PathBuf),
    /// The stream socket of an agent on the host (`podvisor-agent --listen unix://…`).
    Unix(PathBuf),
}

/// The agent of one pod VM (or of an agent run on the host).
pub struct TtrpcAgent {
    client: AgentClient,
    /// The bound of every call but the long polls (the pod's `agent_timeout`).
    timeout: Duration,
    streams: StreamEndpoint,
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX))
}

fn container(id: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = id.to_string();
    r
}

fn process(id: &str, exec_id: &str) -> ProcessRequest {
    let mut r = ProcessRequest::new();
    r.container_id = id.to_string();
    r.exec_id = exec_id.to_string();
    r
}

fn stdio(flags: StdioFlags) -> Stdio {
    let mut s = Stdio::new();
    s.stdin = flags.stdin;
    s.stdout = flags.stdout;
    s.stderr = flags.stderr;
    s.terminal = flags.terminal;
    s
}

/// A ttrpc result as an [`AgentError`] of `rpc`.
fn check<T>(rpc: &'static str, r: ttrpc::Result<T>) -> Result<T, AgentError> {
    r.map_err(|e| match e {
        ttrpc::Error::RpcStatus(s) => AgentError::status(rpc, s.code(), s.message()),
        other => AgentError::transport(rpc, other),
    })
}

impl TtrpcAgent {
    /// Connects to the agent and asks its version, retrying until it answers: fails early
    /// once `vm_stopped` says so, and after `timeout`, which also bounds every later call.
    /// A connection can be reset once right after a template restore (the guest handles
    /// the vsock transport-reset event late), hence the retry of the whole exchange.
    pub fn connect(
        vsock: &Path,
        timeout: Duration,
        vm_stopped: impl Fn() -> bool,
    ) -> Result<(TtrpcAgent, GetVersionResponse), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if vm_stopped() {
                return Err("the pod VM stopped before its agent answered".into());
            }
            let err = match connect_hybrid_vsock_once(vsock, RPC_VSOCK_PORT, Duration::from_secs(5))
            {
                Ok(stream) => match ttrpc::Client::new(stream.into_raw_fd()) {
                    Ok(c) => {
                        let client = AgentClient::new(c);
                        match client.get_version(ctx(PROBE_TIMEOUT), &GetVersionRequest::new()) {
                            Ok(v) => {
                                let agent = TtrpcAgent {
                                    client,
                                    timeout,
                                    streams: StreamEndpoint::HybridVsock(vsock.to_path_buf()),
                                };
                                return Ok((agent, v));
                            }
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

    /// An agent running on the host behind Unix sockets (`rpc` for ttrpc, `streams` for
    /// stdio), as the KVM-free tests run it; `timeout` bounds every call but the long polls.
    pub fn over_unix(
        rpc: &Path,
        streams: &Path,
        timeout: Duration,
    ) -> Result<(TtrpcAgent, GetVersionResponse), String> {
        let client = ttrpc::Client::connect(&format!("unix://{}", rpc.display()))
            .map_err(|e| format!("connect to the agent at {}: {e}", rpc.display()))?;
        let agent = TtrpcAgent {
            client: AgentClient::new(client),
            timeout,
            streams: StreamEndpoint::Unix(streams.to_path_buf()),
        };
        let version = agent.get_version().map_err(|e| e.to_string())?;
        Ok((agent, version))
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ctx(self.timeout)
    }
}

impl Agent for TtrpcAgent {
    fn get_version(&self) -> Result<GetVersionResponse, AgentError> {
        check(
            "GetVersion",
            self.client
                .get_version(self.ctx(), &GetVersionRequest::new()),
        )
    }

    fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<(), AgentError> {
        check(
            "CreateSandbox",
            self.client.create_sandbox(self.ctx(), &req),
        )
        .map(drop)
    }

    fn configure_network(&self, req: &ConfigureNetworkRequest) -> Result<(), AgentError> {
        check(
            "ConfigureNetwork",
            self.client.configure_network(self.ctx(), req),
        )
        .map(drop)
    }

    fn destroy_sandbox(&self) -> Result<(), AgentError> {
        check(
            "DestroySandbox",
            self.client
                .destroy_sandbox(self.ctx(), &DestroySandboxRequest::new()),
        )
        .map(drop)
    }

    fn create_container(&self, c: NewContainer) -> Result<u32, AgentError> {
        let mut req = CreateContainerRequest::new();
        req.container_id = c.id;
        req.oci_spec_json = c.spec_json;
        req.rootfs = c.rootfs;
        req.stdio = Some(stdio(c.stdio)).into();
        check(
            "CreateContainer",
            self.client.create_container(self.ctx(), &req),
        )
        .map(|r| r.pid)
    }

    fn start_container(&self, id: &str) -> Result<(), AgentError> {
        check(
            "StartContainer",
            self.client.start_container(self.ctx(), &container(id)),
        )
        .map(drop)
    }

    fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        check(
            "RemoveContainer",
            self.client.remove_container(self.ctx(), &container(id)),
        )
        .map(drop)
    }

    fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        check(
            "PauseContainer",
            self.client.pause_container(self.ctx(), &container(id)),
        )
        .map(drop)
    }

    fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        check(
            "ResumeContainer",
            self.client.resume_container(self.ctx(), &container(id)),
        )
        .map(drop)
    }

    fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        check(
            "ListProcesses",
            self.client.list_processes(self.ctx(), &container(id)),
        )
        .map(|r| r.pids)
    }

    fn stats(&self, id: &str) -> Result<StatsResponse, AgentError> {
        check("Stats", self.client.stats(self.ctx(), &container(id)))
    }

    fn update_resources(&self, id: &str, resources: Vec<u8>) -> Result<(), AgentError> {
        let mut req = UpdateResourcesRequest::new();
        req.container_id = id.to_string();
        req.oci_resources_json = resources;
        check(
            "UpdateResources",
            self.client.update_resources(self.ctx(), &req),
        )
        .map(drop)
    }

    fn set_online_cpus(&self, count: u32) -> Result<u32, AgentError> {
        let mut req = SetOnlineCpusRequest::new();
        req.count = count;
        check(
            "SetOnlineCpus",
            self.client.set_online_cpus(self.ctx(), &req),
        )
        .map(|r| r.online)
    }

    fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        flags: StdioFlags,
    ) -> Result<u32, AgentError> {
        let mut req = ExecProcessRequest::new();
        req.container_id = id.to_string();
        req.exec_id = exec_id.to_string();
        req.oci_process_json = process_json;
        req.stdio = Some(stdio(flags)).into();
        check("ExecProcess", self.client.exec_process(self.ctx(), &req)).map(|r| r.pid)
    }

    fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let mut req = SignalProcessRequest::new();
        req.container_id = id.to_string();
        req.exec_id = exec_id.to_string();
        req.signal = signal;
        req.all = all;
        check(
            "SignalProcess",
            self.client.signal_process(self.ctx(), &req),
        )
        .map(drop)
    }

    fn wait_process(&self, id: &str, exec_id: &str) -> Result<GuestExit, AgentError> {
        check(
            "WaitProcess",
            self.client
                .wait_process(ttrpc::context::Context::default(), &process(id, exec_id)),
        )
        .map(|r| GuestExit {
            // The agent's i32 carries a wait status's u32 (e.g. 128 + signal) bit for bit.
            status: r.exit_status.cast_unsigned(),
            at_ns: r.exited_at_ns,
        })
    }

    fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        check(
            "RemoveProcess",
            self.client
                .remove_process(self.ctx(), &process(id, exec_id)),
        )
        .map(drop)
    }

    fn close_stdin(&self, id: &str, exec_id: &str, bytes: u64) -> Result<(), AgentError> {
        let mut req = CloseStdinRequest::new();
        req.container_id = id.to_string();
        req.exec_id = exec_id.to_string();
        req.stdin_bytes = bytes;
        check("CloseStdin", self.client.close_stdin(self.ctx(), &req)).map(drop)
    }

    fn resize_tty(&self, id: &str, exec_id: &str, cols: u32, rows: u32) -> Result<(), AgentError> {
        let mut req = ResizeTtyRequest::new();
        req.container_id = id.to_string();
        req.exec_id = exec_id.to_string();
        req.columns = cols;
        req.rows = rows;
        check("ResizeTty", self.client.resize_tty(self.ctx(), &req)).map(drop)
    }

    fn get_oom_event(&self) -> Result<String, AgentError> {
        check(
            "GetOOMEvent",
            self.client.get_oom_event(
                ttrpc::context::Context::default(),
                &GetOOMEventRequest::new(),
            ),
        )
        .map(|e| e.container_id)
    }

    fn attach_stream(
        &self,
        kind: StreamKind,
        id: &str,
        exec_id: &str,
    ) -> Result<UnixStream, AgentError> {
        let rpc = "stream attach";
        let mut conn = match &self.streams {
            StreamEndpoint::HybridVsock(vsock) => {
                connect_hybrid_vsock(vsock, STREAM_VSOCK_PORT, STREAM_CONNECT_TIMEOUT)
            }
            StreamEndpoint::Unix(path) => UnixStream::connect(path),
        }
        .map_err(|e| AgentError::transport(rpc, format!("stream connection: {e}")))?;
        StreamHeader::new(kind, id, exec_id)
            .attach(&mut conn)
            .map_err(|e| AgentError::transport(rpc, format!("{kind:?} stream of {id}: {e}")))?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_keep_the_agents_code_and_transport_errors_are_internal() {
        let e = check::<()>(
            "StartContainer",
            Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::NOT_FOUND,
                "no such container",
            ))),
        )
        .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND);
        assert_eq!(e.to_string(), "agent StartContainer: no such container");
        let e = check::<()>("Stats", Err(ttrpc::Error::LocalClosed)).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INTERNAL);
    }

    #[test]
    fn calls_are_bounded_by_the_pods_agent_timeout() {
        assert_eq!(
            ctx(Duration::from_secs(1234)).timeout_nano,
            1_234_000_000_000
        );
    }
}
