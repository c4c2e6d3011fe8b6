//! The containerd shim (task API v2, `containerd-shim` 0.11): the `start`/`delete` command
//! contract ([`PodvisorShim`]) and the task service that runs the pod's containers in a VM
//! hosted by this process. Three layers, each over the next one's narrow interface:
//! - `task`: containerd's Task API translated into calls below, errors into errdefs codes
//!   (`error::ShimError::code`);
//! - `containers`: the pod's containers and processes, their state machine and task events,
//!   over the pod's agent and share (`pod::PodHost`);
//! - [`pod`]: the VM's life (config → VM, template or boot, the agent handshake, network,
//!   share mounts, teardown), with `agent::Agent`, one typed method per guest agent RPC.
//!
//! One shim process serves one pod: containers of the same pod ([`grouping::pod_id`]) get the
//! same ttrpc address from `start`, so the first container's `start` spawns the server and
//! the others find it running.
//!
//! Host state of a pod: `<run dir>/<pod id>/` (run dir `/run/podvisor`, or
//! `PODVISOR_RUN_DIR`) holds the VM's vsock socket, its console log and `shared/`, the root
//! of the pod's virtio-fs share, where each container's rootfs is mounted at
//! `shared/<container id>/rootfs` and the spec's host bind mounts at
//! `shared/<container id>/mounts/<n>`.

pub mod agent;
pub mod config;
pub mod containers;
pub mod error;
mod grouping;
mod liveness;
mod metrics;
mod mount;
mod net;
mod oom_events;
pub mod pod;
pub mod share;
mod sizing;
mod spec;
pub mod stdio;
pub mod task;
pub mod template;
pub mod timeline;

use std::path::Path;
use std::sync::Arc;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::{
    publisher::RemotePublisher, util::write_address, Config, DeleteResponse, ExitSignal, Flags,
    StartOpts,
};

pub use config::ShimConfig;
/// Running code in another network namespace (also `podvisor bench net`'s client).
pub use net::Netns;

/// Runs the shim binary (`start`, `delete`, or the long-running server, as containerd's
/// command line says).
pub fn run() {
    // No reaper: the shim waits for the only children it has (a binary:// logger) itself,
    // and without SIGCHLD in containerd-shim's signal set, `shim start` cannot hang in a
    // signal storm: it drops its signal-hook iterator on return, closing the iterator's
    // socket before unregistering the handlers; a SIGCHLD in between (from the duplicate
    // daemon a pod's second container spawns, which exits at once) makes the handler send
    // to the closed socket, which raises SIGPIPE, whose handler does the same, forever
    // (`start` spinning at 100% CPU while containerd waits on it). No subreaper
    // either: no container process runs on the host.
    let config = containerd_shim::Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<PodvisorShim>(RUNTIME_ID, Some(config));
}

/// containerd's runtime name for podvisor.
pub const RUNTIME_ID: &str = "io.containerd.podvisor.v2";

