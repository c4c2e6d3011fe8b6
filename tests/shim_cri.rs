//! Kubernetes CRI tier of the shim: a private containerd with its CRI plugin on
//! (handlers `runc` and `podvisor`, CNI's bridge plugin for pod networks) driven by a CRI v1
//! client of our own (`k8s-cri` over tonic on containerd's Unix socket), as kubelet would:
//! RunPodSandbox → CreateContainer ×2 → StartContainer ×2 → ExecSync → ContainerStats →
//! StopPodSandbox → RemovePodSandbox, then nothing may be left.
//!
//! `cri_runc_pod_lifecycle` runs the flow with runc (no guest: it checks the client, the
//! containerd configuration and the images); `cri_podvisor_pod_lifecycle` with podvisor,
//! where the sandbox container brings up the pod's VM (no pause process) and both app
//! containers join it: one shim process, one VM.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cni::{cni_plugins_installed, CniNetwork};
use common::containerd::{
    have_tools, import_cri_images, mounts_below, runc_shim_pids, shim_pids, skip, Containerd,
    ContainerdOptions, CRI_HANDLER_PODVISOR, CRI_HANDLER_RUNC, IMAGE, RUN_TIMEOUT,
};
use common::{guest_artifacts, temp_path};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

type Client = RuntimeServiceClient<Channel>;

/// A CRI v1 client on containerd's socket `sock`, with the tokio runtime that drives it.
fn cri_client(sock: &Path) -> (tokio::runtime::Runtime, Client) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sock = sock.to_path_buf();
    let channel = rt
        .block_on(
            // The URI is a placeholder: every connection goes to the Unix socket.
            Endpoint::try_from("http://[::1]:50051")
                .unwrap()
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let sock = sock.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(sock).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                })),
        )
        .expect("connect to containerd's CRI socket");
    (rt, RuntimeServiceClient::new(channel))
}

/// A request with a deadline.
fn req<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

const CALL: Duration = Duration::from_secs(60);

/// A pod with PID and IPC namespaces of its own, using the node's network unless
/// `pod_network` (then CNI gives it a network namespace; containerd needs a CNI config),
/// with the pod-level `resources` the kubelet passes (containerd puts them on the sandbox
/// spec as `io.kubernetes.cri.sandbox-*` annotations).
/// What a test's pod asks for.
#[derive(Default)]
struct PodWants<'a> {
    annotations: &'a [(&'a str, &'a str)],
    resources: Option<LinuxContainerResources>,
    pod_network: bool,
}

