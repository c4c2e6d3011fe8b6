//! The shim's view of the guest agent: one typed method per RPC ([`Agent`]), so that the
//! layers above never build protobuf requests or ttrpc contexts.
//!
//! [`TtrpcAgent`] is the real one (ttrpc over the pod VM's hybrid vsock, every call bounded
//! by the pod's `agent_timeout` except the long polls); tests use a fake that records calls
//! and fails on demand. Errors are [`AgentError`]: the RPC's name and either the agent's
//! status (its code follows containerd's errdefs, so it is passed on as is) or a transport
//! failure.

mod ttrpc_agent;

#[cfg(test)]
pub mod fake;

use std::os::unix::net::UnixStream;

use containerd_shim::protos::ttrpc::Code;
pub use podvisor_agent_protocol::agent::{
    ConfigureNetworkRequest, CreateSandboxRequest, GetVersionResponse, StatsResponse,
};
pub use podvisor_agent_protocol::stream::StreamKind;
pub use ttrpc_agent::TtrpcAgent;

/// Which of a process's streams the agent wires to stream connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioFlags {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    /// One `pty` stream carries both directions.
    pub terminal: bool,
}

/// A container to create in the guest.
#[derive(Debug, Clone)]
pub struct NewContainer {
    pub id: String,
    /// The OCI spec adapted for the guest (JSON).
    pub spec_json: Vec<u8>,
    /// The rootfs as the guest sees it.
    pub rootfs: String,
    pub stdio: StdioFlags,
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestExit {
    pub status: u32,
    /// Unix nanoseconds, the guest's clock.
    pub at_ns: i64,
}

/// Why an agent call failed.
#[derive(Debug, thiserror::Error)]
#[error("agent {rpc}: {kind}")]
pub struct AgentError {
    /// The RPC (or stream attach) that failed.
    pub rpc: &'static str,
    pub kind: AgentErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentErrorKind {
    /// The agent answered with an error status.
    #[error("{message}")]
    Status { code: Code, message: String },
    /// No answer: the connection, the VM or the call's time bound failed.
    #[error("{0}")]
    Transport(String),
}

impl AgentError {
    pub fn status(rpc: &'static str, code: Code, message: impl Into<String>) -> Self {
        Self {
            rpc,
            kind: AgentErrorKind::Status {
                code,
                message: message.into(),
            },
        }
    }

    pub fn transport(rpc: &'static str, message: impl ToString) -> Self {
        Self {
            rpc,
            kind: AgentErrorKind::Transport(message.to_string()),
        }
    }

    /// The agent's status code; a transport failure is INTERNAL.
    pub fn code(&self) -> Code {
        match &self.kind {
            AgentErrorKind::Status { code, .. } => *code,
            AgentErrorKind::Transport(_) => Code::INTERNAL,
        }
    }
}

/// One method per agent RPC; container and process ids as the shim knows them.
pub trait Agent: Send + Sync {
    fn get_version(&self) -> Result<GetVersionResponse, AgentError>;
    fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<(), AgentError>;
    fn configure_network(&self, req: &ConfigureNetworkRequest) -> Result<(), AgentError>;
    fn destroy_sandbox(&self) -> Result<(), AgentError>;

    /// Creates the container; its init process waits for StartContainer. Returns its PID.
    fn create_container(&self, c: NewContainer) -> Result<u32, AgentError>;
    fn start_container(&self, id: &str) -> Result<(), AgentError>;
    fn remove_container(&self, id: &str) -> Result<(), AgentError>;
    fn pause_container(&self, id: &str) -> Result<(), AgentError>;
    fn resume_container(&self, id: &str) -> Result<(), AgentError>;
    fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError>;
    fn stats(&self, id: &str) -> Result<StatsResponse, AgentError>;
    /// `resources`: OCI LinuxResources JSON.
    fn update_resources(&self, id: &str, resources: Vec<u8>) -> Result<(), AgentError>;
    /// Brings guest CPUs online or offline until `count` are online; returns how many are.
    fn set_online_cpus(&self, count: u32) -> Result<u32, AgentError>;

    /// Starts an exec process from its OCI process JSON. Returns its PID.
    fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: StdioFlags,
    ) -> Result<u32, AgentError>;
    fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError>;
    /// Blocks until the process exits (no time bound: processes run for as long as they do).
    fn wait_process(&self, id: &str, exec_id: &str) -> Result<GuestExit, AgentError>;
    fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError>;
    /// Closes the process's stdin once `bytes` bytes of it have arrived.
    fn close_stdin(&self, id: &str, exec_id: &str, bytes: u64) -> Result<(), AgentError>;
    fn resize_tty(&self, id: &str, exec_id: &str, cols: u32, rows: u32) -> Result<(), AgentError>;

    /// Blocks until the guest reports an OOM kill; returns the container id.
    fn get_oom_event(&self) -> Result<String, AgentError>;
    /// A stream connection attached to (container, exec, kind).
    fn attach_stream(
        &self,
        kind: StreamKind,
        id: &str,
        exec_id: &str,
    ) -> Result<UnixStream, AgentError>;
}
