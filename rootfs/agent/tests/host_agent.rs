//! Fast tier: the real `podvisor-agent` binary on the host, in its own mount, PID, UTS and
//! IPC namespaces (`unshare --kill-child`), listening on a Unix socket in a temp dir, driven
//! with the real generated ttrpc client and the stream protocol. Containers run from a
//! busybox rootfs built by the test (Debian's static /bin/busybox + applet links).
//!
//! Needs root (namespaces, mounts, cgroups) and busybox-static; without them each test says
//! SKIP and passes. cgroup v2: the agent mounts a private cgroup2 on /sys/fs/cgroup; the
//! container cgroups land in the host's cgroup2 hierarchy under a per-test parent, removed
//! at the end even on failure. Memory statistics and OOM need the memory controller in
//! cgroup v2; on a v1/hybrid host (this one) those checks are skipped with a message.
//!
//! No sleeps as synchronization: everything waits on a condition with a deadline.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use podvisor_agent_protocol::agent::*;
use podvisor_agent_protocol::agent_ttrpc::AgentClient;
use podvisor_agent_protocol::stream::{StreamHeader, StreamKind};
use serde_json::{json, Value};
use ttrpc::Code;

use podvisor_test_kit::host_agent::{
    cgroup2_has, process_json, skip_reason, spec, HostAgent, TIMEOUT,
};
use podvisor_test_kit::wait_for;

/// The agent binary: this build's, or another one (e.g. the static release build that goes
/// into the initramfs) named by PODVISOR_AGENT_BIN.
fn agent_bin() -> PathBuf {
    std::env::var_os("PODVISOR_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_podvisor-agent")))
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(TIMEOUT.as_nanos()).expect("seconds"))
}

macro_rules! require_host {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("SKIP {}: {reason}", module_path!());
            return;
        }
    };
}

fn rpc_code<T: std::fmt::Debug>(result: ttrpc::Result<T>) -> Code {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => status.code(),
        other => panic!("expected an RPC status error, got {other:?}"),
    }
}

/// The agent under test with a connected client.
struct Agent {
    process: HostAgent,
    rootfs: PathBuf,
    stream_sock: PathBuf,
    client: AgentClient,
}

impl std::ops::Deref for Agent {
    type Target = HostAgent;
    fn deref(&self) -> &HostAgent {
        &self.process
    }
}

impl Agent {
    fn start() -> Self {
        Self::start_in(&[])
    }

    /// Starts the agent with extra `unshare` namespace options (e.g. `--net`).
    fn start_in(namespaces: &[&str]) -> Self {
        Self::start_with(namespaces, &[])
    }

    /// Starts the agent with extra `unshare` namespace options and agent options.
    fn start_with(namespaces: &[&str], agent_args: &[&str]) -> Self {
        let mut process = HostAgent::start_with_args(&agent_bin(), namespaces, agent_args);
        let url = format!("unix://{}", process.rpc_socket().display());
        let client = wait_for("the agent to listen", TIMEOUT, || {
            if let Some(status) = process.try_wait() {
                panic!("agent exited early ({status}):\n{}", process.log());
            }
            let client = AgentClient::new(ttrpc::Client::connect(&url).ok()?);
            client
                .get_version(ctx(), &GetVersionRequest::new())
                .ok()
                .map(|_| client)
        });
        Self {
            rootfs: process.rootfs.clone(),
            stream_sock: process.stream_socket(),
            process,
            client,
        }
    }

    /// DestroySandbox, then waits for the agent to exit; returns its exit status.
    fn destroy(&mut self) -> std::process::ExitStatus {
        self.client
            .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
            .unwrap();
        let process = &mut self.process;
        wait_for("the agent to exit", TIMEOUT, || process.try_wait())
    }
    /// Attaches a stream for (id, exec id).
    fn attach(&self, kind: StreamKind, id: &str, exec_id: &str) -> UnixStream {
        let mut conn = UnixStream::connect(&self.stream_sock).unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        StreamHeader::new(kind, id, exec_id)
            .attach(&mut conn)
            .expect("stream attach");
        conn
    }

    fn create(&self, id: &str, spec: &Value, stdio: Stdio) -> ttrpc::Result<u32> {
        let mut req = CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = serde_json::to_vec(spec).unwrap();
        req.rootfs = self.rootfs.display().to_string();
        req.stdio = Some(stdio).into();
        self.client.create_container(ctx(), &req).map(|r| r.pid)
    }

    /// Creates and starts a container running `sleep 1000`, without stdio.
    fn run_sleeper(&self, id: &str) {
        self.create(id, &spec(&["sleep", "1000"], false), Stdio::new())
            .unwrap();
        self.start_container(id).unwrap();
    }

    fn start_container(&self, id: &str) -> ttrpc::Result<Empty> {
        let mut req = ContainerRequest::new();
        req.container_id = id.into();
        self.client.start_container(ctx(), &req)
    }

    fn container_req(id: &str) -> ContainerRequest {
        let mut req = ContainerRequest::new();
        req.container_id = id.into();
        req
    }

