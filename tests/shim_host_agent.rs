//! KVM-free tier of the shim: the real task service (`task::Service`, from containerd's
//! requests to errdefs codes) and the container layer under it (`containers::Containers`:
//! the process state machine, stdio wiring, exit waiters, task events) drive the real guest
//! agent, run on the host behind Unix sockets (`podvisor_test_kit::host_agent`), through
//! the real ttrpc `Agent` implementation. Only the pod differs: the agent on the host takes
//! the VM's place (`PodFactory`). containerd's side is played by the test: bundles, FIFOs
//! for stdio and a recorder for the events. What a pod's Create, Start, Exec, Kill, Delete
//! and Shutdown do in the agent is checked in about a second.
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

use containerd_shim::api;
use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::protos::types::task::Status;
use containerd_shim::ExitSignal;
use podvisor_shim::agent::{Agent, TtrpcAgent};
use podvisor_shim::config::ShimConfig;
use podvisor_shim::containers::{ContainerKind, ContainerSpec, Containers, EventSink};
use podvisor_shim::error::ShimError;
use podvisor_shim::pod::{
    ContainerMounts, OnVmExit, PodError, PodFactory, PodHost, PodRequest, PodRuntime,
};
use podvisor_shim::share::ShareError;
use podvisor_shim::stdio::StdioPaths;
use podvisor_shim::task::Service;
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
    id: String,
    agent: Arc<TtrpcAgent>,
    rootfs: PathBuf,
    mounts: Mutex<Vec<String>>,
    down: std::sync::atomic::AtomicBool,
}

impl PodRuntime for HostPod {
    fn id(&self) -> &str {
        &self.id
    }
    fn run_dir(&self) -> Option<PathBuf> {
        None
    }
    fn destroy(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        self.agent.destroy_sandbox().unwrap();
    }
}

/// Pods for the task service: the one host agent of the test.
struct HostPods {
    agent: Arc<TtrpcAgent>,
    rootfs: PathBuf,
    created: Mutex<Vec<Arc<HostPod>>>,
}

impl PodFactory for HostPods {
    fn create(
        &self,
        req: &PodRequest,
        _config: &ShimConfig,
        _on_exit: OnVmExit,
    ) -> Result<Arc<dyn PodRuntime>, PodError> {
        let pod = Arc::new(HostPod {
            id: req.id.to_string(),
            agent: self.agent.clone(),
            rootfs: self.rootfs.clone(),
            mounts: Mutex::default(),
            down: Default::default(),
        });
        self.created.lock().unwrap().push(pod.clone());
        Ok(pod)
    }
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
        self.down.load(std::sync::atomic::Ordering::SeqCst)
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
        id: "pod".into(),
        agent: Arc::new(client),
        rootfs: agent.rootfs.clone(),
        mounts: Mutex::default(),
        down: Default::default(),
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
            limits: Default::default(),
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

fn code<T: std::fmt::Debug>(r: Result<T, ShimError>) -> Code {
    r.expect_err("should fail").code()
}

/// A bundle for container `id` running `args`, with `annotations`.
fn bundle(dir: &Path, id: &str, args: &[&str], annotations: &[(&str, &str)]) -> String {
    let bundle = dir.join(id);
    std::fs::create_dir_all(&bundle).unwrap();
    let mut spec = spec(args, false);
    // A bundle from containerd: the container has a network namespace of its own (the
    // shim refuses the host's), which the shim maps to the VM's.
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "network"}));
    spec["annotations"] = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect::<serde_json::Map<_, _>>()
        .into();
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    bundle.display().to_string()
}

