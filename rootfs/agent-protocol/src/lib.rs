//! The podvisor guest agent protocol, shared by the shim (client) and the agent (server).
//!
//! * [`agent`]: the protobuf messages of `proto/agent.proto` (package `podvisor.agent.v1`).
//! * [`agent_ttrpc`]: the generated ttrpc `AgentClient` and the `Agent` server trait with
//!   `create_agent` to register an implementation.
//! * [`stream`]: the stdio stream header (one connection per stdin/stdout/stderr/pty),
//!   described in the header comment of `proto/agent.proto`.
//! * [`vsock`]: the host side of the hybrid vsock (`CONNECT <port>` on the VM's Unix
//!   socket), to reach the agent's ports in the guest.
//!
//! * [`rtnl`] (feature `rtnl`): a small synchronous rtnetlink client, used by the shim to
//!   wire the pod's network namespace to the VM and by the agent for ConfigureNetwork.
//!
//! This crate is the only thing the shim and the agent share.

#[allow(
    clippy::all,
    clippy::pedantic,
    unused_imports,
    unused_qualifications,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    trivial_casts,
    unused_results,
    unused_mut
)]
/// Protobuf messages of `podvisor.agent.v1` (generated).
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    unused_imports,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_results
)]
/// ttrpc client and server glue of the `Agent` service (generated).
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

#[cfg(feature = "rtnl")]
pub mod rtnl;
pub mod stream;
pub mod vsock;

/// Version of the protocol in `proto/agent.proto`, returned by `GetVersion`.
pub const PROTOCOL_VERSION: u32 = 3;

/// The `path` of a spec's `pid` namespace entry that joins the pod's PID namespace (CRI's
/// pod-level PID namespace, `shareProcessNamespace`): the shim writes it for a container
/// that joins the sandbox's PID namespace, and the agent makes that namespace once per pod.
pub const POD_PID_NAMESPACE: &str = "/run/podvisor/pod-pid-namespace";

/// vsock port of the agent's ttrpc server in the guest.
pub const RPC_VSOCK_PORT: u32 = 1024;

/// vsock port of the agent's stdio stream listener in the guest (RPC port + 1).
pub const STREAM_VSOCK_PORT: u32 = RPC_VSOCK_PORT + 1;

/// Suffix added to the RPC Unix socket path to name the stream socket (host-test mode).
pub const STREAM_SOCKET_SUFFIX: &str = ".stream";

/// vsock port of the agent's port-forward listener (RPC port + 2): a connection starts with
/// the guest TCP port to reach on 127.0.0.1 (2 bytes, big-endian), then carries that
/// connection's bytes both ways.
pub const PORT_FORWARD_VSOCK_PORT: u32 = RPC_VSOCK_PORT + 2;

/// Suffix added to the RPC Unix socket path to name the port-forward socket (host-test
/// mode).
pub const PORT_FORWARD_SOCKET_SUFFIX: &str = ".forward";

pub use protobuf;
pub use ttrpc;