    fn exec(&self, id: &str, exec_id: &str, args: &[&str], stdio: Stdio) -> ttrpc::Result<u32> {
        let mut req = ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.oci_process_json = process_json(args, stdio.terminal);
        req.stdio = Some(stdio).into();
        self.client.exec_process(ctx(), &req).map(|r| r.pid)
    }

    fn wait(&self, id: &str, exec_id: &str) -> ttrpc::Result<i32> {
        let mut req = ProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        self.client.wait_process(ctx(), &req).map(|r| r.exit_status)
    }

    fn signal(&self, id: &str, exec_id: &str, signal: i32) -> ttrpc::Result<Empty> {
        let mut req = SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.signal = u32::try_from(signal).expect("signal numbers are positive");
        self.client.signal_process(ctx(), &req)
    }

    fn remove(&self, id: &str) -> ttrpc::Result<Empty> {
        self.client
            .remove_container(ctx(), &Self::container_req(id))
    }
}

fn stdio(stdin: bool, stdout: bool, stderr: bool) -> Stdio {
    let mut s = Stdio::new();
    s.stdin = stdin;
    s.stdout = stdout;
    s.stderr = stderr;
    s
}

fn terminal() -> Stdio {
    let mut s = Stdio::new();
    s.terminal = true;
    s
}

/// Reads a stream to EOF in a thread (so a large output never fills the socket buffer).
fn collect(mut conn: UnixStream) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        conn.read_to_end(&mut out).expect("stream read");
        out
    })
}

#[test]
fn version_and_health() {
    require_host!();
    let agent = Agent::start();
    let version = agent
        .client
        .get_version(ctx(), &GetVersionRequest::new())
        .unwrap();
    assert_eq!(
        version.protocol_version,
        podvisor_agent_protocol::PROTOCOL_VERSION
    );
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    let health = agent.client.health(ctx(), &HealthRequest::new()).unwrap();
    assert_eq!(
        health.status.enum_value().unwrap(),
        health_response::Status::SERVING
    );
}

#[test]
fn output_and_exit_code() {
    require_host!();
    let mut agent = Agent::start();
    let mut req = CreateSandboxRequest::new();
    req.sandbox_id = "pod".into();
    req.hostname = "podhost".into();
    req.dns = vec!["nameserver 10.0.0.1".into()];
    req.guest_env = vec!["EXTRA=1".into()];
    agent.client.create_sandbox(ctx(), &req).unwrap();
    assert_eq!(
        rpc_code(agent.client.create_sandbox(ctx(), &req)),
        Code::ALREADY_EXISTS
    );
    assert_eq!(
        fs::read_to_string(agent.dir().join("resolv.conf")).unwrap(),
        "nameserver 10.0.0.1\n"
    );

    // Fast exit with output on both streams and the guest env visible.
    let out = collect(agent.attach(StreamKind::Stdout, "c1", ""));
    let err = collect(agent.attach(StreamKind::Stderr, "c1", ""));
    let script = "echo hello $EXTRA $GLIBC_TUNABLES; hostname; echo oops >&2; exit 7";
    let pid = agent
        .create(
            "c1",
            &spec(&["sh", "-c", script], false),
            stdio(false, true, true),
        )
        .unwrap();
    assert!(pid > 0);
    agent.start_container("c1").unwrap();
    assert_eq!(agent.wait("c1", "").unwrap(), 7);
    assert_eq!(
        String::from_utf8(out.join().unwrap()).unwrap(),
        "hello 1 glibc.malloc.check=0\nctr\n"
    );
    assert_eq!(err.join().unwrap(), b"oops\n");

    // 4 MiB written by a process that exits at once: WaitProcess answers only after all
    // of it went out on the stream.
    let conn = agent.attach(StreamKind::Stdout, "big", "");
    let big = collect(conn);
    agent
        .create(
            "big",
            &spec(&["dd", "if=/dev/zero", "bs=64k", "count=64"], false),
            stdio(false, true, false),
        )
        .unwrap();
    agent.start_container("big").unwrap();
    assert_eq!(agent.wait("big", "").unwrap(), 0);
    let data = big.join().unwrap();
    assert_eq!(data.len(), 4 << 20);
    assert!(data.iter().all(|&b| b == 0));

    for id in ["c1", "big"] {
        agent.remove(id).unwrap();
        assert!(!agent.container_cgroup(id).exists());
        assert!(!agent.dir().join("s/c").join(id).exists());
        assert!(!agent.dir().join("s/bundles").join(id).exists());
    }
    assert!(agent.destroy().success());
}

/// The OCI spec is honoured: user, cwd, env, rlimits, no_new_privs, capabilities,
/// read-only rootfs, masked (file and directory) and read-only paths, hostname, PID
/// namespace, default signal dispositions. By the lean launcher (the agent's default for
/// this spec) and by libcontainer, with the same result.
#[test]
fn spec_features() {
    require_host!();
    let agent = Agent::start();
    spec_features_with(&agent);
    assert!(
        agent.process.log().contains("container f created (lean)"),
        "the lean launcher made it:\n{}",
        agent.process.log()
    );
}

#[test]
fn spec_features_libcontainer() {
    require_host!();
    let agent = Agent::start_with(&[], &["--launcher", "libcontainer"]);
    spec_features_with(&agent);
    assert!(!agent.process.log().contains("(lean)"));
}

