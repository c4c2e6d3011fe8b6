//! A private containerd for the guest-tier tests (Debian's `/usr/bin/containerd`,
//! root/state/sockets in a temp dir) that finds `containerd-shim-podvisor-v2` on its PATH,
//! a busybox OCI image built here and imported with `ctr image import`, and the checks that
//! nothing is left behind.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::kvm_required;

pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const CTR: &str = "/usr/bin/ctr";
pub const BUSYBOX: &str = "/bin/busybox";
pub const IMAGE: &str = "docker.io/library/busybox:local";
pub const RUNTIME: &str = "io.containerd.podvisor.v2";
pub const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-podvisor-v2");
/// `ctr run` of one container, VM boot included (minutes on a nested-KVM host).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(900);
/// The CRI plugin's containerd namespace.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The CRI sandbox image: the busybox layer with `sleep` as its entrypoint (runc runs it as
/// the pod's pause process; podvisor runs no pause process).
pub const PAUSE_IMAGE: &str = "localhost/podvisor-test/pause:local";
/// CRI runtime handlers of a CRI-enabled private containerd.
pub const CRI_HANDLER_PODVISOR: &str = "podvisor";
pub const CRI_HANDLER_RUNC: &str = "runc";

/// What a private containerd serves besides the task API.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// Enable the CRI plugin (socket `containerd.sock`, CRI v1 and v1alpha2) with runtime
    /// handlers `runc` (the default) and `podvisor` (pod annotations `io.podvisor.*`),
    /// sandbox image [`PAUSE_IMAGE`], streaming server on a free port. Without `cni_conf_dir`, pods
    /// must use host networking.
    pub cri: bool,
    /// The CRI plugin's CNI `conf_dir` (e.g. [`super::cni::CniNetwork::conf_dir`]), with the
    /// plugins from [`super::cni::CNI_BIN_DIR`]: pods may then use pod networking. None: an
    /// empty conf dir of its own.
    pub cni_conf_dir: Option<PathBuf>,
    /// Written to `<dir>/podvisor.toml` and given to the `podvisor` CRI handler as its
    /// `ConfigPath` runtime option.
    pub podvisor_config: Option<String>,
    /// The shims' `PODVISOR_TEMPLATE_DIR` (templates are on by default); `None`: the one
    /// directory every test shares ([`shared_template_dir`]), so the first pod of a test run
    /// builds the template and every later pod, in any test, restores a clone of it.
    pub template_dir: Option<PathBuf>,
}

/// The template directory the tests share, under cargo's target dir (a rebuilt kernel or
/// initramfs changes the template key, so a stale template is never restored).
pub fn shared_template_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("podvisor-templates")
}

/// A private containerd; killed, and its temp dir removed, on drop (also on failure).
pub struct Containerd {
    pub dir: PathBuf,
    child: Child,
    cri: bool,
    run_dir: PathBuf,
}

impl Containerd {
    pub fn sock(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }
    /// The shims' `PODVISOR_RUN_DIR`: `<dir>/podvisor-run`, or with the CRI plugin a short
    /// path of its own (CRI's 64-character pod ids must fit in the pod's Unix socket paths,
    /// at most 107 bytes).
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir.clone()
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    pub fn start(dir: &Path, kernel: &Path, initrd: &Path) -> Containerd {
        Self::start_with(dir, kernel, initrd, ContainerdOptions::default())
    }

    /// The podvisor config file given to the `podvisor` CRI handler.
    pub fn podvisor_config_path(&self) -> PathBuf {
        self.dir.join("podvisor.toml")
    }

