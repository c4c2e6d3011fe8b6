//! The container state machine against a fake agent and a fake pod: the orders containerd
//! calls in, the failures of each step, exits at awkward moments, and what is published.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::Code;

use super::*;
use crate::agent::fake::FakeAgent;
use crate::agent::Agent;
use crate::share::ShareError;

#[derive(Default)]
struct Recorder {
    /// (topic, exit status for /tasks/exit)
    events: Mutex<Vec<(String, Option<u32>)>>,
}

impl EventSink for Recorder {
    fn publish(&self, topic: String, event: Box<dyn MessageDyn>) {
        let status = event.downcast_ref::<TaskExit>().map(|e| e.exit_status);
        self.events.lock().unwrap().push((topic, status));
    }
}

impl Recorder {
    fn topics(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.trim_start_matches("/tasks/").to_string())
            .collect()
    }
    fn exits(&self) -> Vec<u32> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, s)| *s)
            .collect()
    }
}

#[derive(Default)]
struct FakePod {
    agent: Arc<FakeAgent>,
    mounts: Mutex<Vec<String>>,
    fail_mount: AtomicBool,
    down: AtomicBool,
    /// What the pod's size was told: "id=limit" or "-id".
    sizes: Mutex<Vec<String>>,
}

impl PodHost for FakePod {
    fn agent(&self) -> Arc<dyn Agent> {
        self.agent.clone()
    }
    fn mount(&self, id: &str, _m: &ContainerMounts) -> Result<(), ShareError> {
        if self.fail_mount.load(Ordering::SeqCst) {
            return Err(ShareError::BadName(id.to_string()));
        }
        self.mounts.lock().unwrap().push(format!("mount {id}"));
        Ok(())
    }
    fn unmount(&self, id: &str) -> Result<(), ShareError> {
        self.mounts.lock().unwrap().push(format!("unmount {id}"));
        Ok(())
    }
    fn guest_rootfs(&self, id: &str) -> String {
        format!("/shared/{id}/rootfs")
    }
    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }
    fn set_limits(&self, id: &str, limits: ContainerLimits) -> Result<(), crate::pod::ResizeError> {
        let memory = limits.memory_bytes;
        self.sizes.lock().unwrap().push(format!("{id}={memory:?}"));
        Ok(())
    }
    fn forget_container(&self, id: &str) -> Result<(), crate::pod::ResizeError> {
        self.sizes.lock().unwrap().push(format!("-{id}"));
        Ok(())
    }
}

struct Kit {
    fake: Arc<FakePod>,
    pod: Arc<dyn PodHost>,
    events: Arc<Recorder>,
    cs: Arc<Containers>,
}

fn kit() -> Kit {
    let fake = Arc::new(FakePod::default());
    let events = Arc::new(Recorder::default());
    Kit {
        pod: fake.clone(),
        fake,
        cs: Containers::new("ns", events.clone()),
        events,
    }
}

fn spec(id: &str, kind: ContainerKind) -> ContainerSpec {
    ContainerSpec {
        id: id.into(),
        bundle: format!("/bundles/{id}"),
        kind,
        stdio: StdioPaths::default(),
        mounts: ContainerMounts::default(),
        spec_json: b"{}".to_vec(),
        limits: ContainerLimits::default(),
    }
}