fn pod_config(name: &str, log_dir: &Path, wants: &PodWants) -> PodSandboxConfig {
    let (annotations, pod_network) = (wants.annotations, wants.pod_network);
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: log_dir.to_string_lossy().into_owned(),
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: if pod_network {
                        NamespaceMode::Pod
                    } else {
                        NamespaceMode::Node
                    } as i32,
                    pid: NamespaceMode::Pod as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            resources: wants.resources.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A busybox container running `command`, its output logged to `<pod log dir>/<name>.log`.
fn container_config(name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// ExecSync of `cmd` in container `id` (2 minutes at most); panics on an RPC error.
fn exec_sync(
    client: &mut Client,
    rt: &tokio::runtime::Runtime,
    id: &str,
    cmd: &[&str],
) -> ExecSyncResponse {
    rt.block_on(client.exec_sync(req(
        ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 120,
        },
        Duration::from_secs(180),
    )))
    .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"))
    .into_inner()
}

/// What the flow observed, for the runtime-specific checks.
struct PodRun {
    sandbox_id: String,
    container_ids: Vec<String>,
}

/// RunPodSandbox → CreateContainer ×2 → StartContainer ×2 → ExecSync → ContainerStats,
/// with checks; `while_running` runs while both containers do. Stops and removes the pod
/// (also when a check fails) and checks that CRI lists nothing afterwards.
fn pod_lifecycle(
    test: &str,
    containerd: &Containerd,
    handler: &str,
    wants: PodWants,
    start_timeout: Duration,
    while_running: &dyn Fn(&mut Client, &tokio::runtime::Runtime, &PodRun),
) -> PodRun {
    let (rt, mut client) = cri_client(&containerd.sock());
    let version = rt
        .block_on(client.version(req(VersionRequest::default(), CALL)))
        .expect("CRI Version")
        .into_inner();
    eprintln!(
        "{test}: CRI {} {} (API {})",
        version.runtime_name, version.runtime_version, version.runtime_api_version
    );

    let log_dir = containerd.dir.join("pod-logs");
    std::fs::create_dir_all(&log_dir).unwrap();
    let config = pod_config(test, &log_dir, &wants);
    let started = Instant::now();
    let sandbox_id = rt
        .block_on(client.run_pod_sandbox(req(
            RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            },
            start_timeout,
        )))
        .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}"))
        .into_inner()
        .pod_sandbox_id;
    eprintln!(
        "{test}: RunPodSandbox took {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // From here on, the pod is stopped and removed whatever happens.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut run = PodRun {
            sandbox_id: sandbox_id.clone(),
            container_ids: Vec::new(),
        };
        for (name, command) in [
            ("sleeper", vec!["sleep", "3600"]),
            (
                "talker",
                vec!["sh", "-c", "echo hello-from-talker; exec sleep 3600"],
            ),
        ] {
            let id = rt
                .block_on(client.create_container(req(
                    CreateContainerRequest {
                        pod_sandbox_id: sandbox_id.clone(),
                        config: Some(container_config(name, &command)),
                        sandbox_config: Some(config.clone()),
                    },
                    start_timeout,
                )))
                .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
                .into_inner()
                .container_id;
            run.container_ids.push(id);
        }
        for id in &run.container_ids {
            rt.block_on(client.start_container(req(
                StartContainerRequest {
                    container_id: id.clone(),
                },
                start_timeout,
            )))
            .unwrap_or_else(|e| panic!("StartContainer {id}: {e}"));
        }
        for id in &run.container_ids {
            let status = rt
                .block_on(client.container_status(req(
                    ContainerStatusRequest {
                        container_id: id.clone(),
                        verbose: false,
                    },
                    CALL,
                )))
                .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"))
                .into_inner()
                .status
                .expect("container status");
            assert_eq!(
                status.state,
                ContainerState::ContainerRunning as i32,
                "container {id}: {status:?}"
            );
        }

        // The second container's stdout reaches its CRI log.
        let log = log_dir.join("talker.log");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // CRI log lines: `<time> stdout F <line>`.
            if text
                .lines()
                .any(|l| l.ends_with(" stdout F hello-from-talker"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} holds {text:?}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }

        // ExecSync in the first container: output and exit codes.
        let exec =
            |client: &mut Client, cmd: &[&str]| exec_sync(client, &rt, &run.container_ids[0], cmd);
        let hi = exec(&mut client, &["echo", "hi"]);
        assert_eq!(
            (hi.exit_code, String::from_utf8_lossy(&hi.stdout).as_ref()),
            (0, "hi\n"),
            "stderr: {}",
            String::from_utf8_lossy(&hi.stderr)
        );
        let fail = exec(&mut client, &["sh", "-c", "echo oops >&2; exit 7"]);
        assert_eq!(
            (
                fail.exit_code,
                String::from_utf8_lossy(&fail.stderr).as_ref()
            ),
            (7, "oops\n")
        );

        // ContainerStats: the sleeping container uses some memory.
        let stats = rt
            .block_on(client.container_stats(req(
                ContainerStatsRequest {
                    container_id: run.container_ids[0].clone(),
                },
                CALL,
            )))
            .expect("ContainerStats")
            .into_inner()
            .stats
            .expect("stats");
        let memory = stats
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes.as_ref())
            .map(|v| v.value)
            .unwrap_or(0);
        eprintln!("{test}: ContainerStats: working set {memory} bytes");
        assert!(memory > 0, "no memory usage in {stats:?}");

        while_running(&mut client, &rt, &run);
        run
    }));

    let stop = rt.block_on(client.stop_pod_sandbox(req(
        StopPodSandboxRequest {
            pod_sandbox_id: sandbox_id.clone(),
        },
        Duration::from_secs(300),
    )));
    // Stopped, not yet removed: the sandbox is NOTREADY and every container EXITED.
    let stopped_states = if result.is_ok() && stop.is_ok() {
        let sandbox = rt
            .block_on(client.pod_sandbox_status(req(
                PodSandboxStatusRequest {
                    pod_sandbox_id: sandbox_id.clone(),
                    verbose: false,
                },
                CALL,
            )))
            .map(|r| r.into_inner().status.map(|s| s.state));
        let containers = rt
            .block_on(client.list_containers(req(
                ListContainersRequest {
                    filter: Some(ContainerFilter {
                        pod_sandbox_id: sandbox_id.clone(),
                        ..Default::default()
                    }),
                },
                CALL,
            )))
            .map(|r| {
                r.into_inner()
                    .containers
                    .iter()
                    .map(|c| c.state)
                    .collect::<Vec<_>>()
            });
        Some((sandbox, containers))
    } else {
        None
    };
    let remove = rt.block_on(client.remove_pod_sandbox(req(
        RemovePodSandboxRequest {
            pod_sandbox_id: sandbox_id.clone(),
        },
        Duration::from_secs(300),
    )));
    let run = match result {
        Ok(run) => run,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    stop.expect("StopPodSandbox");
    if let Some((sandbox, containers)) = stopped_states {
        assert_eq!(
            sandbox.expect("PodSandboxStatus after StopPodSandbox"),
            Some(PodSandboxState::SandboxNotready as i32)
        );
        assert_eq!(
            containers.expect("ListContainers after StopPodSandbox"),
            vec![ContainerState::ContainerExited as i32; 2]
        );
    }
    remove.expect("RemovePodSandbox");

    assert_no_pods(&rt, &mut client);
    let containers = rt
        .block_on(client.list_containers(req(ListContainersRequest::default(), CALL)))
        .expect("ListContainers")
        .into_inner()
        .containers;
    assert!(containers.is_empty(), "containers left: {containers:?}");
    run
}