fn spec_features_with(agent: &Agent) {
    let script = "id -u; id -g; id -G; pwd; echo $GREETING; ulimit -n; hostname; \
        cat /proc/sys/kernel/domainname; \
        grep NoNewPrivs /proc/self/status | tr -d ' \t'; grep CapBnd /proc/self/status | tr -d ' \t'; \
        grep -E '^Sig(Ign|Blk)' /proc/self/status | tr -d ' \t'; \
        touch /bin/x 2>/dev/null && echo rootfs-writable || echo rootfs-ro; \
        wc -c < /etc/passwd; ls /root | wc -l; \
        (echo 1 > /proc/sys/kernel/ns_last_pid) 2>/dev/null && echo sys-writable || echo sys-ro; \
        echo $$";
    let mut spec = spec(&["sh", "-c", script], false);
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [5, 7]});
    spec["process"]["cwd"] = json!("/tmp");
    spec["domainname"] = json!("pod.example");
    spec["process"]["env"] = json!(["PATH=/bin", "GREETING=hi there"]);
    spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 321}]);
    // CAP_KILL (bit 5) only. (A non-root user has no effective capabilities after exec
    // without ambient ones, as with runc: check the bounding set.)
    let caps = json!(["CAP_KILL"]);
    spec["process"]["capabilities"] =
        json!({"bounding": caps, "effective": caps, "permitted": caps});
    let out = collect(agent.attach(StreamKind::Stdout, "f", ""));
    agent.create("f", &spec, stdio(false, true, false)).unwrap();
    agent.start_container("f").unwrap();
    assert_eq!(agent.wait("f", "").unwrap(), 0);
    let out = String::from_utf8(out.join().unwrap()).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "1000",
            "1000",
            "1000 5 7",
            "/tmp",
            "hi there",
            "321",
            "ctr",
            "pod.example",
            "NoNewPrivs:1",
            "CapBnd:0000000000000020",
            // Nothing ignored or blocked is inherited from the agent (Rust ignores SIGPIPE).
            "SigBlk:0000000000000000",
            "SigIgn:0000000000000000",
            "rootfs-ro",
            "0",
            "0",
            "sys-ro",
            "1",
        ],
        "{out}"
    );
    agent.remove("f").unwrap();
}

/// A create that fails (here: no such executable, found before the process is reported
/// ready) leaves nothing: no cgroup, no state, no bundle.
#[test]
fn a_failed_create_leaves_no_cgroup() {
    require_host!();
    let agent = Agent::start();
    let err = agent
        .create("nx", &spec(&["/no/such/program"], false), Stdio::new())
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("finding the executable"),
        "{err:?}"
    );
    assert!(!agent.container_cgroup("nx").exists(), "the cgroup is gone");
    assert!(!agent.dir().join("s/c/nx").exists());
    assert!(!agent.dir().join("s/bundles/nx").exists());
}

/// An image's symlinks cannot point a mount outside the container's root: with `/escape`
/// a symlink to a directory of the agent's host, a tmpfs mounted at `/escape/x` lands in
/// the root (the lean launcher resolves targets with RESOLVE_IN_ROOT), and the host
/// directory gets nothing.
#[test]
fn mount_targets_stay_in_the_root() {
    require_host!();
    let agent = Agent::start();
    let outside = agent.dir().join("outside");
    fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, agent.rootfs.join("escape")).unwrap();
    let mut spec = spec(
        &[
            "sh",
            "-c",
            "grep -c '/outside/x ' /proc/self/mountinfo; ls /escape",
        ],
        false,
    );
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/escape/x", "type": "tmpfs", "source": "tmpfs"}));
    let out = collect(agent.attach(StreamKind::Stdout, "e", ""));
    agent.create("e", &spec, stdio(false, true, false)).unwrap();
    agent.start_container("e").unwrap();
    assert_eq!(agent.wait("e", "").unwrap(), 0);
    assert_eq!(String::from_utf8(out.join().unwrap()).unwrap(), "1\nx\n");
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing made outside the root"
    );
    assert!(agent.process.log().contains("container e created (lean)"));
    agent.remove("e").unwrap();
}

/// An OCI seccomp profile: mkdir/mkdirat fail with EPERM (errnoRet 1), the rest is allowed.
/// (Shared with the guest tier, tests/guest_agent.rs.)
const SECCOMP_DENY_MKDIR: &str = include_str!("fixtures/seccomp-deny-mkdir.json");

