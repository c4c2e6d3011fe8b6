//! KVM-free tier of the shim: the shim's container layer (`containers::Containers`, the
//! process state machine, stdio wiring, exit waiters, task events) driving the real guest
//! agent, run on the host behind Unix sockets (`podvisor_test_kit::host_agent`), through
//! the real ttrpc `Agent` implementation. containerd's side is played by the test: FIFOs
//! for stdio and a recorder for the events. No VM: what a pod's Create, Start, Exec, Kill
//! and Delete do in the agent is checked in about a second.
//!
//! Needs root, busybox-static and cgroup2 (else SKIP, as the agent's own host tests), and
//! the agent binary of this build (`target/<profile>/podvisor-agent`, which `cargo test
//! --workspace` builds; PODVISOR_AGENT_BIN names another).

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::protos::types::task::Status;
use podvisor_shim::agent::{Agent, TtrpcAgent};
use podvisor_shim::containers::{ContainerKind, ContainerSpec, Containers, EventSink};
use podvisor_shim::pod::{ContainerMounts, PodHost};
use podvisor_shim::share::ShareError;
use podvisor_shim::stdio::StdioPaths;
use podvisor_test_kit::host_agent::{process_json, skip_reason, spec, HostAgent};

const TIMEOUT: Duration = Duration::from_secs(30);

fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("PODVISOR_AGENT_BIN") {
        return PathBuf::from(bin);
    }
    // target/<profile>/deps/<this test> → target/<profile>/podvisor-agent
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("podvisor-agent");
    assert!(
        bin.is_file(),
        "{} is missing: build it (`cargo build -p podvisor-agent`, or run the tests with \
         `cargo test --workspace`), or name one with PODVISOR_AGENT_BIN",
        bin.display()
    );
    bin
}

/// The pod as the container layer sees it, with the host agent in place of the VM's.
struct HostPod {
    agent: Arc<TtrpcAgent>,
    rootfs: PathBuf,
    mounts: Mutex<Vec<String>>,
}

impl PodHost for HostPod {
    fn agent(&self) -> Arc<dyn Agent> {
        self.agent.clone()
    }
    fn mount(&self, id: &str, _m: &ContainerMounts) -> Result<(), ShareError> {
        self.mounts.lock().unwrap().push(format!("mount {id}"));
        Ok(())
    }
    fn unmount(&self, id: &str) -> Result<(), ShareError> {
        self.mounts.lock().unwrap().push(format!("unmount {id}"));
        Ok(())
    }
    fn guest_rootfs(&self, _id: &str) -> String {
        self.rootfs.display().to_string()
    }
    fn is_down(&self) -> bool {
        false
    }
}

/// A published event: its topic and, for TaskExit, the process id and exit status.
type Recorded = (String, Option<(String, u32)>);

#[derive(Default)]
struct Recorder(Mutex<Vec<Recorded>>);

impl EventSink for Recorder {
    fn publish(&self, topic: String, event: Box<dyn MessageDyn>) {
        let exit = event
            .downcast_ref::<TaskExit>()
            .map(|e| (e.id.clone(), e.exit_status));
        self.0.lock().unwrap().push((topic, exit));
    }
}

impl Recorder {
    fn topics(&self) -> Vec<String> {
        let events = self.0.lock().unwrap();
        events
            .iter()
            .map(|(t, _)| t.trim_start_matches("/tasks/").to_string())
            .collect()
    }
    fn exits(&self) -> HashMap<String, u32> {
        let events = self.0.lock().unwrap();
        events.iter().filter_map(|(_, e)| e.clone()).collect()
    }
}

fn mkfifo(path: &Path) -> String {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    path.display().to_string()
}

/// containerd's reader of an output FIFO: everything until the shim closes it.
fn read_fifo(path: String) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = String::new();
        std::fs::File::open(path)
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        out
    })
}

struct Kit {
    _agent: HostAgent,
    pod: Arc<HostPod>,
    host: Arc<dyn PodHost>,
    events: Arc<Recorder>,
    cs: Arc<Containers>,
    fifos: tempfile::TempDir,
}

fn kit() -> Option<Kit> {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIP: {reason}");
        return None;
    }
    let agent = HostAgent::start(&agent_bin(), &[]);
    let (client, version) = podvisor_test_kit::wait_for("the agent to answer", TIMEOUT, || {
        TtrpcAgent::over_unix(&agent.rpc_socket(), &agent.stream_socket(), TIMEOUT).ok()
    });
    assert!(!version.agent_version.is_empty());
    let pod = Arc::new(HostPod {
        agent: Arc::new(client),
        rootfs: agent.rootfs.clone(),
        mounts: Mutex::default(),
    });
    let events = Arc::new(Recorder::default());
    Some(Kit {
        _agent: agent,
        host: pod.clone(),
        pod,
        cs: Containers::new("test", events.clone()),
        events,
        fifos: tempfile::tempdir().unwrap(),
    })
}

impl Kit {
    fn fifo(&self, name: &str) -> String {
        mkfifo(&self.fifos.path().join(name))
    }