/// CRI lists no pod.
fn assert_no_pods(rt: &tokio::runtime::Runtime, client: &mut Client) {
    let pods = rt
        .block_on(client.list_pod_sandbox(req(ListPodSandboxRequest::default(), CALL)))
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert!(pods.is_empty(), "pods left: {pods:?}");
}

/// No task, no mount and no pod state of podvisor left.
fn assert_nothing_left(containerd: &Containerd) {
    assert_no_tasks_or_mounts(containerd);
    assert_eq!(
        std::fs::read_dir(containerd.run_dir())
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "state left under {}",
        containerd.run_dir().display()
    );
}

/// Waits up to a minute for `pids()` to be empty.
fn wait_gone(what: &str, pids: impl Fn() -> Vec<u32>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pids().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(pids(), Vec::<u32>::new(), "{what} left running");
}

/// Nothing of containerd's tasks left: no tasks in the CRI namespace, no mounts under
/// containerd's directory or the shims' run dir.
fn assert_no_tasks_or_mounts(containerd: &Containerd) {
    let tasks = containerd.ctr(&["-n", "k8s.io", "task", "ls", "-q"]);
    assert_eq!(
        String::from_utf8_lossy(&tasks.stdout).trim(),
        "",
        "tasks left"
    );
    for dir in [containerd.dir.clone(), containerd.run_dir()] {
        assert_eq!(mounts_below(&dir), Vec::<String>::new(), "mounts left");
    }
}

/// A CRI-enabled private containerd whose pods get their network from a CNI bridge network
/// of the test (containerd goes first on drop, then the bridge).
struct CriWithCni {
    containerd: Containerd,
    cni: CniNetwork,
}

/// Starts containerd with CRI and a CNI network in `dir`, images imported; None (after a
/// SKIP message) without the CNI plugins.
fn start_cri_with_cni(
    test: &str,
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
    podvisor_config: Option<String>,
) -> Option<CriWithCni> {
    if !cni_plugins_installed() {
        skip(
            test,
            "CNI plugins missing in /usr/lib/cni (make deps: containernetworking-plugins)",
        );
        return None;
    }
    let cni = CniNetwork::write(dir);
    let options = ContainerdOptions {
        cri: true,
        podvisor_config,
        cni_conf_dir: Some(cni.conf_dir.clone()),
        ..Default::default()
    };
    let containerd = Containerd::start_with(dir, kernel, initrd, options);
    import_cri_images(&containerd, &dir.join("images"));
    Some(CriWithCni { containerd, cni })
}

/// [`start_cri_with_cni`] for a test that needs no guest (the podvisor handler's kernel and
/// initrd do not exist: the shim must fail, or refuse, before it boots anything).
fn start_cri_without_guest(
    test: &str,
    dir: &Path,
    podvisor_config: Option<String>,
) -> Option<CriWithCni> {
    if !have_tools(test) {
        return None;
    }
    let missing = dir.join("no-kernel");
    start_cri_with_cni(test, dir, &missing, &missing, podvisor_config)
}

/// Serves one HTTP answer `body` on `ip` (port chosen by the kernel); the thread returns the
/// request's first line, or None when nobody came within `timeout`.
fn serve_once(
    ip: Ipv4Addr,
    body: &'static str,
    timeout: Duration,
) -> (u16, std::thread::JoinHandle<Option<String>>) {
    let listener = TcpListener::bind((ip, 0)).expect("bind the test HTTP server");
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        let (mut conn, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let answer = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(answer.as_bytes());
        String::from_utf8_lossy(&request)
            .lines()
            .next()
            .map(String::from)
    });
    (port, thread)
}