#[test]
fn the_task_service_runs_a_pod_through_containerds_requests() {
    let Some(k) = kit() else { return };
    let pods = Arc::new(HostPods {
        agent: k.pod.agent.clone(),
        rootfs: k.pod.rootfs.clone(),
        created: Mutex::default(),
    });
    let exit = Arc::new(ExitSignal::default());
    let svc = Service::with("test", k.events.clone(), pods.clone(), exit.clone());
    let dir = k.fifos.path();

    // Bad requests: errdefs codes, nothing brought up.
    let create = |id: &str, bundle: String, stdout: String| api::CreateTaskRequest {
        id: id.into(),
        bundle,
        stdout,
        ..Default::default()
    };
    assert_eq!(
        code(svc.create_task(&create(
            "../x",
            bundle(dir, "x", &["true"], &[]),
            String::new()
        ))),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(svc.create_task(&create(
            "nob",
            dir.join("none").display().to_string(),
            String::new()
        ))),
        Code::INVALID_ARGUMENT,
        "no config.json"
    );
    assert_eq!(
        code(svc.create_task(&create(
            "c1",
            bundle(dir, "c1", &["sleep", "1000"], &[]),
            "ftp://x".into()
        ))),
        Code::INVALID_ARGUMENT,
        "a log URI podvisor cannot serve"
    );
    assert!(pods.created.lock().unwrap().is_empty());
    // containerd cleans up after a failed Create: an unknown container is NOT_FOUND, with
    // or without a pod.
    let unknown = || api::DeleteRequest {
        id: "c0".into(),
        ..Default::default()
    };
    assert_eq!(code(svc.delete_task(&unknown())), Code::NOT_FOUND);
    assert_eq!(
        code(svc.kill_task(&api::KillRequest {
            id: "c0".into(),
            signal: 9,
            ..Default::default()
        })),
        Code::NOT_FOUND
    );

    // The pod's first container brings the pod up.
    let c1 = bundle(dir, "c1", &["sleep", "1000"], &[]);
    let created = svc
        .create_task(&create("c1", c1.clone(), String::new()))
        .unwrap();
    assert_eq!(created.pid, std::process::id());
    assert_eq!(
        code(svc.create_task(&create("c1", c1.clone(), String::new()))),
        Code::ALREADY_EXISTS
    );
    // A container of another pod cannot join this shim.
    let other = bundle(dir, "o", &["true"], &[("io.podvisor.sandbox-id", "other")]);
    assert_eq!(
        code(svc.create_task(&create("o", other, String::new()))),
        Code::FAILED_PRECONDITION
    );
    let state = svc
        .task_state(&api::StateRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(state.bundle, c1);
    assert_eq!(state.status, Status::CREATED.into());
    svc.start_task(&api::StartRequest {
        id: "c1".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(code(svc.delete_task(&unknown())), Code::NOT_FOUND);

    // An exec with its output on a FIFO.
    let stdout = k.fifo("e1-out");
    let out = read_fifo(stdout.clone());
    let exec = |exec_id: &str, spec: Vec<u8>, stdout: String| api::ExecProcessRequest {
        id: "c1".into(),
        exec_id: exec_id.into(),
        stdout,
        spec: Some(
            containerd_shim::protos::protobuf::well_known_types::any::Any {
                value: spec,
                ..Default::default()
            },
        )
        .into(),
        ..Default::default()
    };
    assert_eq!(
        code(svc.exec_process(&exec("bad", b"[1]".to_vec(), String::new()))),
        Code::INVALID_ARGUMENT
    );
    svc.exec_process(&exec(
        "e1",
        process_json(&["echo", "from-exec"], false),
        stdout,
    ))
    .unwrap();
    let e1 = |exec_id: &str| (String::from("c1"), exec_id.to_string());
    let (id, exec_id) = e1("e1");
    svc.start_task(&api::StartRequest {
        id: id.clone(),
        exec_id: exec_id.clone(),
        ..Default::default()
    })
    .unwrap();
    let waited = svc
        .wait_task(&api::WaitRequest {
            id: id.clone(),
            exec_id: exec_id.clone(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(waited.exit_status, 0);
    assert_eq!(out.join().unwrap(), "from-exec\n");
    svc.delete_task(&api::DeleteRequest {
        id: id.clone(),
        exec_id,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        svc.task_pids(&api::PidsRequest {
            id: id.clone(),
            ..Default::default()
        })
        .unwrap()
        .processes
        .len(),
        1
    );

    // Kill, a Delete that must wait for the exit, Delete, then Shutdown.
    svc.kill_task(&api::KillRequest {
        id: id.clone(),
        signal: 9,
        all: true,
        ..Default::default()
    })
    .unwrap();
    let waited = svc
        .wait_task(&api::WaitRequest {
            id: id.clone(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(waited.exit_status, 137);
    let deleted = svc
        .delete_task(&api::DeleteRequest {
            id: id.clone(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(deleted.exit_status, 137);
    assert_eq!(
        code(svc.task_state(&api::StateRequest {
            id,
            ..Default::default()
        })),
        Code::NOT_FOUND
    );
    svc.shutdown_pod();
    exit.wait();
    let pod = pods.created.lock().unwrap()[0].clone();
    assert!(pod.is_down(), "Shutdown tore the pod down");
    assert_eq!(*pod.mounts.lock().unwrap(), ["mount c1", "unmount c1"]);
    assert_eq!(
        k.events.topics(),
        [
            "create",
            "start",
            "exec-added",
            "exec-started",
            "exit",
            "exit",
            "delete"
        ]
    );
}