    fn create(&self, id: &str, args: &[&str], stdio: StdioPaths) -> Result<(), Code> {
        let spec = ContainerSpec {
            id: id.into(),
            bundle: format!("/bundles/{id}"),
            kind: ContainerKind::Workload,
            stdio,
            mounts: ContainerMounts::default(),
            spec_json: serde_json::to_vec(&spec(args, false)).unwrap(),
        };
        self.cs.create(&self.host, spec).map_err(|e| e.code())
    }
}

#[test]
fn a_container_runs_its_output_reaches_the_fifo_and_its_exit_is_reported() {
    let Some(k) = kit() else { return };
    let stdout = k.fifo("c1-out");
    let out = read_fifo(stdout.clone());
    let stdio = StdioPaths {
        stdout,
        ..Default::default()
    };
    k.create("c1", &["sh", "-c", "echo hello; exit 3"], stdio)
        .unwrap();
    assert_eq!(k.cs.state("c1", "").unwrap().status, Status::CREATED);
    k.cs.start(&k.host, "c1", "").unwrap();
    assert_eq!(k.cs.wait("c1", "").unwrap().status, 3);
    assert_eq!(out.join().unwrap(), "hello\n");
    assert_eq!(k.cs.delete(&k.host, "c1", "").unwrap().status, 3);
    assert_eq!(k.cs.state("c1", "").unwrap_err().code(), Code::NOT_FOUND);
    assert_eq!(k.events.topics(), ["start", "exit", "delete"]);
    assert_eq!(*k.pod.mounts.lock().unwrap(), ["mount c1", "unmount c1"]);
}

#[test]
fn execs_with_and_without_stdin_then_kill_and_delete() {
    let Some(k) = kit() else { return };
    k.create("c", &["sleep", "1000"], StdioPaths::default())
        .unwrap();
    k.cs.start(&k.host, "c", "").unwrap();

    // `cat` with stdin and stdout FIFOs: what the client writes comes back, and closing
    // the FIFO ends its stdin.
    let stdin = k.fifo("cat-in");
    let stdout = k.fifo("cat-out");
    let out = read_fifo(stdout.clone());
    let stdio = StdioPaths {
        stdin: stdin.clone(),
        stdout,
        ..Default::default()
    };
    k.cs.add_exec("c", "cat", stdio, process_json(&["cat"], false))
        .unwrap();
    k.cs.start(&k.host, "c", "cat").unwrap();
    let mut input = std::fs::OpenOptions::new()
        .write(true)
        .open(&stdin)
        .unwrap();
    input.write_all(b"ping\n").unwrap();
    drop(input);
    assert_eq!(k.cs.wait("c", "cat").unwrap().status, 0);
    assert_eq!(out.join().unwrap(), "ping\n");
    k.cs.delete(&k.host, "c", "cat").unwrap();

    // No stdio at all.
    k.cs.add_exec(
        "c",
        "true",
        StdioPaths::default(),
        process_json(&["true"], false),
    )
    .unwrap();
    k.cs.start(&k.host, "c", "true").unwrap();
    assert_eq!(k.cs.wait("c", "true").unwrap().status, 0);
    k.cs.delete(&k.host, "c", "true").unwrap();

    // The agent's errors keep their codes: no such exec in the agent.
    assert_eq!(
        k.cs.kill(&k.host, "c", "nope", 9, false)
            .unwrap_err()
            .code(),
        Code::NOT_FOUND
    );
    assert_eq!(k.cs.pids(&k.host, "c").unwrap().len(), 1);

    k.cs.kill(&k.host, "c", "", 9, true).unwrap();
    assert_eq!(k.cs.wait("c", "").unwrap().status, 137);
    k.cs.delete(&k.host, "c", "").unwrap();
    assert!(k.cs.is_empty());
    let exits = k.events.exits();
    assert_eq!(exits.get("cat"), Some(&0));
    assert_eq!(exits.get("true"), Some(&0));
    assert_eq!(exits.get("c"), Some(&137));
    assert_eq!(
        k.events.topics(),
        [
            "start",
            "exec-added",
            "exec-started",
            "exit",
            "exec-added",
            "exec-started",
            "exit",
            "exit",
            "delete"
        ]
    );
}

#[test]
fn a_container_the_agent_refuses_leaves_nothing() {
    let Some(k) = kit() else { return };
    // No such program in the rootfs: the agent refuses at create, as runc does.
    let code = k
        .create("bad", &["/no/such/program"], StdioPaths::default())
        .unwrap_err();
    assert_eq!(code, Code::INTERNAL);
    assert!(!k.cs.contains("bad"));
    assert_eq!(*k.pod.mounts.lock().unwrap(), ["mount bad", "unmount bad"]);
    // Neither the shim nor the agent holds anything of it: the id can be used again.
    k.create("bad", &["true"], StdioPaths::default()).unwrap();
    k.cs.delete(&k.host, "bad", "").unwrap();
    assert!(k.events.topics().iter().all(|t| t == "delete"));
}