/// The pod's network from CNI, both ways: the sandbox has an address in the CNI subnet; its
/// first container fetches a page from a server of the test on the bridge (gateway)
/// address; the test connects to a `nc -l` in the pod.
fn check_pod_network(
    test: &str,
    client: &mut Client,
    rt: &tokio::runtime::Runtime,
    run: &PodRun,
    cni: &CniNetwork,
) {
    let sandbox = rt
        .block_on(client.pod_sandbox_status(req(
            PodSandboxStatusRequest {
                pod_sandbox_id: run.sandbox_id.clone(),
                verbose: true,
            },
            CALL,
        )))
        .expect("PodSandboxStatus")
        .into_inner();
    let status = sandbox.status.as_ref().expect("sandbox status");
    let ip: Ipv4Addr = status
        .network
        .as_ref()
        .map(|n| n.ip.as_str())
        .unwrap_or("")
        .parse()
        .unwrap_or_else(|_| panic!("no pod IP in {status:?}"));
    eprintln!("{test}: pod IP {ip} (CNI bridge {})", cni.bridge);
    assert!(cni.contains(ip), "pod IP {ip} outside {}/24", cni.subnet);

    let exec =
        |client: &mut Client, cmd: &[&str]| exec_sync(client, rt, &run.container_ids[0], cmd);
    // Pod → host.
    let (port, server) = serve_once(cni.gateway, "hello-from-host", Duration::from_secs(150));
    let url = format!("http://{}:{port}/pod-network", cni.gateway);
    let got = exec(client, &["wget", "-q", "-O", "-", &url]);
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        "hello-from-host",
        "wget {url}: exit {}, stderr {}",
        got.exit_code,
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(
        server.join().unwrap().as_deref(),
        Some("GET /pod-network HTTP/1.1")
    );
    // A listener in the pod, started in the background, answering `line` once on `port`.
    let serve_in_pod = |client: &mut Client, port: u16, line: &str| {
        let script =
            format!("(echo {line} | nc -l -p {port} >/dev/null 2>&1) >/dev/null 2>&1 </dev/null &");
        assert_eq!(exec(client, &["sh", "-c", &script]).exit_code, 0);
    };
    // Host → pod.
    serve_in_pod(client, 8080, "hello-from-pod");
    let text = first_line(&format!("{ip}:8080"), || {
        TcpStream::connect_timeout(&(ip, 8080).into(), Duration::from_secs(5))
    });
    assert_eq!(text, "hello-from-pod\n");

    // PortForward as containerd serves it: a dial of 127.0.0.1:<port> inside the pod's
    // network namespace reaches the pod's listener (with podvisor, in the VM).
    let netns = netns_path_of(&sandbox);
    serve_in_pod(client, 8081, "hello-via-forward");
    let ns = podvisor_shim::Netns::open(&netns).unwrap();
    let text = first_line(&format!("127.0.0.1:8081 in {}", netns.display()), || {
        ns.run("test-port-forward", || {
            TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, 8081).into(), Duration::from_secs(5))
        })
        .unwrap()
    });
    assert_eq!(text, "hello-via-forward\n");
}

