//! `podvisor-agent`: PID 1 of a podvisor pod VM. It serves the `podvisor.agent.v1` ttrpc
//! protocol (crate `podvisor-agent-protocol`) to the shim and runs the pod's containers.
//!
//! Two modes, one server:
//! * guest (`--listen vsock://-1:1024`, the default as PID 1): PID-1 duties (`pid1`), RPCs
//!   on vsock port 1024, stdio streams on port 1025; DestroySandbox reboots the VM.
//! * host test (`--listen unix:///dir/agent.sock`): run on the host inside its own mount and
//!   PID namespaces (e.g. `unshare --mount --pid --fork --mount-proc`); streams on
//!   `agent.sock.stream`; `--private-cgroup2` mounts a private cgroup v2 on /sys/fs/cgroup
//!   when the host has v1/hybrid there; DestroySandbox makes the agent exit.
//!
//! Modules: `server` (RPC handlers) → `sandbox` (the pod) → `container` (libcontainer) →
//! `launcher` (the lean init process) / `process` / `stream` (stdio pumps) / `cgroup` /
//! `cgroup_pool` (container cgroups made ahead of time) / `oom`; `cost` (what an operation cost the guest, logged); `network` (ConfigureNetwork,
//! rtnetlink); `reaper` collects children;
//! `listener` binds vsock or Unix sockets; `error` maps failures to ttrpc codes.
//!
//! Threads: main (waits for DestroySandbox), reaper, OOM watcher, stream acceptor, ttrpc's
//! listener + per connection reader/writer/handlers, and one pump per attached stdio stream.

mod cgroup;
mod cgroup_pool;
mod container;
mod cost;
mod cpus;
mod error;
mod forward;
mod held_signal;
mod launcher;
mod listener;
mod logger;
mod network;
mod oom;
mod pid1;
mod pod_pid;
mod process;
mod reaper;
mod sandbox;
mod server;
mod stall;
mod stdin_control;
mod stream;
mod sysctl;

use std::os::fd::IntoRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use log::LevelFilter;

use crate::cgroup_pool::CgroupPool;
use crate::container::Layout;
use crate::listener::ListenAddr;
use crate::oom::OomWatcher;
use crate::reaper::Reaper;
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::stream::Streams;

/// Time given to ttrpc's writer thread to send the DestroySandbox reply before the agent
/// exits or resets the VM (the client learns of the end from the connection anyway).
const REPLY_GRACE: Duration = Duration::from_millis(200);

const USAGE: &str = "\
usage: podvisor-agent [options]
  --listen URL          RPC listener: vsock://CID:PORT (CID -1 = any) or unix:///path
                        (default vsock://-1:1024 when PID 1; required otherwise)
  --stream-listen URL   stdio stream listener (default: vsock port 1025, or the RPC
                        socket path + .stream)
  --state-dir DIR       bundles and container state (default /run/podvisor-agent)
  --cgroup-parent NAME  pod cgroup under /sys/fs/cgroup (default podvisor)
  --resolv-conf PATH    where CreateSandbox writes DNS (default /etc/resolv.conf)
  --private-cgroup2     host test: mount cgroup v2 on /sys/fs/cgroup in a private mount
                        namespace if the host has v1/hybrid there
  --cpu-dir DIR         the CPUs SetOnlineCpus changes (default /sys/devices/system/cpu
                        as PID 1 on vsock; none otherwise)
  --launcher KIND       lean (default: containers whose spec allows it get a one-clone
                        init process, the others libcontainer's) or libcontainer (all)
  --cgroup-spares N     container cgroups made ahead of time (default 2 as PID 1 on
                        vsock, 0 otherwise: containers get <cgroup-parent>/<id>)
  --log-level LEVEL     error|warn|info|debug|trace (default info)
  --version             print the agent and protocol versions
";

/// Command-line errors.
#[derive(Debug, thiserror::Error)]
enum ArgsError {
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("unknown option {0}")]
    Unknown(String),
    #[error("bad log level {0:?}")]
    LogLevel(String),
    #[error("--cgroup-spares {0:?}: give a count (0 for none)")]
    Number(String),
    #[error("--launcher {0:?}: use lean or libcontainer")]
    Launcher(String),
    #[error("--listen is required when not running as PID 1")]
    NoListen,
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
}

struct Args {
    listen: ListenAddr,
    stream_listen: ListenAddr,
    state_dir: PathBuf,
    cgroup_parent: String,
    resolv_conf: PathBuf,
    private_cgroup2: bool,
    cpu_dir: Option<PathBuf>,
    cgroup_spares: usize,
    lean: bool,
    log_level: LevelFilter,
}

fn parse_args() -> Result<Option<Args>, ArgsError> {
    let mut listen = None;
    let mut stream_listen = None;
    let mut state_dir = PathBuf::from("/run/podvisor-agent");
    let mut cgroup_parent = "podvisor".to_string();
    let mut resolv_conf = PathBuf::from("/etc/resolv.conf");
    let mut private_cgroup2 = false;
    let mut cpu_dir = None;
    let mut cgroup_spares = None;
    let mut lean = true;
    let mut log_level = LevelFilter::Info;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| ArgsError::MissingValue(arg.clone()))
        };
        match arg.as_str() {
            "--listen" => listen = Some(value()?.parse::<ListenAddr>()?),
            "--stream-listen" => stream_listen = Some(value()?.parse::<ListenAddr>()?),
            "--state-dir" => state_dir = value()?.into(),
            "--cgroup-parent" => cgroup_parent = value()?,
            "--resolv-conf" => resolv_conf = value()?.into(),
            "--cpu-dir" => cpu_dir = Some(value()?.into()),
            "--launcher" => {
                lean = match value()?.as_str() {
                    "lean" => true,
                    "libcontainer" => false,
                    other => return Err(ArgsError::Launcher(other.to_string())),
                }
            }
            "--cgroup-spares" => {
                let n = value()?;
                cgroup_spares = Some(n.parse().map_err(|_| ArgsError::Number(n))?);
            }
            "--log-level" => {
                let level = value()?;
                log_level = level.parse().map_err(|_| ArgsError::LogLevel(level))?;
            }
            "--private-cgroup2" => private_cgroup2 = true,
            "--version" => {
                println!(
                    "podvisor-agent {} (protocol {})",
                    env!("CARGO_PKG_VERSION"),
                    podvisor_agent_protocol::PROTOCOL_VERSION
                );
                return Ok(None);
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                return Ok(None);
            }
            // The kernel passes unknown command-line words to init as arguments.
            other if std::process::id() == 1 && !other.starts_with("--") => {}
            other => return Err(ArgsError::Unknown(other.to_string())),
        }
    }
    let listen = match listen {
        Some(listen) => listen,
        None if std::process::id() == 1 => ListenAddr::Vsock {
            cid: libc::VMADDR_CID_ANY,
            port: podvisor_agent_protocol::RPC_VSOCK_PORT,
        },
        None => return Err(ArgsError::NoListen),
    };
    let stream_listen = stream_listen.unwrap_or_else(|| listen.stream_addr());
    // The guest's defaults; a host test agent (PID 1 of its own PID namespace, on a Unix
    // socket) touches no CPUs and makes no cgroups ahead unless told.
    let guest = listen.is_vsock() && std::process::id() == 1;
    let cpu_dir = cpu_dir.or_else(|| guest.then(|| PathBuf::from("/sys/devices/system/cpu")));
    let cgroup_spares = cgroup_spares.unwrap_or(if guest { 2 } else { 0 });
    Ok(Some(Args {
        listen,
        stream_listen,
        state_dir,
        cgroup_parent,
        resolv_conf,
        private_cgroup2,
        cpu_dir,
        cgroup_spares,
        lean,
        log_level,
    }))
}