/// Waits (bounded) for process (`id`, `exec`) to stop.
fn wait_stopped(cs: &Containers, id: &str, exec: &str) -> Exit {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = cs.state(id, exec).unwrap();
        if let Some(e) = v.exit {
            return e;
        }
        assert!(Instant::now() < deadline, "{id} {exec} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn code(r: Result<impl std::fmt::Debug, ShimError>) -> Code {
    r.expect_err("should fail").code()
}

#[test]
fn create_start_exit_delete_of_a_workload() {
    let k = kit();
    k.cs.create(&k.pod, spec("c1", ContainerKind::Workload))
        .unwrap();
    assert_eq!(k.cs.state("c1", "").unwrap().status, Status::CREATED);
    assert_eq!(
        code(k.cs.create(&k.pod, spec("c1", ContainerKind::Workload))),
        Code::ALREADY_EXISTS
    );
    k.cs.start(&k.pod, "c1", "").unwrap();
    assert_eq!(k.cs.state("c1", "").unwrap().status, Status::RUNNING);
    assert_eq!(
        code(k.cs.start(&k.pod, "c1", "")),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code(k.cs.delete(&k.pod, "c1", "")),
        Code::FAILED_PRECONDITION
    );
    k.fake.agent.exit("c1", "", 3);
    assert_eq!(k.cs.wait("c1", "").unwrap().status, 3);
    assert_eq!(
        code(k.cs.kill(&k.pod, "c1", "", 15, false)),
        Code::NOT_FOUND
    );
    assert_eq!(k.cs.delete(&k.pod, "c1", "").unwrap().status, 3);
    assert_eq!(
        code(k.cs.delete(&k.pod, "c1", "")),
        Code::NOT_FOUND,
        "double delete"
    );
    assert_eq!(code(k.cs.state("c1", "")), Code::NOT_FOUND);
    assert!(k.cs.is_empty());
    assert_eq!(
        k.fake.agent.calls(),
        [
            "CreateContainer c1",
            "StartContainer c1",
            "WaitProcess c1",
            "RemoveContainer c1"
        ]
    );
    assert_eq!(*k.fake.mounts.lock().unwrap(), ["mount c1", "unmount c1"]);
    assert_eq!(k.events.topics(), ["start", "exit", "delete"]);
    assert_eq!(k.events.exits(), [3]);
}

#[test]
fn an_exit_is_reported_though_a_leftover_keeps_the_output_open() {
    // The agent reported the exec's exit, but its stdout stream stays open (a background
    // child of the exec holds the pipe in the guest): the exit is still published, after
    // a bounded drain, and Wait returns.
    let k = kit();
    k.cs.create(&k.pod, spec("c1", ContainerKind::Workload))
        .unwrap();
    k.cs.start(&k.pod, "c1", "").unwrap();
    let dir = std::env::temp_dir().join(format!("pv-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stdio = StdioPaths {
        stdout: format!("file://{}", dir.join("out.log").display()),
        ..StdioPaths::default()
    };
    k.cs.add_exec("c1", "e1", stdio, b"{}".to_vec()).unwrap();
    k.cs.start(&k.pod, "c1", "e1").unwrap();
    let started = Instant::now();
    k.fake.agent.exit("c1", "e1", 0);
    let exit = wait_stopped(&k.cs, "c1", "e1");
    assert_eq!(exit.status, 0);
    assert!(
        started.elapsed() >= OUTPUT_DRAIN,
        "reported before the output had its drain time"
    );
    assert!(k.events.topics().contains(&"exit".to_string()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn exec_start_kill_delete() {
    let k = kit();
    k.cs.create(&k.pod, spec("c1", ContainerKind::Workload))
        .unwrap();
    assert_eq!(
        code(k.cs.add_exec("c1", "e1", StdioPaths::default(), b"{}".to_vec())),
        Code::FAILED_PRECONDITION,
        "no exec before the container runs"
    );
    k.cs.start(&k.pod, "c1", "").unwrap();
    k.cs.add_exec("c1", "e1", StdioPaths::default(), b"{}".to_vec())
        .unwrap();
    assert_eq!(
        code(k.cs.add_exec("c1", "e1", StdioPaths::default(), b"{}".to_vec())),
        Code::ALREADY_EXISTS
    );
    assert_eq!(k.cs.state("c1", "e1").unwrap().status, Status::CREATED);
    k.cs.start(&k.pod, "c1", "e1").unwrap();
    k.cs.kill(&k.pod, "c1", "e1", 9, false).unwrap();
    assert_eq!(k.cs.wait("c1", "e1").unwrap().status, 137);
    k.cs.delete(&k.pod, "c1", "e1").unwrap();
    assert_eq!(code(k.cs.state("c1", "e1")), Code::NOT_FOUND);
    assert_eq!(
        k.cs.state("c1", "").unwrap().status,
        Status::RUNNING,
        "the init runs on"
    );
    // The waiter's WaitProcess races with the other calls: compare as sets.
    let mut calls: Vec<String> = k
        .fake
        .agent
        .calls()
        .into_iter()
        .filter(|c| c.ends_with(" e1"))
        .collect();
    calls.sort();
    assert_eq!(
        calls,
        [
            "ExecProcess c1 e1",
            "RemoveProcess c1 e1",
            "SignalProcess c1 e1",
            "WaitProcess c1 e1"
        ]
    );
    assert_eq!(
        k.events.topics(),
        ["start", "exec-added", "exec-started", "exit"]
    );
}

#[test]
fn an_exit_while_paused_is_reported_and_resume_refused() {
    let k = kit();
    k.cs.create(&k.pod, spec("c1", ContainerKind::Workload))
        .unwrap();
    assert_eq!(code(k.cs.pause(&k.pod, "c1")), Code::FAILED_PRECONDITION);
    k.cs.start(&k.pod, "c1", "").unwrap();
    k.cs.pause(&k.pod, "c1").unwrap();
    assert_eq!(k.cs.state("c1", "").unwrap().status, Status::PAUSED);
    assert_eq!(code(k.cs.pause(&k.pod, "c1")), Code::FAILED_PRECONDITION);
    k.fake.agent.exit("c1", "", 0);
    assert_eq!(wait_stopped(&k.cs, "c1", "").status, 0);
    assert_eq!(code(k.cs.resume(&k.pod, "c1")), Code::FAILED_PRECONDITION);
    k.cs.delete(&k.pod, "c1", "").unwrap();
    assert_eq!(k.events.topics(), ["start", "paused", "exit", "delete"]);
}

#[test]
fn a_failed_mount_leaves_nothing_and_calls_no_agent() {
    let k = kit();
    k.fake.fail_mount.store(true, Ordering::SeqCst);
    assert_eq!(
        code(k.cs.create(&k.pod, spec("c1", ContainerKind::Workload))),
        Code::INTERNAL
    );
    assert!(!k.cs.contains("c1"));
    assert!(k.fake.agent.calls().is_empty());
    assert_eq!(*k.fake.mounts.lock().unwrap(), ["unmount c1"]);
}

#[test]
fn a_failed_create_in_the_guest_undoes_the_mounts_and_keeps_the_agents_code() {
    let k = kit();
    k.fake.agent.fail("CreateContainer", Code::INVALID_ARGUMENT);
    let e =
        k.cs.create(&k.pod, spec("c1", ContainerKind::Workload))
            .unwrap_err();
    assert_eq!(e.code(), Code::INVALID_ARGUMENT);
    assert!(e.to_string().contains("agent CreateContainer"), "{e}");
    assert!(!k.cs.contains("c1"));
    assert_eq!(*k.fake.mounts.lock().unwrap(), ["mount c1", "unmount c1"]);
    assert!(k.events.topics().is_empty());
}

#[test]
fn a_failed_stream_attach_undoes_the_mounts() {
    let k = kit();
    k.fake.agent.fail("attach stdout", Code::UNAVAILABLE);
    let mut s = spec("c1", ContainerKind::Workload);
    s.stdio.stdout = "/fifo/out".into();
    assert_eq!(code(k.cs.create(&k.pod, s)), Code::UNAVAILABLE);
    assert!(!k.cs.contains("c1"));
    assert!(!k
        .fake
        .agent
        .calls()
        .iter()
        .any(|c| c.starts_with("CreateContainer")));
    assert_eq!(*k.fake.mounts.lock().unwrap(), ["mount c1", "unmount c1"]);
}

#[test]
fn a_failed_start_keeps_the_container_created_and_deletable() {
    let k = kit();
    k.cs.create(&k.pod, spec("c1", ContainerKind::Workload))
        .unwrap();
    k.fake.agent.fail("StartContainer", Code::INTERNAL);
    assert_eq!(code(k.cs.start(&k.pod, "c1", "")), Code::INTERNAL);
    assert_eq!(k.cs.state("c1", "").unwrap().status, Status::CREATED);
    k.cs.delete(&k.pod, "c1", "").unwrap();
    assert_eq!(k.events.topics(), ["delete"]);
}

#[test]
fn a_failed_signal_keeps_the_agents_code() {
    let k = kit();
    k.cs.create(&k.pod, spec("c1", ContainerKind::Workload))
        .unwrap();
    k.cs.start(&k.pod, "c1", "").unwrap();
    k.fake.agent.fail("SignalProcess", Code::NOT_FOUND);
    assert_eq!(code(k.cs.kill(&k.pod, "c1", "", 15, true)), Code::NOT_FOUND);
    assert_eq!(
        code(k.cs.kill(&k.pod, "c1", "nope", 15, false)),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(k.cs.kill(&k.pod, "nope", "", 15, false)),
        Code::NOT_FOUND
    );
}

#[test]
fn a_sandbox_container_runs_nothing_in_the_guest() {
    let k = kit();
    k.cs.create(&k.pod, spec("pod", ContainerKind::Sandbox))
        .unwrap();
    k.cs.start(&k.pod, "pod", "").unwrap();
    assert_eq!(
        code(k.cs.add_exec("pod", "e", StdioPaths::default(), b"{}".to_vec())),
        Code::FAILED_PRECONDITION
    );
    assert!(k.cs.pids(&k.pod, "pod").unwrap().is_empty());
    k.cs.update(&k.pod, "pod", b"{}".to_vec()).unwrap();
    k.cs.kill(&k.pod, "pod", "", 0, false).unwrap();
    assert_eq!(
        k.cs.state("pod", "").unwrap().status,
        Status::RUNNING,
        "signal 0 probes"
    );
    k.cs.kill(&k.pod, "pod", "", 9, false).unwrap();
    assert_eq!(k.cs.wait("pod", "").unwrap().status, 137);
    k.cs.delete(&k.pod, "pod", "").unwrap();
    assert!(k.fake.agent.calls().is_empty());
    assert!(k.fake.mounts.lock().unwrap().is_empty());
    assert_eq!(k.events.topics(), ["start", "exit", "delete"]);
}

#[test]
fn a_sandbox_container_killed_before_start_stops_without_an_exit_event() {
    let k = kit();
    k.cs.create(&k.pod, spec("pod", ContainerKind::Sandbox))
        .unwrap();
    k.cs.kill(&k.pod, "pod", "", 15, false).unwrap();
    assert_eq!(k.cs.wait("pod", "").unwrap().status, 143);
    assert!(k.events.topics().is_empty());
}

#[test]
fn when_the_vm_dies_each_live_process_exits_once_with_255() {
    let k = kit();
    for id in ["c1", "c2"] {
        k.cs.create(&k.pod, spec(id, ContainerKind::Workload))
            .unwrap();
    }
    k.cs.start(&k.pod, "c1", "").unwrap();
    k.cs.add_exec("c1", "e1", StdioPaths::default(), b"{}".to_vec())
        .unwrap();
    k.cs.start(&k.pod, "c1", "e1").unwrap();
    // Both paths report: the waiters see their WaitProcess fail, and the VM's exit hook.
    k.fake.down.store(true, Ordering::SeqCst);
    k.fake.agent.stop();
    k.cs.vm_exited("guest panic");
    for (id, exec) in [("c1", ""), ("c1", "e1"), ("c2", "")] {
        assert_eq!(wait_stopped(&k.cs, id, exec).status, VM_DIED_STATUS);
    }
    assert_eq!(
        k.events.exits(),
        [VM_DIED_STATUS, VM_DIED_STATUS],
        "one per started process"
    );
    // Deletes do not ask a dead agent.
    k.cs.delete(&k.pod, "c1", "e1").unwrap();
    k.cs.delete(&k.pod, "c1", "").unwrap();
    k.cs.delete(&k.pod, "c2", "").unwrap();
    assert!(!k.fake.agent.calls().iter().any(|c| c.starts_with("Remove")));
    assert!(k.cs.is_empty());
}

#[test]
fn ooms_of_this_pods_workloads_are_published() {
    let k = kit();
    k.cs.create(&k.pod, spec("c1", ContainerKind::Workload))
        .unwrap();
    k.cs.watch_ooms(k.pod.clone()).unwrap();
    k.fake.agent.oom("stranger");
    k.fake.agent.oom("c1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !k.events.topics().contains(&"oom".to_string()) {
        assert!(Instant::now() < deadline, "no TaskOOM");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(k.events.topics(), ["oom"]);
    k.fake.down.store(true, Ordering::SeqCst);
    k.fake.agent.stop();
}

#[test]
fn the_pod_size_follows_workload_limits_through_create_update_and_delete() {
    let k = kit();
    let mut s = spec("c1", ContainerKind::Workload);
    s.limits.memory_bytes = Some(256 << 20);
    k.cs.create(&k.pod, s).unwrap();
    k.cs.create(&k.pod, spec("sb", ContainerKind::Sandbox))
        .unwrap();
    k.cs.update(&k.pod, "c1", br#"{"memory":{"limit":134217728}}"#.to_vec())
        .unwrap();
    k.cs.update(&k.pod, "c1", br#"{"cpu":{"shares":512}}"#.to_vec())
        .unwrap();
    assert_eq!(
        code(k.cs.update(&k.pod, "c1", b"[1]".to_vec())),
        Code::INVALID_ARGUMENT
    );
    k.cs.update(&k.pod, "sb", br#"{"memory":{"limit":1}}"#.to_vec())
        .unwrap();
    k.cs.delete(&k.pod, "c1", "").unwrap();
    assert_eq!(
        *k.fake.sizes.lock().unwrap(),
        ["c1=Some(268435456)", "c1=Some(134217728)", "c1=None", "-c1"],
        "the sandbox container never sizes the pod; a bad update changes nothing"
    );
}