    pub fn start_with(
        dir: &Path,
        kernel: &Path,
        initrd: &Path,
        options: ContainerdOptions,
    ) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("config.toml");
        let mut text = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n{disabled}\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
             [debug]\n  level = \"debug\"\n",
            d = dir.display(),
            disabled = if options.cri {
                ""
            } else {
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
            },
        );
        if let Some(body) = &options.podvisor_config {
            std::fs::write(dir.join("podvisor.toml"), body).unwrap();
        }
        if options.cri {
            let cri = "[plugins.\"io.containerd.grpc.v1.cri\"";
            let runtimes = format!("{cri}.containerd.runtimes");
            text += &format!(
                "{cri}]\n  sandbox_image = \"{PAUSE_IMAGE}\"\n\
                 \x20 restrict_oom_score_adj = true\n\
                 \x20 stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n\
                 {cri}.containerd]\n  default_runtime_name = \"{CRI_HANDLER_RUNC}\"\n\
                 {runtimes}.{CRI_HANDLER_RUNC}]\n  runtime_type = \"io.containerd.runc.v2\"\n\
                 {runtimes}.{CRI_HANDLER_PODVISOR}]\n  runtime_type = \"{RUNTIME}\"\n\
                 \x20 pod_annotations = [\"io.podvisor.*\"]\n\
                 {cni}]\n  bin_dir = \"{bin}\"\n  conf_dir = \"{conf}\"\n",
                cni = format_args!("{cri}.cni"),
                bin = match &options.cni_conf_dir {
                    Some(_) => PathBuf::from(super::cni::CNI_BIN_DIR),
                    None => dir.join("cni/bin"),
                }
                .display(),
                conf = options
                    .cni_conf_dir
                    .clone()
                    .unwrap_or_else(|| dir.join("cni/conf"))
                    .display(),
            );
            if options.podvisor_config.is_some() {
                text += &format!(
                    "{runtimes}.{CRI_HANDLER_PODVISOR}.options]\n  ConfigPath = \"{}\"\n",
                    dir.join("podvisor.toml").display()
                );
            }
        }
        std::fs::write(&config, text).unwrap();
        let run_dir = if options.cri {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            PathBuf::from(format!("/tmp/pvr-{}-{n}", std::process::id()))
        } else {
            dir.join("podvisor-run")
        };
        let shim_dir = Path::new(SHIM).parent().unwrap();
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new(CONTAINERD)
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("PODVISOR_KERNEL", kernel)
            .env("PODVISOR_INITRD", initrd)
            .env("PODVISOR_RUN_DIR", &run_dir)
            .env(
                "PODVISOR_TEMPLATE_DIR",
                options
                    .template_dir
                    .clone()
                    .unwrap_or_else(shared_template_dir),
            )
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            dir: dir.to_path_buf(),
            child,
            cri: options.cri,
            run_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(CTR);
        cmd.arg("-a").arg(self.sock()).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `ctr run --rm --runtime io.containerd.podvisor.v2 busybox <id> echo hello`, bounded
    /// by `timeout`; returns (exit status, stdout, stderr).
    pub fn run_rm_echo(&self, id: &str, timeout: Duration) -> (Option<i32>, String, String) {
        let cmd = self.ctr_cmd(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            id,
            "echo",
            "hello",
        ]);
        run_bounded(cmd, timeout)
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("run ctr")
    }
}

/// PIDs of processes running the shim binary on behalf of this containerd.
pub fn shim_pids(sock: &Path) -> Vec<u32> {
    pids_of("containerd-shim-podvisor-v2", sock)
}

/// A process's command line and its threads (`podvisor::shim::thread_states`), for
/// failure messages.
pub fn process_threads(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default();
    format!(
        "pid {pid}: {cmdline}{}",
        podvisor::shim::thread_states(Some(pid))
    )
}

/// PIDs of runc shims (`containerd-shim-runc-v2`) of this containerd.
pub fn runc_shim_pids(sock: &Path) -> Vec<u32> {
    pids_of("containerd-shim-runc-v2", sock)
}

/// PIDs of processes running `binary` with `sock` among their arguments.
fn pids_of(binary: &str, sock: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    let sock = sock.to_string_lossy().into_owned();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with(binary)) && args.iter().any(|a| a == &sock) {
            pids.push(pid);
        }
    }
    pids
}