/// The shim binary: `start`, `delete`, and the long-running server.
pub struct PodvisorShim {
    id: String,
    namespace: String,
    /// containerd's socket (`-address`).
    address: String,
    /// The container's bundle (`-bundle`, else the working directory containerd set).
    bundle: std::path::PathBuf,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for PodvisorShim {
    type T = task::Service;

    fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        if let Some(level) = ShimConfig::startup_log_level() {
            config.default_log_level = level.to_string();
        }
        Self {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            bundle: if args.bundle.is_empty() {
                ".".into()
            } else {
                args.bundle.clone().into()
            },
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs `start` in the container's bundle.
        let annotations = grouping::bundle_annotations(&self.bundle);
        let grouping = grouping::pod_id(&opts.id, &annotations);
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // containerd runs `delete` in the container's bundle, after the shim exited or was
        // killed. A live shim (its pod has other containers) cleans up itself. A dead one
        // took the pod's VM with it, so no container of the pod runs any more: the first
        // delete removes this container's mounts and the whole pod's state, socket and
        // network; containerd's deletes of the pod's other containers find nothing left.
        // What cannot be removed goes to stderr, which containerd logs ("cleanup warnings").
        let config = ShimConfig::for_delete(&self.bundle);
        let spec = spec::load(&self.bundle).ok();
        let annotations = spec.as_ref().map(spec::annotations).unwrap_or_default();
        let pod_id = grouping::pod_id(&self.id, &annotations);
        let socket = containerd_shim::socket_address(&self.address, &self.namespace, &pod_id);
        let socket_path = socket.trim_start_matches("unix://");
        let alive = liveness::shim_serving(Path::new(socket_path));
        if !alive && grouping::valid_id(&pod_id) && grouping::valid_id(&self.id) {
            if let Err(e) = pod::cleanup_state_dir(&config.run_dir.join(&pod_id)) {
                eprintln!("podvisor: shim delete {}: {e}", self.id);
            }
            let _ = std::fs::remove_file(socket_path);
            if let Some(spec) = &spec {
                cleanup_pod_network(spec);
                if let Some(path) = spec::cgroups_path(spec) {
                    if let Err(e) = pod::PodCgroup::remove_leftover(&path) {
                        eprintln!("podvisor: shim delete {}: {e}", self.id);
                    }
                }
            }
        }
        let mut resp = DeleteResponse::new();
        resp.exit_status = 128 + libc::SIGKILL as u32;
        resp.exited_at = Some(now()).into();
        Ok(resp)
    }

    fn wait(&mut self) {
        self.exit.wait();
        spawn_exit_watchdog();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        task::Service::new(&self.namespace, publisher, self.exit.clone())
    }
}

/// How long the process may take to end once its pod is torn down.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Ends the process [`EXIT_GRACE`] after the exit signal if it has not ended by itself.
/// The pod is gone by then (Shutdown tears it down before it signals); what is left is
/// the `containerd-shim` crate stopping the ttrpc server, removing the socket and returning
/// from `main`. Should that hang, the watchdog logs the threads (what they were doing is the
/// lead to the hang), removes the socket the crate would have removed and exits, so that
/// no shim process is left behind.
fn spawn_exit_watchdog() {
    let spawned = std::thread::Builder::new()
        .name("exit-watchdog".into())
        .spawn(|| {
            std::thread::sleep(EXIT_GRACE);
            log::warn!(
                "still running {EXIT_GRACE:?} after the exit signal; exiting now. Threads:{}",
                thread_states(None)
            );
            // Where the crate keeps the socket's address: `address` in the bundle, the
            // working directory containerd started the shim in.
            if let Ok(address) = std::fs::read_to_string("address") {
                let _ = std::fs::remove_file(address.trim().trim_start_matches("unix://"));
            }
            // SAFETY: _exit ends the process at once, skipping atexit handlers and stdio
            // flushes (a hang may be in them); nothing of the pod is left to clean up.
            unsafe { libc::_exit(0) };
        });
    if let Err(e) = spawned {
        log::warn!("no exit watchdog: {e}");
    }
}

/// The threads of process `pid` (`None`: this process), one line each: name, state, CPU
/// ticks (user + system), current syscall, wait channel and the top of the kernel stack
/// (readable by root only). For logs of a process that does not end.
pub fn thread_states(pid: Option<u32>) -> String {
    let mut out = String::new();
    let dir = pid.map_or("/proc/self/task".to_string(), |p| format!("/proc/{p}/task"));
    let Ok(tasks) = std::fs::read_dir(dir) else {
        return out;
    };
    for t in tasks.flatten() {
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        let stat = read("stat");
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.split(' ').collect())
            .unwrap_or_default();
        // After the name: state is field 3 of stat, utime 14 and stime 15.
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out += &format!(
            "\n  {} {} cpu {} ticks, syscall {}, wchan {}, kernel stack {}",
            read("comm").trim(),
            fields.first().unwrap_or(&"?"),
            ticks(11) + ticks(12),
            read("syscall").trim(),
            read("wchan"),
            read("stack")
                .lines()
                .take(4)
                .collect::<Vec<_>>()
                .join(" < ")
        );
    }
    out
}

/// After the pod's shim died: removes the tc redirects and taps it left in the pod's network
/// namespace (the one the bundle's spec joins), so that the namespace works again.
fn cleanup_pod_network(spec: &oci_spec::runtime::Spec) {
    let Some(netns) = spec::netns_path(spec) else {
        return;
    };
    match net::cleanup_stale(&netns) {
        Ok(removed) if !removed.is_empty() => log::info!(
            "pod network {}: removed what the dead shim left: {}",
            netns.display(),
            removed.join(", ")
        ),
        Ok(_) => {}
        Err(e) => log::warn!("pod network {}: {e}", netns.display()),
    }
}

/// The current time as a protobuf timestamp.
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    timestamp_ns(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// A protobuf timestamp from Unix nanoseconds.
pub fn timestamp_ns(ns: i64) -> Timestamp {
    let mut ts = Timestamp::new();
    ts.seconds = ns.div_euclid(1_000_000_000);
    ts.nanos = i32::try_from(ns.rem_euclid(1_000_000_000)).expect("below 10^9");
    ts
}

/// The last `lines` lines of a text file (the guest console), for error messages.
pub fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod exit_tests {
    #[test]
    fn thread_states_list_this_thread() {
        let name = std::thread::current()
            .name()
            .unwrap_or_default()
            .to_string();
        let states = super::thread_states(None);
        // comm is cut to 15 bytes.
        let comm: String = name.chars().take(15).collect();
        let line = states
            .lines()
            .find(|l| l.trim_start().starts_with(&comm))
            .unwrap_or_else(|| panic!("no line for {comm} in {states}"));
        assert!(
            line.contains(" R cpu ") && line.contains(" ticks, syscall "),
            "{line}"
        );
    }
}
