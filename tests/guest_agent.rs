//! Guest tier of the agent: one boot of the real guest kernel whose PID 1 is the
//! agent (`out/agent-test.cpio`, nothing else in it), reached from the host through the
//! hybrid vsock with the generated ttrpc client, exactly as the shim will. The container's
//! rootfs is a busybox tree the test builds on the host inside a virtio-fs share.
//!
//! Checks: the agent answers on vsock port 1024 and marks the boot timer; CreateSandbox
//! mounts the share and sets the pod's sysctls (an unknown one is refused by name, the IPC
//! ones show in a container sharing the VM's IPC namespace); ConfigureNetwork works through the guest's rtnetlink (NOT_FOUND for a
//! NIC the VM lacks, loopback-only success); a container prints to a stdout stream (port 1025) and exits 42, which
//! WaitProcess reports after the output; a second container reads the agent's own
//! /proc/1/status (VmRSS, printed) under a seccomp profile that makes mkdir fail with
//! EPERM, and with CAP_NET_ADMIN makes a bridge; a third container under a 4 MiB memory limit (the guest's cgroup2 has the
//! memory controller, unlike many hosts of the fast tier): Stats while it waits on its
//! stdin stream (memory usage, the limit, pids), then dd fills a 32 MiB buffer until the
//! OOM killer ends it and GetOOMEvent names it; SIGTERM right after StartContainer ends a
//! `top` that is its PID namespace's init (held until its handler is in place); two
//! containers in the pod's shared PID namespace see each other and its holder, and a
//! container's leftover processes end with its init; a program
//! the kernel cannot execute fails StartContainer; RemoveContainer; DestroySandbox resets
//! the VM and `podvisor boot` exits 0.

mod common;

use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio as ProcStdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{guest_artifacts, temp_path};
use podvisor_agent_protocol::agent::*;
use podvisor_agent_protocol::agent_ttrpc::AgentClient;
use podvisor_agent_protocol::stream::{StreamHeader, StreamKind};
use podvisor_agent_protocol::vsock::connect_hybrid_vsock;
use podvisor_agent_protocol::{ttrpc, RPC_VSOCK_PORT, STREAM_VSOCK_PORT};
use serde_json::{json, Value};

const BUSYBOX: &str = "/bin/busybox";
/// The whole boot may take minutes on a nested-KVM host (the guest kernel is emulated).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// One RPC: container creation forks and execs in an emulated guest kernel.
const RPC_TIMEOUT: Duration = Duration::from_secs(300);
/// GetOOMEvent blocks until an event: bounded, so a missing event fails the test.
const OOM_TIMEOUT: Duration = Duration::from_secs(120);
/// The memory-limited container's `linux.resources.memory.limit`: small, because every
/// page the guest faults in costs milliseconds of emulated kernel code on nested-KVM hosts
/// (the container's peak before the hog starts is ~0.5 MiB).
const MEM_LIMIT: u64 = 4 << 20;
/// An OCI seccomp profile: mkdir/mkdirat fail with EPERM, the rest is allowed.
const SECCOMP_DENY_MKDIR: &str =
    include_str!("../rootfs/agent/tests/fixtures/seccomp-deny-mkdir.json");
const SHARE_TAG: &str = "rootfs";
/// CRI's grace period is 30 s by default; a stop that needs it was lost.
const STOP_GRACE: Duration = Duration::from_secs(30);
const SHARED_IN_GUEST: &str = "/run/podvisor/shared";

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(RPC_TIMEOUT.as_nanos()).unwrap())
}

/// A minimal OCI spec running `args` in the given namespaces, read-only rootfs.
fn spec(args: &[&str], namespaces: &[&str]) -> Value {
    let caps = json!(["CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_DAC_OVERRIDE"]);
    let namespaces: Vec<Value> = namespaces.iter().map(|t| json!({ "type": t })).collect();
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "pod",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {"namespaces": namespaces}
    })
}