/// The first line a listener at `what` answers on a connection `dial` makes, retried for up
/// to a minute while the listener comes up.
fn first_line(what: &str, dial: impl Fn() -> std::io::Result<TcpStream>) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = dial().and_then(|mut conn| {
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut text = String::new();
            let mut buf = [0u8; 64];
            while !text.contains('\n') {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            Ok(text)
        });
        match attempt {
            Ok(text) if !text.is_empty() => return text,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no answer from {what}: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
}

/// The pod's network namespace, from containerd's verbose sandbox status.
fn netns_path_of(sandbox: &PodSandboxStatusResponse) -> PathBuf {
    let info: serde_json::Value =
        serde_json::from_str(sandbox.info.get("info").expect("verbose info")).unwrap();
    info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .and_then(|nss| nss.iter().find(|ns| ns["type"] == "network"))
        .and_then(|ns| ns["path"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no network namespace path in {info}"))
}

/// The same flow with runc: no guest needed. The pod gets its network from CNI (bridge
/// plugin), checked both ways.
#[test]
fn cri_runc_pod_lifecycle() {
    const TEST: &str = "cri_runc_pod_lifecycle";
    if !have_tools(TEST) {
        return;
    }
    if !Path::new("/usr/sbin/runc").is_file() && !Path::new("/usr/bin/runc").is_file() {
        return skip(TEST, "runc missing (apt-get install runc)");
    }
    let dir = temp_path("cri-runc");
    // No guest: the podvisor handler is configured but not used.
    let missing = dir.join("no-kernel");
    // Not destructured: containerd must stop before the bridge goes.
    let Some(env) = start_cri_with_cni(TEST, &dir, &missing, &missing, None) else {
        return;
    };
    let (containerd, cni) = (&env.containerd, &env.cni);
    let sock = containerd.sock();
    pod_lifecycle(
        TEST,
        containerd,
        CRI_HANDLER_RUNC,
        PodWants {
            pod_network: true,
            ..Default::default()
        },
        Duration::from_secs(120),
        &|client, rt, run| {
            // runc's shim serves the whole pod too.
            assert_eq!(runc_shim_pids(&sock).len(), 1, "one runc shim per pod");
            check_pod_network(TEST, client, rt, run, cni);
        },
    );
    wait_gone("runc shim", || runc_shim_pids(&sock));
    assert_no_tasks_or_mounts(containerd);
}

/// Threads named `vcpu<N>` of process `pid` (one per vCPU of the VMs it hosts).
fn vcpu_threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|c| c.trim().to_string())
                .filter(|c| c.starts_with("vcpu"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The pod on podvisor: the sandbox container boots the VM, both app containers join it.
#[test]
fn cri_podvisor_pod_lifecycle() {
    const TEST: &str = "cri_podvisor_pod_lifecycle";
    let Some(guest) = guest_artifacts(TEST) else {
        return;
    };
    let initrd = guest.initrd.with_file_name("agent-test.cpio");
    if !common::require_file(TEST, &initrd, "run `make rootfs`") {
        return;
    }
    if !have_tools(TEST) {
        return;
    }
    let _vms = common::vm_slots::take(1);
    let dir = temp_path("cri-podvisor");
    // The pod needs more memory than the default, within this file's limit.
    let config = Some(
        "memory_mib = 256\nmax_memory_mib = 512\nmax_vcpus = 4\nmemory_step_mib = 64\n\
         agent_timeout_secs = 900\n"
            .into(),
    );
    // Not destructured: containerd must stop before the bridge goes.
    let Some(env) = start_cri_with_cni(TEST, &dir, &guest.kernel, &initrd, config) else {
        return;
    };
    let containerd = &env.containerd;

    let sock = containerd.sock();
    let run = pod_lifecycle(
        TEST,
        containerd,
        CRI_HANDLER_PODVISOR,
        // 0.8 CPUs and 200 MiB: the shim sizes the VM to 1 vCPU online (more parked, up to
        // max_vcpus and the host's CPUs) and 200 + 64 MiB rounded up to 64 MiB steps =
        // 320 MiB (its defaults: 256 MiB).
        PodWants {
            resources: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 80_000,
                memory_limit_in_bytes: 200 << 20,
                ..Default::default()
            }),
            pod_network: true,
            ..Default::default()
        },
        RUN_TIMEOUT,
        &|client, rt, run| {
            // One shim process hosts the sandbox and both containers, with one VM.
            let pids = shim_pids(&sock);
            assert_eq!(pids.len(), 1, "podvisor shims: {pids:?}");
            // max_vcpus = 4, at most the host's CPUs: this host's 2 give one parked vCPU.
            let slots = host_cpus().clamp(2, 4);
            let expected: Vec<String> = (0..slots).map(|n| format!("vcpu{n}")).collect();
            assert_eq!(
                vcpu_threads(pids[0]),
                expected,
                "one VM with its vCPU online and the others parked"
            );
            // Every thread of the shim (VMM, vCPUs, workers) is in the pod's cgroup (the
            // sandbox's cgroupsPath ends with its id), in every hierarchy, and the pod's
            // memory cgroup is charged with the process's anonymous memory (guest pages it
            // touched and the VMM's; a template clone's unmodified pages are the template
            // file's page cache, charged where the template was built).
            let shim = pids[0];
            for task in std::fs::read_dir(format!("/proc/{shim}/task"))
                .unwrap()
                .flatten()
            {
                let cgroups = std::fs::read_to_string(task.path().join("cgroup")).unwrap();
                for line in cgroups.lines() {
                    assert!(
                        line.ends_with(&run.sandbox_id),
                        "thread {:?} of the shim: {line}",
                        task.file_name()
                    );
                }
            }
            let memory_cgroup = std::fs::read_to_string(format!("/proc/{shim}/cgroup"))
                .unwrap()
                .lines()
                .find_map(|l| {
                    let (_, rest) = l.split_once(':')?;
                    let (controllers, path) = rest.split_once(':')?;
                    controllers
                        .split(',')
                        .any(|c| c == "memory")
                        .then(|| path.to_string())
                });
            if let Some(path) = memory_cgroup {
                let usage = std::fs::read_to_string(format!(
                    "/sys/fs/cgroup/memory{path}/memory.usage_in_bytes"
                ))
                .unwrap();
                let usage: u64 = usage.trim().parse().unwrap();
                let rollup = std::fs::read_to_string(format!("/proc/{shim}/smaps_rollup")).unwrap();
                let anon_kib: u64 = rollup
                    .lines()
                    .find_map(|l| l.strip_prefix("Anonymous:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap();
                eprintln!(
                    "pod memory cgroup: {} KiB charged, shim anonymous {anon_kib} KiB",
                    usage >> 10
                );
                // Less than what the shim allocated before it joined (its start-up).
                assert!(
                    usage >> 10 >= anon_kib * 3 / 4,
                    "pod memory cgroup charged {} KiB, the shim has {anon_kib} KiB anonymous",
                    usage >> 10
                );
            }
            // Each container has a cgroup namespace of its own (the guest is cgroup v2,
            // whatever this host is): its cgroup is the root it sees.
            let cgroup = exec_sync(
                client,
                rt,
                &run.container_ids[1],
                &["cat", "/proc/self/cgroup"],
            );
            assert_eq!(String::from_utf8_lossy(&cgroup.stdout), "0::/\n");
            let nproc = exec_sync(client, rt, &run.container_ids[1], &["nproc"]);
            assert_eq!(
                String::from_utf8_lossy(&nproc.stdout).trim(),
                "1",
                "guest CPUs online"
            );
            // The pod's memory limit sized the VM: the guest sees about 320 MiB.
            let meminfo = exec_sync(client, rt, &run.container_ids[1], &["cat", "/proc/meminfo"]);
            let text = String::from_utf8_lossy(&meminfo.stdout);
            let total_kib: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no MemTotal in {text:?}"));
            assert!(
                (256 * 1024..=320 * 1024).contains(&total_kib),
                "guest MemTotal {total_kib} kB for a 320 MiB VM"
            );
            memory_comes_back(client, rt, run, shim);
            memory_resizes(client, rt, run, total_kib);
            cpus_resize(client, rt, run);
        },
    );

    // Nothing left: no shim, no mounts, the pod's state dir gone.
    wait_gone("podvisor shim", || shim_pids(&sock));
    let run_dir: PathBuf = containerd.run_dir();
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "state of pod {} left under {}: {left:?}",
        run.sandbox_id,
        run_dir.display()
    );
    assert_no_tasks_or_mounts(containerd);
    let log = containerd.log();
    assert!(!log.contains("publishing /tasks"), "an event failed");
}

/// A `kB` field of `/proc/meminfo` or `smaps_rollup` text.
fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The shim's anonymous memory: guest pages it holds privately (touched RAM, copies of a
/// template's pages) and its own heap. Unlike PSS, it does not change when another process
/// that shares the shim's file pages (its binary, a template) starts or exits.
fn anon_kib(shim: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{shim}/smaps_rollup")).unwrap();
    kib_field(&rollup, "Anonymous").expect("Anonymous in smaps_rollup")
}

/// The guest's MemTotal as container `id` sees it, kB.
fn guest_mem_total(client: &mut Client, rt: &tokio::runtime::Runtime, id: &str) -> u64 {
    let meminfo = exec_sync(client, rt, id, &["cat", "/proc/meminfo"]);
    let text = String::from_utf8_lossy(&meminfo.stdout);
    kib_field(&text, "MemTotal").unwrap_or_else(|| panic!("no MemTotal in {text:?}"))
}

/// A container touches 32 MiB and frees it: the pod's host memory (the shim's anonymous
/// memory) grows,
/// then comes back near where it was once the guest reports the freed memory on its
/// balloon.
fn memory_comes_back(client: &mut Client, rt: &tokio::runtime::Runtime, run: &PodRun, shim: u32) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let before = anon_kib(shim);
    // The peak while the guest touches the memory (the guest may give some back before
    // the exec's answer arrives).
    let peak = AtomicU64::new(before);
    let done = AtomicBool::new(false);
    let dd = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(anon_kib(shim), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let dd = exec_sync(
            client,
            rt,
            &run.container_ids[1],
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=32M", "count=1"],
        );
        done.store(true, Ordering::SeqCst);
        dd
    });
    assert_eq!(
        dd.exit_code,
        0,
        "dd: {}",
        String::from_utf8_lossy(&dd.stderr)
    );
    let freed = Instant::now();
    let peak = peak.load(Ordering::SeqCst);
    eprintln!("alloc-free: shim anonymous memory {before} KiB before, {peak} KiB at the peak");
    assert!(
        peak >= before + 16 * 1024,
        "touching 32 MiB in the guest grew the shim's anonymous memory from {before} to {peak} KiB only"
    );
    let deadline = freed + Duration::from_secs(180);
    loop {
        let now = anon_kib(shim);
        if now <= before + 12 * 1024 {
            eprintln!(
                "alloc-free: shim anonymous memory back to {now} KiB {:.1} s after the free",
                freed.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shim's anonymous memory is still {now} KiB (before: {before}, at the peak: {peak}): the \
             guest did not give the freed memory back"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// UpdateContainerResources of container `id` to `linux`; returns how long it took.
fn update_resources(
    client: &mut Client,
    rt: &tokio::runtime::Runtime,
    id: &str,
    linux: LinuxContainerResources,
) -> Duration {
    let t = Instant::now();
    let what = format!("UpdateContainerResources {id} to {linux:?}");
    rt.block_on(client.update_container_resources(req(
        UpdateContainerResourcesRequest {
            container_id: id.to_string(),
            linux: Some(linux),
            ..Default::default()
        },
        Duration::from_secs(900),
    )))
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    t.elapsed()
}

/// UpdateContainerResources resizes the pod's VM: once every container has a memory limit
/// the VM follows their sum (+ the guest's overhead, in 64 MiB steps), down and back up to
/// the size it was built with. `full_kib` is the guest's MemTotal at that size.
fn memory_resizes(client: &mut Client, rt: &tokio::runtime::Runtime, run: &PodRun, full_kib: u64) {
    let update = |client: &mut Client, id: &str, mib: i64| {
        update_resources(
            client,
            rt,
            id,
            LinuxContainerResources {
                memory_limit_in_bytes: mib << 20,
                ..Default::default()
            },
        )
    };
    let (sleeper, talker) = (&run.container_ids[0], &run.container_ids[1]);
    let took = update(client, sleeper, 100);
    let total = guest_mem_total(client, rt, talker);
    eprintln!(
        "resize: one container limited ({:.2} s): guest MemTotal {total} kB",
        took.as_secs_f64()
    );
    assert_eq!(
        total, full_kib,
        "a container without a limit keeps the VM whole"
    );
    // 100 + 50 + 64 MiB → a 256 MiB VM: the balloon takes 64 MiB.
    let took = update(client, talker, 50);
    let lowered = guest_mem_total(client, rt, talker);
    eprintln!(
        "resize: VM 320 → 256 MiB took {:.2} s: guest MemTotal {lowered} kB",
        took.as_secs_f64()
    );
    assert_eq!(full_kib - lowered, 64 * 1024, "the guest lost 64 MiB");
    // 200 + 50 + 64 MiB → 320 MiB, the size it was built with.
    let took = update(client, sleeper, 200);
    let raised = guest_mem_total(client, rt, talker);
    eprintln!(
        "resize: VM 256 → 320 MiB took {:.2} s: guest MemTotal {raised} kB",
        took.as_secs_f64()
    );
    assert_eq!(raised, full_kib, "the guest has its memory back");
}

/// UpdateContainerResources resizes the pod's vCPUs: once every container has a CPU limit
/// the guest has ⌈Σ quota / period⌉ CPUs online, up to the VM's vCPUs (the pod booted with
/// 1 online, the others parked: raising to 2 starts a parked one).
fn cpus_resize(client: &mut Client, rt: &tokio::runtime::Runtime, run: &PodRun) {
    let update = |client: &mut Client, id: &str, quota: i64| {
        update_resources(
            client,
            rt,
            id,
            LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: quota,
                ..Default::default()
            },
        )
    };
    let online = |client: &mut Client| {
        let out = exec_sync(
            client,
            rt,
            &run.container_ids[1],
            &["sh", "-c", "cat /sys/devices/system/cpu/online; nproc"],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let online = lines.next().unwrap_or_default().to_string();
        let nproc = lines.next().unwrap_or_default().to_string();
        (online, nproc)
    };
    let (sleeper, talker) = (&run.container_ids[0], &run.container_ids[1]);
    let took = update(client, sleeper, 150_000);
    assert_eq!(
        online(client),
        ("0".to_string(), "1".to_string()),
        "one container without a CPU limit keeps the boot CPUs ({:.2} s)",
        took.as_secs_f64()
    );
    // 1.5 + 0.5 CPUs → 2 online: the parked vCPU starts.
    let took = update(client, talker, 50_000);
    let up = online(client);
    eprintln!(
        "resize: vCPUs 1 → 2 took {:.2} s: online {up:?}",
        took.as_secs_f64()
    );
    assert_eq!(up, ("0-1".to_string(), "2".to_string()));
    // 0.5 + 0.5 CPUs → 1 online.
    let took = update(client, sleeper, 50_000);
    let down = online(client);
    eprintln!(
        "resize: vCPUs 2 → 1 took {:.2} s: online {down:?}",
        took.as_secs_f64()
    );
    assert_eq!(down, ("0".to_string(), "1".to_string()));
    // And back: an offlined vCPU comes online again.
    let took = update(client, sleeper, 120_000);
    let again = online(client);
    eprintln!(
        "resize: vCPUs 1 → 2 again took {:.2} s: online {again:?}",
        took.as_secs_f64()
    );
    assert_eq!(again, ("0-1".to_string(), "2".to_string()));
}

/// The host's online CPUs.
fn host_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => Some(b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1),
                    None => r.parse::<usize>().ok().map(|_| 1),
                })
                .sum::<Option<usize>>()
        })
        .unwrap_or(1)
}

