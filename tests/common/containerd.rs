//! A private containerd for the guest-tier tests (Debian's `/usr/bin/containerd`,
//! root/state/sockets in a temp dir) that finds `containerd-shim-podvisor-v2` on its PATH,
//! a busybox OCI image built here and imported with `ctr image import`, and the checks that
//! nothing is left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::json;

use super::kvm_required;

pub use podvisor_shim::share::mounts_below;
use podvisor_test_kit::containerd::PrivateConfig;
pub use podvisor_test_kit::containerd::{CONTAINERD, CRI_NAMESPACE, CTR};
pub use podvisor_test_kit::image::{BUSYBOX, IMAGE};
pub use podvisor_test_kit::processes::process_threads;
use podvisor_test_kit::processes::processes_of;
pub use podvisor_test_kit::run_bounded;

pub const RUNTIME: &str = "io.containerd.podvisor.v2";
pub const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-podvisor-v2");
/// `ctr run` of one container, VM boot included (minutes on a nested-KVM host).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(900);
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

/// A private containerd for a test (`podvisor_test_kit::containerd`, failures panic); on
/// drop (also on failure) its log and the pods' consoles are printed when the test failed,
/// then the kit stops it and removes its dirs.
pub struct Containerd {
    pub dir: PathBuf,
    run_dir: PathBuf,
    inner: podvisor_test_kit::containerd::Containerd,
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
        self.inner.log()
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
        if let Some(body) = &options.podvisor_config {
            std::fs::write(dir.join("podvisor.toml"), body).unwrap();
        }
        let cri = options.cri.then(|| cri_config(dir, &options));
        let run_dir = if options.cri {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            PathBuf::from(format!("/tmp/pvr-{}-{n}", std::process::id()))
        } else {
            dir.join("podvisor-run")
        };
        let template_dir = options.template_dir.unwrap_or_else(shared_template_dir);
        let env = |k: &str, v: &Path| (k.to_string(), v.display().to_string());
        let inner = podvisor_test_kit::containerd::Containerd::start(PrivateConfig {
            dir: dir.to_path_buf(),
            path_prepend: Path::new(SHIM).parent().map(Path::to_path_buf),
            envs: vec![
                env("PODVISOR_KERNEL", kernel),
                env("PODVISOR_INITRD", initrd),
                env("PODVISOR_RUN_DIR", &run_dir),
                env("PODVISOR_TEMPLATE_DIR", &template_dir),
                ("RUST_LOG".into(), "debug".into()),
            ],
            cri,
            debug: true,
            cleanup_dirs: vec![run_dir.clone()],
        })
        .unwrap_or_else(|e| panic!("private containerd: {e}"));
        Containerd {
            dir: dir.to_path_buf(),
            run_dir,
            inner,
        }
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        self.inner.ctr_cmd(args)
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
        self.inner.ctr(args).expect("run ctr")
    }
}

/// The CRI plugin's section: handlers `runc` (the default) and `podvisor` (pod annotations
/// `io.podvisor.*`, the test's podvisor config as `ConfigPath`), the sandbox image, a
/// streaming server on a free port, CNI.
fn cri_config(dir: &Path, options: &ContainerdOptions) -> String {
    let cri = "[plugins.\"io.containerd.grpc.v1.cri\"";
    let runtimes = format!("{cri}.containerd.runtimes");
    let mut text = format!(
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
    text
}

/// PIDs of processes running the podvisor shim binary on behalf of this containerd.
pub fn shim_pids(sock: &Path) -> Vec<u32> {
    processes_of("containerd-shim-podvisor-v2", sock)
}

/// PIDs of runc shims (`containerd-shim-runc-v2`) of this containerd.
pub fn runc_shim_pids(sock: &Path) -> Vec<u32> {
    processes_of("containerd-shim-runc-v2", sock)
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- containerd log (tail) ----");
            eprintln!("{}", self.inner.log_tail(80));
            for console in find_files(&self.run_dir(), "console.log") {
                eprintln!(
                    "---- {} ----\n{}",
                    console.display(),
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
            }
        }
        // Then `inner` drops: the kit kills the CRI tasks, the shims and containerd, and
        // removes the dirs.
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
    // SAFETY: geteuid has no preconditions.
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