/// Whether podvisor applies its nested-KVM quirks here (see README, *Nested hosts*).
fn pvm_host() -> bool {
    match std::env::var("PODVISOR_HOST_QUIRKS").as_deref() {
        Ok("pvm") => true,
        Ok(_) => false,
        Err(_) => Path::new("/sys/module/kvm_pvm").exists(),
    }
}

/// The VM (`podvisor boot`) with its stdout/stderr collected by threads.
struct Vm {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    console: std::path::PathBuf,
}

fn collect<R: Read + Send + 'static>(mut r: R) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = r.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

impl Vm {
    /// What went on, for assertion messages: console, podvisor's stderr so far.
    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits for podvisor to exit; returns (exit code, stdout, stderr).
    fn wait(&mut self, timeout: Duration) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let out = self
            .stdout
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        let err = self
            .stderr
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        (status.code(), out, err)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- guest console ----\n{}", self.console());
        }
    }
}

/// Connects to guest vsock `port`, retrying until the agent listens; fails if the VM exits.
fn connect(vm: &mut Vm, uds: &Path, port: u32, timeout: Duration) -> UnixStream {
    let deadline = Instant::now() + timeout;
    loop {
        match connect_hybrid_vsock(uds, port, Duration::from_secs(5)) {
            Ok(stream) => return stream,
            Err(err) => {
                if let Some(status) = vm.child.try_wait().unwrap() {
                    let (_, _, stderr) = vm.wait(Duration::ZERO);
                    panic!(
                        "the VM exited ({status}) before the agent listened on port {port}: \
                         {err}\nstderr:\n{stderr}"
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "the agent did not listen on port {port} within {timeout:?}: {err}"
                );
            }
        }
    }
}

/// A stdout stream for (container, exec id), read to EOF by a thread.
fn attach_stdout(vm: &mut Vm, uds: &Path, id: &str) -> JoinHandle<String> {
    let mut conn = connect(vm, uds, STREAM_VSOCK_PORT, RPC_TIMEOUT);
    conn.set_read_timeout(Some(RPC_TIMEOUT)).unwrap();
    StreamHeader::new(StreamKind::Stdout, id, "")
        .attach(&mut conn)
        .expect("stream attach");
    collect(conn)
}

/// CreateContainer `id` of `spec` with its rootfs in the share and the `stdio` streams
/// (attached before); returns the init's pid.
fn create(
    client: &AgentClient,
    id: &str,
    spec: &Value,
    stdio: podvisor_agent_protocol::agent::Stdio,
) -> ttrpc::Result<u32> {
    let mut req = CreateContainerRequest::new();
    req.container_id = id.into();
    req.oci_spec_json = serde_json::to_vec(spec).unwrap();
    req.rootfs = format!("{SHARED_IN_GUEST}/rootfs");
    req.stdio = Some(stdio).into();
    client.create_container(ctx(), &req).map(|r| r.pid)
}

/// StartContainer `id`.
fn start(client: &AgentClient, id: &str) -> ttrpc::Result<Empty> {
    let mut req = ContainerRequest::new();
    req.container_id = id.into();
    client.start_container(ctx(), &req)
}

/// Stdio with just a stdout stream.
fn stdout_only() -> podvisor_agent_protocol::agent::Stdio {
    let mut stdio = podvisor_agent_protocol::agent::Stdio::new();
    stdio.stdout = true;
    stdio
}

/// The names of the processes a container `id` of `spec` (which lists them) sees.
fn pod_processes(
    client: &AgentClient,
    vm: &mut Vm,
    uds: &Path,
    id: &str,
    spec: &Value,
) -> Vec<String> {
    let (status, out) = run_container(client, vm, uds, id, spec);
    assert_eq!(status, 0, "{out}");
    out.lines().map(String::from).collect()
}

/// Creates and starts container `id` with a stdout stream; returns (exit status, stdout).
fn run_container(
    client: &AgentClient,
    vm: &mut Vm,
    uds: &Path,
    id: &str,
    spec: &Value,
) -> (i32, String) {
    let out = attach_stdout(vm, uds, id);
    let pid = create(client, id, spec, stdout_only()).unwrap();
    assert!(pid > 0);
    start(client, id).unwrap();
    let mut req = ProcessRequest::new();
    req.container_id = id.into();
    let status = client.wait_process(ctx(), &req).unwrap().exit_status;
    (status, out.join().unwrap())
}

#[test]
fn guest_agent_runs_a_container() {
    let Some(guest) = guest_artifacts("guest_agent_runs_a_container") else {
        return;
    };
    let _vms = common::vm_slots::take(1);
    let initrd = guest.initrd.with_file_name("agent-test.cpio");
    for (path, why) in [
        (initrd.as_path(), "run `make rootfs`"),
        (Path::new(BUSYBOX), "apt-get install busybox-static"),
    ] {
        if !common::require_file("guest_agent_runs_a_container", path, why) {
            return;
        }
    }
    let dir = temp_path("agent");
    let share = dir.join("share");
    common::build_busybox_rootfs(&share.join("rootfs"));
    // An executable file that is no program (ENOEXEC at execve).
    let bogus = share.join("rootfs/not-a-program");
    std::fs::write(&bogus, b"not a program\n").unwrap();
    std::fs::set_permissions(&bogus, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uds = dir.join("vsock.sock");
    let console = dir.join("console.log");

    let mut child = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args(["boot", "--kernel"])
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--share")
        .arg(format!("{SHARE_TAG}={}", share.display()))
        .arg("--vsock")
        .arg(&uds)
        .arg("--console")
        .arg(&console)
        .args(["--mem-mib", "256", "--timings", "--timeout", "1200"])
        // One vCPU online, one parked: SetOnlineCpus below starts it.
        .args(["--vcpus", "1", "--max-vcpus", "2"])
        .stdin(ProcStdio::null())
        .stdout(ProcStdio::piped())
        .stderr(ProcStdio::piped())
        .spawn()
        .unwrap();
    let mut vm = Vm {
        stdout: Some(collect(child.stdout.take().unwrap())),
        stderr: Some(collect(child.stderr.take().unwrap())),
        child,
        console,
    };

    // The agent as PID 1 answers on vsock port 1024.
    let boot = Instant::now();
    let rpc = connect(&mut vm, &uds, RPC_VSOCK_PORT, BOOT_TIMEOUT);
    let client = AgentClient::new(ttrpc::Client::new(rpc.into_raw_fd()).unwrap());
    let version = client
        .get_version(ctx(), &GetVersionRequest::new())
        .unwrap();
    assert_eq!(
        version.protocol_version,
        podvisor_agent_protocol::PROTOCOL_VERSION
    );
    eprintln!(
        "guest_agent: agent answered after {:.1} s",
        boot.elapsed().as_secs_f64()
    );

    // The parked vCPU comes online and goes offline again; more than the VM has is refused.
    let cpus = |count: u32| {
        let mut req = SetOnlineCpusRequest::new();
        req.count = count;
        let t = Instant::now();
        let r = client.set_online_cpus(ctx(), &req);
        (r.map(|r| r.online), t.elapsed())
    };
    let (up, took) = cpus(2);
    assert_eq!(up.unwrap(), 2);
    eprintln!(
        "guest_agent: parked vCPU online in {:.2} s",
        took.as_secs_f64()
    );
    assert_eq!(cpus(1).0.unwrap(), 1);
    match cpus(3).0 {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT, "{s:?}")
        }
        other => panic!("3 CPUs of a 2-vCPU VM: {other:?}"),
    }

    // The sandbox mounts the share; the container's rootfs is in it.
    let mut req = CreateSandboxRequest::new();
    req.sandbox_id = "pod".into();
    req.hostname = "pod".into();
    let mut mount = SharedMount::new();
    mount.fstype = "virtiofs".into();
    mount.source = SHARE_TAG.into();
    mount.target = SHARED_IN_GUEST.into();
    req.mounts.push(mount);
    // A VM's sandbox needs fresh host entropy (a template clone would otherwise go on
    // with its template's random state): refused without it.
    let err = client.create_sandbox(ctx(), &req).unwrap_err();
    assert!(err.to_string().contains("host entropy"), "{err}");
    req.entropy = podvisor_shim::template::entropy().unwrap();
    // The pod's sysctls are the VM's: one the guest kernel lacks is refused by name.
    req.sysctls
        .insert("kernel.no_such_parameter".into(), "1".into());
    match client.create_sandbox(ctx(), &req) {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT, "{s:?}");
            assert!(s.message().contains("kernel.no_such_parameter"), "{s:?}");
        }
        other => panic!("CreateSandbox with an unknown sysctl: {other:?}"),
    }
    req.sysctls.clear();
    req.sysctls
        .insert("kernel.shm_rmid_forced".into(), "1".into());
    req.sysctls.insert("fs.mqueue.msg_max".into(), "100".into());
    client.create_sandbox(ctx(), &req).unwrap();

    // ConfigureNetwork through the guest kernel's rtnetlink. The VM has no NIC here: a
    // request for one is NOT_FOUND; one without interfaces succeeds (loopback up).
    let mut net = ConfigureNetworkRequest::new();
    let mut nic = Interface::new();
    nic.mac = "02:00:0a:58:00:05".into();
    nic.name = "eth0".into();
    nic.addresses.push("10.88.0.5/16".into());
    net.interfaces.push(nic);
    match client.configure_network(ctx(), &net) {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::NOT_FOUND, "{s:?}");
            assert!(s.message().contains("02:00:0a:58:00:05"), "{s:?}");
        }
        other => panic!("ConfigureNetwork for a missing NIC: {other:?}"),
    }
    client
        .configure_network(ctx(), &ConfigureNetworkRequest::new())
        .unwrap();

    // Output on the stdout stream, then the chosen exit code.
    let (status, out) = run_container(
        &client,
        &mut vm,
        &uds,
        "c1",
        &spec(
            &["sh", "-c", "echo hello from the pod; exit 42"],
            &["pid", "ipc", "uts", "mount"],
        ),
    );
    assert_eq!(out, "hello from the pod\n");
    assert_eq!(status, 42);
    // A request larger than one vsock receive buffer (a 12 KB spec crosses several
    // packets) arrives intact (it did not while glibc memcpy still used YMM registers on
    // PVM hosts: see vmm::host::GLIBC_NO_AVX_TUNABLES).
    // It shares the VM's IPC namespace (as CRI's containers do): the pod's IPC sysctls.
    let mut big = spec(
        &[
            "sh",
            "-c",
            "echo ${#BIG} $(cat /proc/sys/kernel/shm_rmid_forced /proc/sys/fs/mqueue/msg_max)",
        ],
        &["pid", "uts", "mount"],
    );
    big["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!(format!("BIG={}", "x".repeat(12_000))));
    let (status, out) = run_container(&client, &mut vm, &uds, "big", &big);
    assert_eq!((status, out.as_str()), (0, "12000 1 100\n"));

    // The agent keeps serving after a container died. Without a PID namespace the
    // container's /proc shows the agent as PID 1: its idle RSS. On a PVM host the
    // GLIBC_TUNABLES word of the kernel command line reaches every container process. The
    // spec's seccomp profile (static libseccomp in PID 1) makes mkdir fail with EPERM.
    let mut spec_rss = spec(
        &[
            "sh",
            "-c",
            "grep -E '^(Name|VmRSS|VmHWM)' /proc/1/status; echo GLIBC_TUNABLES=$GLIBC_TUNABLES; \
             brctl addbr pvbr0 2>&1 && echo bridge=ok; mkdir /tmp/x 2>&1; echo mkdir=$?",
        ],
        &["ipc", "uts", "mount"],
    );
    spec_rss["linux"]["seccomp"] = serde_json::from_str(SECCOMP_DENY_MKDIR).unwrap();
    // With CAP_NET_ADMIN (and /sys, which brctl reads) it can make a bridge: the guest
    // kernel has bridge support, as a privileged container expects.
    spec_rss["mounts"].as_array_mut().unwrap().push(json!(
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]}
    ));
    for set in ["bounding", "effective", "permitted"] {
        spec_rss["process"]["capabilities"][set]
            .as_array_mut()
            .unwrap()
            .push(json!("CAP_NET_ADMIN"));
    }
    let (status, out) = run_container(&client, &mut vm, &uds, "rss", &spec_rss);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("VmRSS:"), "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(out.contains("bridge=ok\n"), "{out}");
    assert!(out.ends_with("mkdir=1\n"), "{out}");
    if pvm_host() {
        assert!(out.contains("GLIBC_TUNABLES=glibc.cpu.hwcaps="), "{out}");
    }
    eprintln!("guest_agent: agent (PID 1) after two containers:\n{out}");

    // Memory stats and an OOM event: the container waits for a line on stdin, so Stats
    // sees it running under its limit; then dd reads 32 MiB of /dev/zero into one buffer
    // (one page fault per page, not several as when a shell variable doubles).
    let mem_start = Instant::now();
    let id = "mem";
    let mut spec_mem = spec(
        &[
            "sh",
            "-c",
            "read go; exec dd if=/dev/zero of=/dev/null bs=32M count=1",
        ],
        &["pid", "ipc", "uts", "mount"],
    );
    spec_mem["linux"]["resources"] = json!({"memory": {"limit": MEM_LIMIT}});
    let mut stdin = connect(&mut vm, &uds, STREAM_VSOCK_PORT, RPC_TIMEOUT);
    StreamHeader::new(StreamKind::Stdin, id, "")
        .attach(&mut stdin)
        .expect("stdin stream attach");
    let mut stdio = podvisor_agent_protocol::agent::Stdio::new();
    stdio.stdin = true;
    create(&client, id, &spec_mem, stdio).unwrap();
    start(&client, id).unwrap();
    let mut req = ContainerRequest::new();
    req.container_id = id.into();
    let stats = client.stats(ctx(), &req).unwrap();
    assert!(stats.has_memory, "no memory stats: {stats:?}");
    assert!(stats.memory.usage > 0, "{stats:?}");
    assert_eq!(stats.memory.limit, MEM_LIMIT, "{stats:?}");
    assert!(stats.has_pids && stats.pids.current >= 1, "{stats:?}");
    eprintln!(
        "guest_agent: stats of {id}: memory usage {} (peak {}) of {}, pids {}",
        stats.memory.usage, stats.memory.max_usage, stats.memory.limit, stats.pids.current
    );
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let event = client
        .get_oom_event(
            ttrpc::context::with_timeout(i64::try_from(OOM_TIMEOUT.as_nanos()).unwrap()),
            &GetOOMEventRequest::new(),
        )
        .unwrap();
    assert_eq!(event.container_id, id);
    let mut req = ProcessRequest::new();
    req.container_id = id.into();
    let status = client.wait_process(ctx(), &req).unwrap().exit_status;
    assert_eq!(
        status,
        128 + libc::SIGKILL,
        "the OOM killer ends the container"
    );
    eprintln!(
        "guest_agent: memory stats and OOM checks took {:.1} s",
        mem_start.elapsed().as_secs_f64()
    );

    // A stop as CRI does it: SIGTERM right after StartContainer answered, to a container's
    // init in its own PID namespace (busybox `top`, critest's default command, catches
    // SIGTERM once it runs). The init may not have its handler yet (here the guest kernel
    // makes exec slow): the signal is held until it has, not dropped, so the stop ends it
    // at once, as with runc, instead of after a grace period.
    let id = "top";
    let drain = attach_stdout(&mut vm, &uds, id);
    let top = spec(&["top"], &["pid", "ipc", "uts", "mount"]);
    create(&client, id, &top, stdout_only()).unwrap();
    start(&client, id).unwrap();
    let stop = Instant::now();
    let mut req = SignalProcessRequest::new();
    req.container_id = id.into();
    req.signal = libc::SIGTERM as u32;
    client.signal_process(ctx(), &req).unwrap();
    let mut req = ProcessRequest::new();
    req.container_id = id.into();
    let waited = client.wait_process(
        ttrpc::context::with_timeout(i64::try_from(STOP_GRACE.as_nanos()).unwrap()),
        &req,
    );
    let status = waited.map(|r| r.exit_status).unwrap_or_else(|e| {
        let mut kill = SignalProcessRequest::new();
        kill.container_id = id.into();
        kill.signal = libc::SIGKILL as u32;
        let _ = client.signal_process(ctx(), &kill);
        panic!("SIGTERM right after start did not end top within {STOP_GRACE:?}: {e}")
    });
    assert_eq!(status, 128 + libc::SIGTERM, "SIGTERM ends top");
    eprintln!(
        "guest_agent: SIGTERM right after start ended top in {:.2} s",
        stop.elapsed().as_secs_f64()
    );
    drain.join().unwrap();

    // The pod's shared PID namespace (CRI's pod-level PID namespace): two containers that
    // join it see each other, and its init is the agent's holder, as pause is with runc.
    let pod_pid = |args: &[&str]| {
        let mut s = spec(args, &["uts", "mount"]);
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "pid", "path": podvisor_agent_protocol::POD_PID_NAMESPACE}));
        s
    };
    // Its init (not the namespace's: that is the holder) leaves a background child.
    let sleeper = pod_pid(&["sh", "-c", "sleep 3600 & exec sleep 3601"]);
    create(&client, "pod-sleeper", &sleeper, Default::default()).unwrap();
    start(&client, "pod-sleeper").unwrap();
    let looker = pod_pid(&["sh", "-c", "cat /proc/[0-9]*/comm"]);
    let names = pod_processes(&client, &mut vm, &uds, "pod-looker", &looker);
    assert!(
        names.iter().any(|n| n == "pod-pid-ns") && names.iter().any(|n| n == "sleep"),
        "the pod's PID namespace holds {names:?}"
    );
    let mut req = SignalProcessRequest::new();
    req.container_id = "pod-sleeper".into();
    req.signal = libc::SIGKILL as u32;
    client.signal_process(ctx(), &req).unwrap();
    let mut req = ProcessRequest::new();
    req.container_id = "pod-sleeper".into();
    client.wait_process(ctx(), &req).unwrap();
    // Its init's exit took its other processes with it (as containerd's runc shim kills
    // a container's leftovers when it has no PID namespace of its own).
    let names = pod_processes(&client, &mut vm, &uds, "pod-looker-2", &looker);
    assert!(
        names.iter().any(|n| n == "pod-pid-ns") && !names.iter().any(|n| n == "sleep"),
        "after pod-sleeper's exit the pod's PID namespace holds {names:?}"
    );

    // StartContainer answers once the process runs its program: an executable file that
    // the kernel cannot execute is Start's error, not a silent exit.
    let id = "noexec";
    let noexec = spec(&["/not-a-program"], &["pid", "mount"]);
    create(&client, id, &noexec, Default::default()).unwrap();
    let err = start(&client, id).unwrap_err();
    assert!(err.to_string().contains("Exec format error"), "{err}");

    for id in [
        "c1",
        "rss",
        "mem",
        "top",
        "noexec",
        "pod-sleeper",
        "pod-looker",
        "pod-looker-2",
    ] {
        let mut req = ContainerRequest::new();
        req.container_id = id.into();
        client.remove_container(ctx(), &req).unwrap();
    }

    // DestroySandbox answers, then resets the VM: podvisor stops cleanly.
    client
        .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        .unwrap();
    let (code, stdout, stderr) = vm.wait(BOOT_TIMEOUT);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    eprintln!("guest_agent: podvisor timings:\n{stderr}");
    let marker = "guest time to init (first KVM_RUN -> boot marker): ";
    let line = stderr
        .lines()
        .find(|l| l.starts_with(marker))
        .unwrap_or_else(|| panic!("no timings in:\n{stderr}"));
    assert!(
        !line.contains("n/a"),
        "the agent did not mark the boot timer: {line}"
    );
    let console = vm.console();
    assert!(console.contains("podvisor-agent: INFO"), "{console}");
    let agent_log: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("podvisor-agent:"))
        .collect();
    eprintln!("guest_agent: agent log:\n{}", agent_log.join("\n"));
    assert!(!uds.exists(), "vsock socket left behind");
    drop(vm);
    std::fs::remove_dir_all(&dir).unwrap();
}