/// Startup failures.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
    #[error(transparent)]
    Reaper(#[from] reaper::ReaperError),
    #[error(transparent)]
    Oom(#[from] oom::OomError),
    #[error(transparent)]
    Pid1(#[from] pid1::Pid1Error),
    #[error("starting the stream listener: {0}")]
    Streams(#[source] std::io::Error),
    #[error("creating the state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ttrpc server: {0:?}")]
    Ttrpc(ttrpc::Error),
    #[error("cannot start the cgroup pool's thread: {0}")]
    Thread(#[source] std::io::Error),
}

fn run(args: &Args, guest: bool) -> Result<(), StartError> {
    // Before any thread exists: unsharing the mount namespace needs a single thread.
    if args.private_cgroup2 && !guest {
        pid1::private_cgroup2()?;
    }
    std::fs::create_dir_all(&args.state_dir).map_err(|source| StartError::StateDir {
        path: args.state_dir.clone(),
        source,
    })?;
    let reaper = Arc::new(Reaper::default());
    reaper.start()?;
    stall::start();
    let streams = Arc::new(Streams::default());
    let stream_fd = args.stream_listen.bind()?;
    streams
        .serve(stream_fd, args.stream_listen.clone())
        .map_err(StartError::Streams)?;
    let forward_addr = args.listen.forward_addr();
    forward::serve(forward_addr.bind()?, forward_addr).map_err(StartError::Streams)?;
    let oom = OomWatcher::start()?;
    let config = SandboxConfig {
        layout: Layout {
            state_dir: args.state_dir.clone(),
            cgroup_parent: args.cgroup_parent.clone(),
            lean: args.lean,
        },
        resolv_conf: args.resolv_conf.clone(),
        base_env: pid1::inherited_env(),
        owns_machine: guest,
    };
    // Before the agent answers: a template VM is saved once it does, with these in it.
    let cgroups = CgroupPool::guest(&args.cgroup_parent, args.cgroup_spares);
    cgroups.fill();
    cgroups.start_refills().map_err(StartError::Thread)?;
    let sandbox = Arc::new(Sandbox::new(config, reaper, streams, oom, cgroups));
    let service =
        server::AgentService::new(sandbox.clone(), cpus::for_dir(args.cpu_dir.as_deref()));

    let rpc_fd = args.listen.bind()?;
    let mut server = ttrpc::Server::new()
        .add_listener(rpc_fd.into_raw_fd())
        .map_err(StartError::Ttrpc)?
        .register_service(podvisor_agent_protocol::agent_ttrpc::create_agent(
            Arc::new(service),
        ))
        .set_thread_count_default(2)
        .set_thread_count_min(1)
        .set_thread_count_max(3);
    server.start().map_err(StartError::Ttrpc)?;
    log::info!(
        "serving {} (streams on {}), containers under {}",
        args.listen,
        args.stream_listen,
        sandbox.cgroup_parent_path().display()
    );
    if guest {
        pid1::mark_boot_timer();
    }

    sandbox.wait_destroyed();
    std::thread::sleep(REPLY_GRACE);
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return,
        Err(err) => {
            eprintln!("podvisor-agent: {err}\n{USAGE}");
            std::process::exit(2);
        }
    };
    logger::init(args.log_level);
    let guest = args.listen.is_vsock() && std::process::id() == 1;
    if guest {
        pid1::setup();
    }
    container::note_ignored_signals();
    let result = run(&args, guest);
    if let Err(err) = &result {
        log::error!("{err}");
    }
    if guest {
        // PID 1 must not exit (kernel panic): reset the VM, the VMM stops.
        pid1::reboot();
    }
    std::process::exit(if result.is_ok() { 0 } else { 1 });
}