/// The spec's seccomp profile is applied (libcontainer + static libseccomp): a profile
/// that makes mkdir/mkdirat fail with EPERM, next to the same container without it.
#[test]
fn seccomp_profile() {
    require_host!();
    let agent = Agent::start();
    let script = "mkdir /tmp/x 2>&1; echo rc=$?";
    for (id, profile) in [("sc", true), ("nosc", false)] {
        let mut spec = spec(&["sh", "-c", script], false);
        if profile {
            spec["linux"]["seccomp"] = serde_json::from_str(SECCOMP_DENY_MKDIR).unwrap();
        }
        let out = collect(agent.attach(StreamKind::Stdout, id, ""));
        agent.create(id, &spec, stdio(false, true, false)).unwrap();
        agent.start_container(id).unwrap();
        assert_eq!(agent.wait(id, "").unwrap(), 0);
        let out = String::from_utf8(out.join().unwrap()).unwrap();
        if profile {
            assert!(out.contains("Operation not permitted"), "{out}");
            assert!(out.ends_with("rc=1\n"), "{out}");
        } else {
            assert_eq!(out, "rc=0\n");
        }
        agent.remove(id).unwrap();
    }

    // A process exec'd into the container is confined by the same profile, as with runc
    // (libcontainer alone leaves it unconfined). Without no_new_privs and without
    // CAP_SYS_ADMIN the profile is loaded after setting no_new_privs.
    let mut spec = spec(&["sleep", "1000"], false);
    spec["linux"]["seccomp"] = serde_json::from_str(SECCOMP_DENY_MKDIR).unwrap();
    agent.create("sc-exec", &spec, Stdio::new()).unwrap();
    agent.start_container("sc-exec").unwrap();
    let check =
        "mkdir /tmp/y 2>/dev/null; echo rc=$?; grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status";
    for (exec_id, no_new_privs) in [("nnp", true), ("privs", false)] {
        let out = collect(agent.attach(StreamKind::Stdout, "sc-exec", exec_id));
        let mut process: Value =
            serde_json::from_slice(&process_json(&["sh", "-c", check], false)).unwrap();
        process["noNewPrivileges"] = no_new_privs.into();
        let mut req = ExecProcessRequest::new();
        req.container_id = "sc-exec".into();
        req.exec_id = exec_id.into();
        req.oci_process_json = serde_json::to_vec(&process).unwrap();
        req.stdio = Some(stdio(false, true, false)).into();
        agent.client.exec_process(ctx(), &req).unwrap();
        assert_eq!(agent.wait("sc-exec", exec_id).unwrap(), 0);
        let out = String::from_utf8(out.join().unwrap()).unwrap();
        assert_eq!(out, "rc=1\nNoNewPrivs:\t1\nSeccomp:\t2\n", "exec {exec_id}");
    }
    agent.remove("sc-exec").unwrap();
}

/// CreateSandbox's shared mounts are visible to containers, which bind from them.
#[test]
fn shared_mounts_and_binds() {
    require_host!();
    let agent = Agent::start();
    let shared = agent.dir().join("shared");
    let mut mount = SharedMount::new();
    mount.fstype = "tmpfs".into();
    mount.source = "podshare".into();
    mount.target = shared.display().to_string();
    mount.options = vec!["nodev".into(), "size=1m".into()];
    let mut req = CreateSandboxRequest::new();
    req.sandbox_id = "pod".into();
    req.mounts = vec![mount];
    agent.client.create_sandbox(ctx(), &req).unwrap();
    let mountinfo = fs::read_to_string(format!("/proc/{}/mountinfo", agent.agent_pid())).unwrap();
    assert!(
        mountinfo.contains(&format!("{} ", shared.display())),
        "{mountinfo}"
    );

    let bind = |spec: &mut Value, options: Value| {
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/data", "type": "bind",
                         "source": shared.display().to_string(), "options": options}));
    };
    let mut writer = spec(&["sh", "-c", "echo from-writer > /data/note"], false);
    bind(&mut writer, json!(["rbind", "rw"]));
    agent.create("w", &writer, Stdio::new()).unwrap();
    agent.start_container("w").unwrap();
    assert_eq!(agent.wait("w", "").unwrap(), 0);

    let mut reader = spec(
        &[
            "sh",
            "-c",
            "cat /data/note; echo x > /data/other || echo read-only",
        ],
        false,
    );
    bind(&mut reader, json!(["rbind", "ro"]));
    let out = collect(agent.attach(StreamKind::Stdout, "r", ""));
    agent
        .create("r", &reader, stdio(false, true, false))
        .unwrap();
    agent.start_container("r").unwrap();
    assert_eq!(agent.wait("r", "").unwrap(), 0);
    assert_eq!(out.join().unwrap(), b"from-writer\nread-only\n");
    agent.remove("w").unwrap();
    agent.remove("r").unwrap();

    // UpdateResources with nothing to change succeeds on any controller set.
    agent.run_sleeper("u");
    let mut update = UpdateResourcesRequest::new();
    update.container_id = "u".into();
    update.oci_resources_json = b"{}".to_vec();
    agent.client.update_resources(ctx(), &update).unwrap();
    if cgroup2_has("pids") {
        update.oci_resources_json = br#"{"pids": {"limit": 42}}"#.to_vec();
        agent.client.update_resources(ctx(), &update).unwrap();
        let max = fs::read_to_string(agent.container_cgroup("u").join("pids.max")).unwrap();
        assert_eq!(max.trim(), "42");
    } else {
        eprintln!("SKIP pids update: the host's cgroup2 has no pids controller");
    }
    agent.remove("u").unwrap();
}