/// Mount points at or below `dir`.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|t| *t == dir || t.starts_with(&format!("{dir}/")))
        .map(str::to_string)
        .collect()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- containerd log (tail) ----");
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("{}", lines[lines.len().saturating_sub(80)..].join("\n"));
            for console in find_files(&self.run_dir(), "console.log") {
                eprintln!(
                    "---- {} ----\n{}",
                    console.display(),
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
            }
        }
        if self.cri {
            // Containers a failed CRI test left (runc's outlive their shim): kill them.
            let tasks = self.ctr(&["-n", CRI_NAMESPACE, "task", "ls", "-q"]);
            for id in String::from_utf8_lossy(&tasks.stdout).split_whitespace() {
                let _ = self.ctr(&[
                    "-n",
                    CRI_NAMESPACE,
                    "task",
                    "kill",
                    "-a",
                    "-s",
                    "SIGKILL",
                    id,
                ]);
            }
        }
        // Shims this containerd started, then containerd itself.
        for pid in shim_pids(&self.sock())
            .into_iter()
            .chain(runc_shim_pids(&self.sock()))
        {
            // SAFETY: plain kill(2) of a process of this test's containerd.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut left = mounts_below(&self.dir);
        left.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for m in left {
            let c = std::ffi::CString::new(m).unwrap();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let mut left = mounts_below(&self.run_dir);
        left.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for m in left {
            let c = std::ffi::CString::new(m).unwrap();
            // SAFETY: umount2 of a path string; no memory is shared with the kernel after.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn find_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(find_files(&p, name));
            } else if p.file_name().is_some_and(|n| n == name) {
                out.push(p);
            }
        }
    }
    out
}

/// A busybox OCI image archive (one uncompressed layer: static busybox + applet links).
pub fn build_image(dir: &Path) -> PathBuf {
    super::image::build_image(dir).unwrap()
}

/// The busybox image archive named `name` with image config `config` (`Cmd`,
/// `Entrypoint`, ...).
pub fn build_image_as(dir: &Path, name: &str, config: &serde_json::Value) -> PathBuf {
    super::image::build_image_as(dir, name, config).unwrap()
}

/// Runs `cmd` to completion within `timeout` (killed after); returns (status, stdout, stderr).
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let collect = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = collect(child.stdout.take().map(|r| Box::new(r) as _));
    let err = collect(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + timeout;
    let mut timed_out = None;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            // What every process of the test (containerd, `shim start`, the shims) was
            // doing when the command hung, for the failure message.
            timed_out = Some(descendant_threads());
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = err.join().unwrap();
    if let Some(threads) = timed_out {
        stderr += &format!("\n[killed after {timeout:?}; the test's processes then:]{threads}");
    }
    (status.code(), out.join().unwrap(), stderr)
}

/// [`process_threads`] of every descendant of this test process (containerd is the
/// subreaper of its shims, so they are below it), one block each.
pub fn descendant_threads() -> String {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // After the name: state, then the parent's pid.
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    let me = std::process::id();
    let below_me = |mut pid: u32| {
        while let Some(&p) = parent.get(&pid) {
            if p == me {
                return true;
            }
            pid = p;
        }
        false
    };
    let mut pids: Vec<u32> = parent.keys().copied().filter(|&p| below_me(p)).collect();
    pids.sort_unstable();
    pids.iter()
        .map(|&p| format!("\n{}", process_threads(p)))
        .collect()
}

pub fn skip(test: &str, why: &str) {
    if kvm_required() {
        panic!("{test}: {why}");
    }
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
}