/// No guest needed: a podvisor config file with an unknown key makes RunPodSandbox fail with
/// a message naming the file and the key (the file comes from the `podvisor` handler's
/// `ConfigPath` runtime option), and nothing is left behind; `ctr run
/// --runtime-config-path` passes its file the same way.
#[test]
fn cri_podvisor_bad_config_fails_cleanly() {
    const TEST: &str = "cri_podvisor_bad_config_fails_cleanly";
    let dir = temp_path("cri-badconfig");
    let config = Some("vcpus = 1\nmemory = 512\n".into());
    // Not destructured: containerd must stop before the bridge goes.
    let Some(env) = start_cri_without_guest(TEST, &dir, config) else {
        return;
    };
    let containerd = &env.containerd;
    let config_path = containerd.podvisor_config_path();

    let (rt, mut client) = cri_client(&containerd.sock());
    let log_dir = dir.join("pod-logs");
    let err = rt
        .block_on(client.run_pod_sandbox(req(
            RunPodSandboxRequest {
                config: Some(pod_config(
                    TEST,
                    &log_dir,
                    &PodWants {
                        pod_network: true,
                        ..Default::default()
                    },
                )),
                runtime_handler: CRI_HANDLER_PODVISOR.into(),
            },
            Duration::from_secs(120),
        )))
        .expect_err("RunPodSandbox with a bad config file");
    eprintln!("{TEST}: RunPodSandbox: {}", err.message());
    assert!(
        err.message().contains(&config_path.display().to_string())
            && err.message().contains("unknown field `memory`"),
        "{err}"
    );
    wait_gone("podvisor shim", || shim_pids(&containerd.sock()));
    assert_no_pods(&rt, &mut client);

    // ctr run --runtime-config-path: the same runtime options.
    let (code, _, stderr) = common::containerd::run_bounded(
        containerd.ctr_cmd(&[
            "-n",
            common::containerd::CRI_NAMESPACE,
            "run",
            "--rm",
            "--runtime",
            common::containerd::RUNTIME,
            "--runtime-config-path",
            config_path.to_str().unwrap(),
            IMAGE,
            "badconfig",
            "true",
        ]),
        Duration::from_secs(120),
    );
    eprintln!("{TEST}: ctr run: {}", stderr.trim());
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains(&config_path.display().to_string())
            && stderr.contains("unknown field `memory`"),
        "{stderr}"
    );
    wait_gone("podvisor shim", || shim_pids(&containerd.sock()));
    let _ = containerd.ctr(&["-n", "k8s.io", "container", "rm", "badconfig"]);
    assert_nothing_left(containerd);
}