/// The container cgroups in this test's cgroup parent that `prefix` names, sorted.
fn cgroups_named(parent: &std::path::Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(parent)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// With `--cgroup-spares`, the agent makes empty container cgroups before it answers (a
/// template VM is saved with them) and a container takes one: its processes, limits and
/// removal go with that cgroup, no cgroup named after the container is made, and the pool
/// is refilled once creates are quiet. Without spares every container gets
/// `<parent>/<id>` (the other tests).
#[test]
fn cgroups_made_ahead_of_time() {
    require_host!();
    let mut agent = Agent::start_with(&[], &["--cgroup-spares", "2"]);
    let parent = agent.process.cgroup_parent();
    assert_eq!(cgroups_named(&parent, "ctr-"), ["ctr-0", "ctr-1"]);
    let mut req = CreateSandboxRequest::new();
    req.sandbox_id = "pod".into();
    agent.client.create_sandbox(ctx(), &req).unwrap();

    agent.run_sleeper("a");
    assert!(!agent.container_cgroup("a").exists(), "no cgroup by id");
    let busy: Vec<String> = cgroups_named(&parent, "ctr-")
        .into_iter()
        .filter(|n| {
            !fs::read_to_string(parent.join(n).join("cgroup.procs"))
                .unwrap_or_default()
                .trim()
                .is_empty()
        })
        .collect();
    assert_eq!(busy.len(), 1, "the container runs in one spare: {busy:?}");
    let taken = parent.join(&busy[0]);
    if cgroup2_has("pids") {
        let mut update = UpdateResourcesRequest::new();
        update.container_id = "a".into();
        update.oci_resources_json = br#"{"pids": {"limit": 42}}"#.to_vec();
        agent.client.update_resources(ctx(), &update).unwrap();
        let max = fs::read_to_string(taken.join("pids.max")).unwrap();
        assert_eq!(max.trim(), "42");
    }
    agent.remove("a").unwrap();
    assert!(!taken.exists(), "removed with its container");

    // Quiet for a while: the pool is back to two spares, with new names.
    let deadline = Instant::now() + Duration::from_secs(20);
    while cgroups_named(&parent, "ctr-").len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let spares = cgroups_named(&parent, "ctr-");
    assert_eq!(spares.len(), 2, "{spares:?}");
    assert!(
        !spares.contains(&busy[0]),
        "a used cgroup is not handed out again"
    );
    assert!(agent.destroy().success());
    assert!(
        !parent.exists(),
        "destroy removes the spares and the parent"
    );
}

#[test]
fn exec_signal_and_stdin() {
    require_host!();
    let agent = Agent::start();
    agent.run_sleeper("c");

    // stdin: cat echoes, then CloseStdin after the bytes we sent gives it EOF.
    let mut input = agent.attach(StreamKind::Stdin, "c", "cat");
    let out = collect(agent.attach(StreamKind::Stdout, "c", "cat"));
    agent
        .exec("c", "cat", &["cat"], stdio(true, true, false))
        .unwrap();
    input.write_all(b"ping\npong\n").unwrap();
    let mut req = CloseStdinRequest::new();
    req.container_id = "c".into();
    req.exec_id = "cat".into();
    req.stdin_bytes = 10;
    agent.client.close_stdin(ctx(), &req).unwrap();
    assert_eq!(agent.wait("c", "cat").unwrap(), 0);
    assert_eq!(out.join().unwrap(), b"ping\npong\n");

    // stdin EOF by half-closing the stream.
    let input = agent.attach(StreamKind::Stdin, "c", "wc");
    let out = collect(agent.attach(StreamKind::Stdout, "c", "wc"));
    agent
        .exec("c", "wc", &["wc", "-c"], stdio(true, true, false))
        .unwrap();
    (&input).write_all(b"12345").unwrap();
    input.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(agent.wait("c", "wc").unwrap(), 0);
    assert_eq!(String::from_utf8(out.join().unwrap()).unwrap().trim(), "5");

    // Exec sees the container's PID namespace: the init is PID 1 there.
    let out = collect(agent.attach(StreamKind::Stdout, "c", "ps"));
    agent
        .exec(
            "c",
            "ps",
            &["sh", "-c", "cat /proc/1/cmdline; echo"],
            stdio(false, true, false),
        )
        .unwrap();
    assert_eq!(agent.wait("c", "ps").unwrap(), 0);
    assert_eq!(out.join().unwrap(), b"sleep\x001000\x00\n");

    // Signals: TERM to an exec'd sleep, then ListProcesses no longer has it.
    let pid = agent
        .exec("c", "sleeper", &["sleep", "1000"], Stdio::new())
        .unwrap();
    let pids = agent
        .client
        .list_processes(ctx(), &Agent::container_req("c"))
        .unwrap()
        .pids;
    assert!(pids.contains(&pid), "{pids:?} lacks {pid}");
    agent.signal("c", "sleeper", libc::SIGTERM).unwrap();
    assert_eq!(agent.wait("c", "sleeper").unwrap(), 128 + libc::SIGTERM);
    assert_eq!(
        rpc_code(agent.signal("c", "sleeper", libc::SIGTERM)),
        Code::NOT_FOUND
    );
    let mut req = ProcessRequest::new();
    req.container_id = "c".into();
    req.exec_id = "sleeper".into();
    agent.client.remove_process(ctx(), &req).unwrap();
    assert_eq!(rpc_code(agent.wait("c", "sleeper")), Code::NOT_FOUND);

    // SIGKILL to the init ends the container; exec is refused afterwards.
    agent.signal("c", "", libc::SIGKILL).unwrap();
    assert_eq!(agent.wait("c", "").unwrap(), 128 + libc::SIGKILL);
    assert_eq!(
        rpc_code(agent.exec("c", "late", &["true"], Stdio::new())),
        Code::FAILED_PRECONDITION
    );
    agent.remove("c").unwrap();
}

#[test]
fn terminal_stream_and_resize() {
    require_host!();
    let agent = Agent::start();
    let mut pty = agent.attach(StreamKind::Pty, "t", "");
    agent
        .create(
            "t",
            &spec(&["sh", "-c", "read line; stty size; echo got:$line"], true),
            terminal(),
        )
        .unwrap();
    let mut req = ResizeTtyRequest::new();
    req.container_id = "t".into();
    req.rows = 33;
    req.columns = 101;
    agent.client.resize_tty(ctx(), &req).unwrap();
    agent.start_container("t").unwrap();
    pty.write_all(b"hi\n").unwrap();
    assert_eq!(agent.wait("t", "").unwrap(), 0);
    let mut out = Vec::new();
    pty.read_to_end(&mut out).unwrap();
    let out = String::from_utf8_lossy(&out).replace('\r', "");
    assert!(out.contains("33 101\n"), "{out:?}");
    assert!(out.contains("got:hi\n"), "{out:?}");

    // A process without a terminal cannot be resized.
    agent
        .create("plain", &spec(&["true"], false), Stdio::new())
        .unwrap();
    req.container_id = "plain".into();
    assert_eq!(
        rpc_code(agent.client.resize_tty(ctx(), &req)),
        Code::FAILED_PRECONDITION
    );
    agent.remove("t").unwrap();
    agent.remove("plain").unwrap();
}

#[test]
fn stats_pause_resume() {
    require_host!();
    let agent = Agent::start();
    agent.run_sleeper("s");
    let stats = agent
        .client
        .stats(ctx(), &Agent::container_req("s"))
        .unwrap();
    assert!(stats.has_cpu, "cpu.stat is always there in cgroup v2");
    if cgroup2_has("memory") {
        assert!(stats.has_memory && stats.memory.usage > 0);
    } else {
        eprintln!("SKIP memory stats: the host's cgroup2 has no memory controller");
    }
    if cgroup2_has("pids") {
        assert!(stats.has_pids && stats.pids.current >= 1);
    }

    let events = agent.container_cgroup("s").join("cgroup.events");
    agent
        .client
        .pause_container(ctx(), &Agent::container_req("s"))
        .unwrap();
    assert!(fs::read_to_string(&events).unwrap().contains("frozen 1"));
    agent
        .client
        .resume_container(ctx(), &Agent::container_req("s"))
        .unwrap();
    assert!(fs::read_to_string(&events).unwrap().contains("frozen 0"));

    // Paused containers can still be removed.
    agent
        .client
        .pause_container(ctx(), &Agent::container_req("s"))
        .unwrap();
    agent.remove("s").unwrap();
    assert!(!agent.container_cgroup("s").exists());
}

#[test]
fn oom_event() {
    require_host!();
    if !cgroup2_has("memory") {
        eprintln!(
            "SKIP oom_event: the host's cgroup2 has no memory controller (cgroup v1/hybrid host)"
        );
        return;
    }
    let agent = Agent::start();
    let mut spec = spec(&["sh", "-c", "x=y; while true; do x=$x$x; done"], false);
    spec["linux"]["resources"] = json!({"memory": {"limit": 16 << 20, "swap": 16 << 20}});
    agent.create("oom", &spec, Stdio::new()).unwrap();
    agent.start_container("oom").unwrap();
    let event = agent
        .client
        .get_oom_event(ctx(), &GetOOMEventRequest::new())
        .unwrap();
    assert_eq!(event.container_id, "oom");
    assert_eq!(agent.wait("oom", "").unwrap(), 128 + libc::SIGKILL);
    agent.remove("oom").unwrap();
}

#[test]
fn bad_requests() {
    require_host!();
    let agent = Agent::start();
    assert_eq!(rpc_code(agent.start_container("nope")), Code::NOT_FOUND);
    assert_eq!(rpc_code(agent.remove("nope")), Code::NOT_FOUND);
    assert_eq!(rpc_code(agent.wait("nope", "")), Code::NOT_FOUND);

    let mut req = CreateContainerRequest::new();
    req.container_id = "bad".into();
    req.oci_spec_json = b"{not json".to_vec();
    assert_eq!(
        rpc_code(agent.client.create_container(ctx(), &req)),
        Code::INVALID_ARGUMENT
    );
    req.container_id = "../escape".into();
    assert_eq!(
        rpc_code(agent.client.create_container(ctx(), &req)),
        Code::INVALID_ARGUMENT
    );
    // stdout requested, no stream attached.
    assert_eq!(
        rpc_code(agent.create(
            "nostream",
            &spec(&["true"], false),
            stdio(false, true, false)
        )),
        Code::FAILED_PRECONDITION
    );

    agent
        .create("c", &spec(&["sleep", "1000"], false), Stdio::new())
        .unwrap();
    assert_eq!(
        rpc_code(agent.create("c", &spec(&["true"], false), Stdio::new())),
        Code::ALREADY_EXISTS
    );
    // Exec before start: not running.
    assert_eq!(
        rpc_code(agent.exec("c", "e", &["true"], Stdio::new())),
        Code::FAILED_PRECONDITION
    );
    agent.start_container("c").unwrap();
    assert_eq!(
        rpc_code(agent.start_container("c")),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(rpc_code(agent.wait("c", "no-such-exec")), Code::NOT_FOUND);
    assert_eq!(rpc_code(agent.signal("c", "", 999)), Code::INVALID_ARGUMENT);
    agent.exec("c", "e", &["true"], Stdio::new()).unwrap();
    assert_eq!(
        rpc_code(agent.exec("c", "e", &["true"], Stdio::new())),
        Code::ALREADY_EXISTS
    );
    let mut bad = ExecProcessRequest::new();
    bad.container_id = "c".into();
    bad.exec_id = "bad".into();
    bad.oci_process_json = b"[]".to_vec();
    assert_eq!(
        rpc_code(agent.client.exec_process(ctx(), &bad)),
        Code::INVALID_ARGUMENT
    );
    let mut update = UpdateResourcesRequest::new();
    update.container_id = "c".into();
    update.oci_resources_json = b"{\"pids\": 5}".to_vec();
    assert_eq!(
        rpc_code(agent.client.update_resources(ctx(), &update)),
        Code::INVALID_ARGUMENT
    );
    // A duplicate stream is refused at attach time.
    let _first = agent.attach(StreamKind::Stdout, "c", "x");
    let mut conn = UnixStream::connect(&agent.stream_sock).unwrap();
    assert!(StreamHeader::new(StreamKind::Stdout, "c", "x")
        .attach(&mut conn)
        .is_err());
    agent.remove("c").unwrap();
}

#[test]
fn nothing_leaks() {
    require_host!();
    let mut agent = Agent::start();
    let rootfs = agent.rootfs.display().to_string();
    let fds_at_start = agent.agent_fds();
    let mut client_ends = Vec::new();
    for id in ["a", "b"] {
        client_ends.push(agent.attach(StreamKind::Stdout, id, ""));
        agent
            .create(
                id,
                &spec(&["sleep", "1000"], false),
                stdio(false, true, false),
            )
            .unwrap();
        agent.start_container(id).unwrap();
        client_ends.push(agent.attach(StreamKind::Stdin, id, "bg"));
        client_ends.push(agent.attach(StreamKind::Pty, id, "tty"));
        agent
            .exec(
                id,
                "bg",
                &["sh", "-c", "sleep 1000 & cat"],
                stdio(true, false, false),
            )
            .unwrap();
        agent.exec(id, "tty", &["sh"], terminal()).unwrap();
    }
    // An attached stream that no process ever claims.
    client_ends.push(agent.attach(StreamKind::Stderr, "a", "never"));
    assert!(agent.agent_fds() > fds_at_start);
    assert!(!agent.agent_children().is_empty());
    agent.remove("a").unwrap();
    assert_eq!(
        rpc_code(
            agent
                .client
                .list_processes(ctx(), &Agent::container_req("a"))
        ),
        Code::NOT_FOUND
    );
    assert!(!agent.container_cgroup("a").exists());
    // "b" still runs: its init and two execs are the agent's only children (orphans of
    // the removed container were reaped).
    let children = wait_for("a's processes to be reaped", TIMEOUT, || {
        let children = agent.agent_children();
        (children.len() == 3).then_some(children)
    });
    assert_eq!(children.len(), 3);
    // The removed container's mount namespace is gone: no mount of its rootfs anywhere.
    let mountinfo = fs::read_to_string(format!("/proc/{}/mountinfo", agent.agent_pid())).unwrap();
    assert!(
        !mountinfo.contains(&rootfs),
        "agent mounts the rootfs:\n{mountinfo}"
    );

    agent.remove("b").unwrap();
    // Every pump ended and every stream, pipe and pty of the removed containers is closed,
    // although the client still holds its ends.
    wait_for("the agent's fds to return to the baseline", TIMEOUT, || {
        (agent.agent_fds() == fds_at_start).then_some(())
    });
    drop(client_ends);

    // DestroySandbox removes "c" as well, the pod cgroup, and the agent exits cleanly.
    agent.run_sleeper("c");
    let parent = agent.cgroup_parent();
    assert!(agent.destroy().success());
    assert!(!parent.exists(), "{} left behind", parent.display());
    assert!(fs::read_dir(agent.dir().join("s/c"))
        .unwrap()
        .next()
        .is_none());
}

/// `ip -j ARGS` in the agent's network namespace, parsed.
fn ip_json(agent: &Agent, args: &[&str]) -> Value {
    let out = Command::new("nsenter")
        .arg("-t")
        .arg(agent.agent_pid().to_string())
        .args(["-n", "ip", "-j"])
        .args(args)
        .output()
        .expect("run nsenter + ip (util-linux, iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn ip_in(agent: &Agent, args: &[&str]) {
    let status = Command::new("nsenter")
        .arg("-t")
        .arg(agent.agent_pid().to_string())
        .args(["-n", "ip"])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "ip {args:?}");
}

fn net_iface(mac: &str, name: &str, mtu: u32, addresses: &[&str]) -> Interface {
    Interface {
        mac: mac.into(),
        name: name.into(),
        mtu,
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

fn net_route(destination: &str, gateway: &str, device: &str) -> Route {
    Route {
        destination: destination.into(),
        gateway: gateway.into(),
        device: device.into(),
        ..Default::default()
    }
}

/// The agent in its own network namespace (`unshare --net`, gone with the agent): a veth
/// pair made there stands in for the VM's NIC; ConfigureNetwork names it, sets MTU,
/// addresses and routes; bad requests fail with the right code and change nothing.
#[test]
fn configure_network() {
    require_host!();
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("SKIP configure_network: needs iproute2's ip");
        return;
    }
    let agent = Agent::start_in(&["--net"]);
    const MAC: &str = "02:00:0a:58:00:05";
    ip_in(
        &agent,
        &[
            "link", "add", "nic0", "address", MAC, "type", "veth", "peer", "name", "nic0p",
        ],
    );
    ip_in(&agent, &["link", "set", "nic0p", "up"]);
    let lo = ip_json(&agent, &["link", "show", "lo"]);
    assert!(
        !lo[0]["flags"].as_array().unwrap().contains(&json!("UP")),
        "lo starts down"
    );

    // Bad requests first: nothing may change.
    let mut bad = ConfigureNetworkRequest::new();
    bad.interfaces
        .push(net_iface("02:00:0a:58:00:99", "eth0", 0, &[]));
    let err = agent.client.configure_network(ctx(), &bad);
    assert_eq!(rpc_code(err), Code::NOT_FOUND);
    let mut bad = ConfigureNetworkRequest::new();
    bad.interfaces
        .push(net_iface(MAC, "eth0", 1400, &["10.88.0.5/16", "10.88.0.6"]));
    let err = agent.client.configure_network(ctx(), &bad);
    let Err(ttrpc::Error::RpcStatus(status)) = err else {
        panic!("malformed CIDR accepted: {err:?}");
    };
    assert_eq!(status.code(), Code::INVALID_ARGUMENT);
    assert!(
        status
            .message()
            .contains("\"10.88.0.6\" is not an address/prefix"),
        "{}",
        status.message()
    );
    let mut bad = ConfigureNetworkRequest::new();
    bad.interfaces.push(net_iface(MAC, "eth0", 0, &[]));
    bad.routes.push(net_route("", "10.88.0.1", "eth9"));
    assert_eq!(
        rpc_code(agent.client.configure_network(ctx(), &bad)),
        Code::INVALID_ARGUMENT
    );
    let nic = ip_json(&agent, &["addr", "show", "nic0"]);
    assert_eq!(nic[0]["mtu"], 1500, "a rejected request changed the MTU");
    assert_eq!(nic[0]["addr_info"].as_array().map_or(0, Vec::len), 0);

    let mut req = ConfigureNetworkRequest::new();
    req.interfaces.push(net_iface(
        MAC,
        "eth0",
        1400,
        &["10.88.0.5/16", "fd00:88::5/64"],
    ));
    req.routes.push(net_route("", "10.88.0.1", "eth0"));
    req.routes
        .push(net_route("10.99.0.0/16", "10.88.0.254", "eth0"));
    req.routes.push(net_route("192.168.77.0/24", "", "eth0"));
    req.resolv_conf = "nameserver 10.88.0.1\n".into();
    agent.client.configure_network(ctx(), &req).unwrap();
    // Twice: the same request converges (replace semantics), it does not fail on EEXIST.
    agent.client.configure_network(ctx(), &req).unwrap();

    let lo = ip_json(&agent, &["link", "show", "lo"]);
    assert!(
        lo[0]["flags"].as_array().unwrap().contains(&json!("UP")),
        "lo is up"
    );
    let eth0 = ip_json(&agent, &["addr", "show", "eth0"]);
    assert_eq!(eth0[0]["address"], MAC);
    assert_eq!(eth0[0]["mtu"], 1400);
    assert!(eth0[0]["flags"].as_array().unwrap().contains(&json!("UP")));
    let addrs: Vec<String> = eth0[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["scope"] == "global")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(addrs, ["10.88.0.5/16", "fd00:88::5/64"]);
    let routes = ip_json(&agent, &["route", "show"]);
    let find = |dst: &str| {
        routes
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["dst"] == dst)
            .unwrap_or_else(|| panic!("no route to {dst} in {routes}"))
            .clone()
    };
    assert_eq!(find("default")["gateway"], "10.88.0.1");
    assert_eq!(find("default")["dev"], "eth0");
    assert_eq!(find("10.99.0.0/16")["gateway"], "10.88.0.254");
    assert_eq!(find("192.168.77.0/24")["dev"], "eth0");
    assert!(
        !agent.dir().join("resolv.conf").exists(),
        "host-test mode must not write resolv.conf"
    );
}