/// Whether containerd, ctr and busybox are here (skips `test` loudly when not).
pub fn have_tools(test: &str) -> bool {
    for (path, why) in [
        (Path::new(CONTAINERD), "apt-get install containerd"),
        (Path::new(CTR), "apt-get install containerd"),
        (Path::new(BUSYBOX), "apt-get install busybox-static"),
    ] {
        if !path.is_file() {
            skip(test, &format!("{} missing ({why})", path.display()));
            return false;
        }
    }
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "containerd needs root");
        return false;
    }
    true
}

/// Imports the busybox image into `containerd`.
pub fn import_image(containerd: &Containerd, dir: &Path) {
    let archive = build_image(dir);
    let import = containerd.ctr(&["image", "import", archive.to_str().unwrap()]);
    assert!(
        import.status.success(),
        "ctr image import: {}",
        String::from_utf8_lossy(&import.stderr)
    );
    let list = containerd.ctr(&["image", "ls", "-q"]);
    let images = String::from_utf8_lossy(&list.stdout);
    assert!(images.lines().any(|l| l == IMAGE), "images: {images}");
}

/// Imports the busybox image ([`IMAGE`]) and the CRI sandbox image ([`PAUSE_IMAGE`]) into
/// the CRI plugin's namespace.
pub fn import_cri_images(containerd: &Containerd, dir: &Path) {
    let pause = json!({"Env": ["PATH=/bin"], "Entrypoint": ["sleep", "86400"], "WorkingDir": "/"});
    for (name, archive) in [
        (IMAGE, build_image(&dir.join("busybox"))),
        (
            PAUSE_IMAGE,
            build_image_as(&dir.join("pause"), PAUSE_IMAGE, &pause),
        ),
    ] {
        let import = containerd.ctr(&[
            "-n",
            CRI_NAMESPACE,
            "image",
            "import",
            archive.to_str().unwrap(),
        ]);
        assert!(
            import.status.success(),
            "ctr image import {name}: {}",
            String::from_utf8_lossy(&import.stderr)
        );
    }
    let list = containerd.ctr(&["-n", CRI_NAMESPACE, "image", "ls", "-q"]);
    let images = String::from_utf8_lossy(&list.stdout);
    for name in [IMAGE, PAUSE_IMAGE] {
        assert!(images.lines().any(|l| l == name), "images: {images}");
    }
}

/// Waits until no shim of `containerd` runs; then checks that the pod's state dir `id` is
/// gone and nothing is mounted under the run dir.
/// The paths below `dir`, `depth` levels deep.
pub fn list_tree(dir: &Path, depth: usize, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        out.push(e.path().display().to_string());
        if depth > 1 && e.file_type().is_ok_and(|t| t.is_dir()) {
            list_tree(&e.path(), depth - 1, out);
        }
    }
}

pub fn assert_nothing_left(containerd: &Containerd, id: &str) {
    // Generous: with several guest tests at once on 2 cores a shim has been seen to need
    // over a minute between Shutdown and its exit.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    while !shim_pids(&containerd.sock()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = shim_pids(&containerd.sock());
    assert!(
        left.is_empty(),
        "shim left running {} s after its last task went: {}",
        started.elapsed().as_secs(),
        left.iter()
            .map(|&pid| process_threads(pid))
            .collect::<Vec<_>>()
            .join("\n")
    );
    if started.elapsed() > Duration::from_secs(10) {
        eprintln!(
            "note: the shim took {:.1} s to exit",
            started.elapsed().as_secs_f64()
        );
    }
    let state = containerd.run_dir().join(id);
    if state.exists() {
        let mut listing = Vec::new();
        list_tree(&state, 3, &mut listing);
        panic!(
            "{} left behind: {listing:#?}\nmounts below it: {:?}",
            state.display(),
            mounts_below(&state)
        );
    }
    assert_eq!(mounts_below(&containerd.run_dir()), Vec::<String>::new());
    let tasks = containerd.ctr(&["task", "ls", "-q"]);
    assert_eq!(String::from_utf8_lossy(&tasks.stdout).trim(), "");
}
