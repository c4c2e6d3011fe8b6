//! The shim's errors and the one place they become containerd's errdefs codes.
//!
//! Every failure of a Task method is a [`ShimError`]; [`ShimError::code`] decides the ttrpc
//! status code containerd turns into an errdefs error (`NotFound`, `AlreadyExists`,
//! `FailedPrecondition`, …), and the message says what failed and, where there is one, the
//! fix. An agent error keeps the agent's own status code (the agent follows errdefs too).

use containerd_shim::protos::ttrpc::{self, Code};

use super::agent::AgentError;
use super::config::ConfigError;
use super::pod::{PodError, ResizeError};
use super::share::ShareError;
use super::spec::SpecError;

/// Why a Task method failed.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// An id that cannot name a directory or a socket.
    #[error("invalid {kind} id {id:?}: use letters, digits, '-', '_' and '.', at most 128")]
    InvalidId { kind: &'static str, id: String },
    /// A request that cannot be carried out as given (stdio URI, spec, resources).
    #[error("{0}")]
    InvalidRequest(String),
    /// The bundle's OCI spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The shim's settings (config file, environment, runtime options, annotations).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("container {0} already exists")]
    ContainerExists(String),
    #[error("exec {exec_id} already exists in container {id}")]
    ExecExists { id: String, exec_id: String },
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("process {exec_id} of container {id} not found")]
    ProcessNotFound { id: String, exec_id: String },
    /// The process is not in a state the request can act on.
    #[error("{} {problem}", process_name(id, exec_id))]
    State {
        id: String,
        exec_id: String,
        problem: &'static str,
    },
    /// Killing a process that has already exited.
    #[error("{} already finished", process_name(id, exec_id))]
    Finished { id: String, exec_id: String },
    /// A request a CRI sandbox container (the pod itself, no process) cannot serve.
    #[error("container {0} is the pod's sandbox container: it runs no process to exec into")]
    SandboxContainer(String),
    #[error(
        "this shim serves pod {serving}, not {requested}: containers of one pod need the \
         same io.kubernetes.cri.sandbox-id or io.podvisor.sandbox-id"
    )]
    WrongPod { serving: String, requested: String },
    #[error("the pod VM is not running")]
    NoPod,
    #[error("the VM of pod {0} has stopped")]
    VmStopped(String),
    /// The pod VM could not follow its containers' new memory limits.
    #[error("pod VM resize: {0}")]
    Resize(#[from] ResizeError),
    /// The pod VM could not be brought up.
    #[error("pod VM: {0}")]
    Pod(#[from] PodError),
    /// Mounting a container's rootfs or volumes into the pod's share.
    #[error("host mounts: {0}")]
    Mount(#[from] ShareError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Wiring a process's stdio on the host (FIFOs, log files, logger programs).
    #[error("stdio: {0}")]
    Stdio(String),
    /// A thread the shim needs (an exit waiter, a copy) could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
    /// Converting agent data for containerd.
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unsupported(&'static str),
}

/// "container c" for an init process, "process e of container c" for an exec.
fn process_name(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {id}")
    } else {
        format!("process {exec_id} of container {id}")
    }
}

impl ShimError {
    /// The ttrpc status code containerd maps to its errdefs error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidId { .. } | Self::InvalidRequest(_) | Self::Spec(_) | Self::Config(_) => {
                Code::INVALID_ARGUMENT
            }
            Self::ContainerExists(_) | Self::ExecExists { .. } => Code::ALREADY_EXISTS,
            Self::ContainerNotFound(_) | Self::ProcessNotFound { .. } | Self::Finished { .. } => {
                Code::NOT_FOUND
            }
            Self::State { .. }
            | Self::SandboxContainer(_)
            | Self::WrongPod { .. }
            | Self::NoPod
            | Self::VmStopped(_)
            | Self::Pod(_) => Code::FAILED_PRECONDITION,
            Self::Resize(ResizeError::Timeout { .. }) => Code::DEADLINE_EXCEEDED,
            Self::Resize(ResizeError::NoDriver { .. }) => Code::FAILED_PRECONDITION,
            Self::Resize(ResizeError::Cpus { source, .. }) => source.code(),
            Self::Agent(e) => e.code(),
            Self::Mount(_) | Self::Stdio(_) | Self::Thread { .. } | Self::Internal(_) => {
                Code::INTERNAL
            }
            Self::Unsupported(_) => Code::UNIMPLEMENTED,
        }
    }

    /// Not found: `ContainerNotFound` for the init process, else `ProcessNotFound`.
    pub fn not_found(id: &str, exec_id: &str) -> Self {
        if exec_id.is_empty() {
            Self::ContainerNotFound(id.to_string())
        } else {
            Self::ProcessNotFound {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            }
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_errdefs() {
        let cases = [
            (ShimError::not_found("c", ""), Code::NOT_FOUND),
            (ShimError::not_found("c", "e"), Code::NOT_FOUND),
            (ShimError::ContainerExists("c".into()), Code::ALREADY_EXISTS),
            (ShimError::NoPod, Code::FAILED_PRECONDITION),
            (ShimError::Unsupported("x"), Code::UNIMPLEMENTED),
            (
                ShimError::Agent(AgentError::status(
                    "StartContainer",
                    Code::NOT_FOUND,
                    "gone",
                )),
                Code::NOT_FOUND,
            ),
            (
                ShimError::Agent(AgentError::transport("StartContainer", "reset")),
                Code::INTERNAL,
            ),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let ttrpc::Error::RpcStatus(s) = ttrpc::Error::from(e) else {
                panic!("not a status");
            };
            assert_eq!(s.code(), code, "{msg}");
            assert_eq!(s.message(), msg);
        }
    }
}