/// A pod that asks for the host's network, PID or IPC namespace is refused at RunPodSandbox
/// with an error naming the Kubernetes field (a VM cannot share them with the host), and
/// nothing of it stays. No guest is needed: the shim refuses the spec before it boots.
#[test]
fn cri_podvisor_refuses_host_namespaces() {
    const TEST: &str = "cri_podvisor_refuses_host_namespaces";
    let dir = temp_path("cri-hostns");
    // Not destructured: containerd must stop before the bridge goes.
    let Some(env) = start_cri_without_guest(TEST, &dir, None) else {
        return;
    };
    let containerd = &env.containerd;
    let (rt, mut client) = cri_client(&containerd.sock());
    let log_dir = dir.join("pod-logs");
    let (node, pod) = (NamespaceMode::Node as i32, NamespaceMode::Pod as i32);
    for (field, network, pid, ipc) in [
        ("hostNetwork", node, pod, pod),
        ("hostPID", pod, node, pod),
        ("hostIPC", pod, pod, node),
    ] {
        let mut config = pod_config(
            &format!("{TEST}-{}", field.to_lowercase()),
            &log_dir,
            &PodWants {
                pod_network: true,
                ..Default::default()
            },
        );
        let options = config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
            .unwrap();
        (options.network, options.pid, options.ipc) = (network, pid, ipc);
        let err = rt
            .block_on(client.run_pod_sandbox(req(
                RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: CRI_HANDLER_PODVISOR.into(),
                },
                Duration::from_secs(120),
            )))
            .expect_err(field);
        eprintln!("{TEST}: {field}: {}", err.message());
        assert!(
            err.message().contains(field) && err.message().contains("own VM"),
            "{field}: {err}"
        );
    }
    wait_gone("podvisor shim", || shim_pids(&containerd.sock()));
    assert_no_pods(&rt, &mut client);
    assert_nothing_left(containerd);
}

/// Pod networking on podvisor: CNI's bridge plugin makes the pod's network
/// namespace, the shim wires it to the VM's NIC (tap + tc redirect) and the agent configures
/// the guest NIC; then the same checks as with runc, both ways. The pod starts as a clone
/// of a template with one NIC (templates are on by default): the agent gives the NIC the
/// veth's MAC.
#[test]
fn cri_podvisor_pod_network() {
    const TEST: &str = "cri_podvisor_pod_network";
    let Some(guest) = guest_artifacts(TEST) else {
        return;
    };
    let initrd = guest.initrd.with_file_name("agent-test.cpio");
    if !common::require_file(TEST, &initrd, "run `make rootfs`") || !have_tools(TEST) {
        return;
    }
    let _vms = common::vm_slots::take(1);
    let dir = temp_path("cri-podvisor-net");
    let config = Some("agent_timeout_secs = 900\n".into());
    // Not destructured: containerd must stop before the bridge goes.
    let Some(env) = start_cri_with_cni(TEST, &dir, &guest.kernel, &initrd, config) else {
        return;
    };
    let (containerd, cni) = (&env.containerd, &env.cni);
    let sock = containerd.sock();
    pod_lifecycle(
        TEST,
        containerd,
        CRI_HANDLER_PODVISOR,
        // 1.5 CPUs: a 2-vCPU VM (this host's 2 CPUs are its vCPU slots), a clone of the
        // one-vCPU template of its memory size with the second vCPU brought online after
        // the restore, instead of a cold boot of a template of its own.
        PodWants {
            pod_network: true,
            resources: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 150_000,
                ..Default::default()
            }),
            ..Default::default()
        },
        RUN_TIMEOUT,
        &|client, rt, run| {
            check_pod_network(TEST, client, rt, run, cni);
            if host_cpus() >= 2 {
                let nproc = exec_sync(client, rt, &run.container_ids[1], &["nproc"]);
                assert_eq!(String::from_utf8_lossy(&nproc.stdout).trim(), "2");
                let log = containerd.log();
                assert!(
                    log.contains("2 vCPUs online after the restore"),
                    "the 2-vCPU pod did not start from the one-vCPU template"
                );
            }
        },
    );
    wait_gone("podvisor shim", || shim_pids(&sock));
    assert_no_tasks_or_mounts(containerd);
}
