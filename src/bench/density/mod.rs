//! `podvisor bench density`: how many pods fit, and how fast do they start?
//!
//! One run, for each runtime asked for (runc first, then podvisor, same containerd):
//! 1. baseline: `/proc/meminfo` (used = MemTotal - MemAvailable, Committed_AS);
//! 2. N idle busybox pods (`sh -c 'echo ready; exec sleep 100000'`), started in waves of P
//!    concurrent `ctr run --rm` children (each in its own process group, so Ctrl-C reaches
//!    only the harness). Latency per pod, from spawning `ctr run`: to the `/tasks/create`
//!    and `/tasks/start` events (one `ctr events` stream for the run) and to the first
//!    stdout line (`ready`) read from the `ctr run` child;
//! 3. after every pod is up and `--settle` seconds: per pod the PSS of its shim and the
//!    shim's descendants ([`memory`]), for podvisor split into guest RAM touched and
//!    VMM/shim overhead; the machine's used-memory delta / N;
//! 4. teardown: kill + delete every task and container, wait for their shims to go.
//!
//! Then [`report`] writes `density.md` + `density.json` and [`plot`] `density.png` into
//! `--out` (podvisor pods' guest consoles go to `consoles/<pod>.log` there before
//! teardown). Teardown also runs on errors and on Ctrl-C/SIGTERM (then exit status 130):
//! pods first ([`Pods`]' drop), then the private containerd with its work dir
//! (`Containerd`'s drop), then KSM's `run` is restored ([`KsmGuard`]).
//!
//! `--scenario alloc-free` runs [`alloc_free`] instead: pods that touch `--alloc-mib` MiB,
//! free it and idle, measured before, right after the free and `--reclaim-wait` s later.
//! The idle scenario's report ends with the RuntimeClass `overhead.podFixed` the run
//! justifies ([`overhead`]).
//!
//! Density knobs go into the private containerd's environment, which the podvisor shim
//! inherits: `--mem-mib` (`PODVISOR_MEM_MIB`), `--vcpus` (`PODVISOR_VCPUS`), `--noreserve
//! off` (`PODVISOR_NORESERVE=0`), `--ksm on` (`PODVISOR_KSM=1` + `/sys/kernel/mm/ksm/run`
//! = 1 for the run), `--template on` (`PODVISOR_TEMPLATE=auto` with a template dir in the
//! work dir: the first pod boots and snapshots a template VM, the others restore
//! copy-on-write clones of it).

pub mod alloc_free;
pub mod memory;
pub mod overhead;
pub mod plot;
pub mod report;
pub mod stats;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use podvisor_test_kit::image;

use podvisor_test_kit::containerd::{Containerd, ContainerdError, PrivateConfig};
use podvisor_test_kit::processes::die_with_parent;
use report::{ConfigRecord, MachineDelta, PodRecord, Report, RunSummary, RuntimeRun, WaveSample};

/// The command each pod runs: one line of output, then idle.
pub const POD_COMMAND: [&str; 3] = ["sh", "-c", "echo ready; exec sleep 100000"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeChoice {
    Podvisor,
    Runc,
    Both,
}

/// One runtime under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Podvisor,
    /// podvisor with templates off for the pod (annotation `io.podvisor.config.template=off`):
    /// every pod boots (`bench template`'s cold column).
    PodvisorCold,
    Runc,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Podvisor => "podvisor",
            Runtime::PodvisorCold => "podvisor-cold",
            Runtime::Runc => "runc",
        }
    }
    /// containerd's runtime name.
    pub fn containerd_name(self) -> &'static str {
        match self {
            Runtime::Podvisor | Runtime::PodvisorCold => "io.containerd.podvisor.v2",
            Runtime::Runc => "io.containerd.runc.v2",
        }
    }
    /// The long-running shim's binary name.
    pub fn shim_binary(self) -> &'static str {
        match self {
            Runtime::Podvisor | Runtime::PodvisorCold => "containerd-shim-podvisor-v2",
            Runtime::Runc => "containerd-shim-runc-v2",
        }
    }
    /// Extra `ctr run` arguments of this runtime's pods.
    fn run_args(self) -> &'static [&'static str] {
        match self {
            Runtime::PodvisorCold => &["--annotation", "io.podvisor.config.template=off"],
            Runtime::Podvisor | Runtime::Runc => &[],
        }
    }
}

impl RuntimeChoice {
    /// The runtimes to run, in order (runc first: it is quick and gives the baseline).
    pub fn runtimes(self) -> Vec<Runtime> {
        match self {
            RuntimeChoice::Podvisor => vec![Runtime::Podvisor],
            RuntimeChoice::Runc => vec![Runtime::Runc],
            RuntimeChoice::Both => vec![Runtime::Runc, Runtime::Podvisor],
        }
    }
}

/// What the pods do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Print a line and idle.
    Idle,
    /// Touch `--alloc-mib` MiB, free it, idle ([`alloc_free`]).
    AllocFree,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::AllocFree => "alloc-free",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug, Clone)]
pub struct DensityArgs {
    /// Number of pods per runtime.
    #[arg(long, required_unless_present = "from_json", default_value_t = 0)]
    pub pods: usize,
    /// Pods started at once (a wave); the next wave starts when every pod of this one
    /// printed its first line.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    #[arg(long, value_enum, default_value_t = RuntimeChoice::Both)]
    pub runtime: RuntimeChoice,
    /// Where density.md, density.json and density.png go (created).
    #[arg(long, default_value = "bench-density")]
    pub out: PathBuf,
    /// Use the containerd at this socket instead of starting a private one (the knobs
    /// --mem-mib/--vcpus/--ksm/--noreserve then come from that containerd's environment).
    #[arg(long)]
    pub address: Option<PathBuf>,
    /// Work dir of the private containerd (must not exist; removed afterwards). Default: a
    /// new dir under $TMPDIR.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Guest memory per podvisor pod, MiB (knob; shim default 256).
    #[arg(long)]
    pub mem_mib: Option<u64>,
    /// vCPUs per podvisor pod (shim default 1).
    #[arg(long)]
    pub vcpus: Option<usize>,
    /// KSM merging of guest memory (MADV_MERGEABLE + /sys/kernel/mm/ksm/run=1).
    #[arg(long, value_enum)]
    pub ksm: Option<OnOff>,
    /// MAP_NORESERVE on guest memory (untouched guest pages are not committed).
    #[arg(long, value_enum)]
    pub noreserve: Option<OnOff>,
    /// VM templates: pods restore copy-on-write clones of one booted template VM
    /// (PODVISOR_TEMPLATE=auto, the shim's default; templates live in the work dir, built
    /// by the first pod). `off` boots every pod.
    #[arg(long, value_enum)]
    pub template: Option<OnOff>,
    /// Seconds to wait after the last pod started before measuring memory (default 5, or
    /// 60 with --ksm on so that KSM can scan).
    #[arg(long)]
    pub settle: Option<u64>,
    /// Per-pod limit to reach its first output line, seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Start no pods: write density.md and density.png again (to --out) from this
    /// density.json of an earlier run.
    #[arg(long)]
    pub from_json: Option<PathBuf>,
    /// What the pods do: `idle`, or `alloc-free` (touch --alloc-mib MiB, free it, idle:
    /// does the pod's host memory come back?).
    #[arg(long, value_enum, default_value_t = Scenario::Idle)]
    pub scenario: Scenario,
    /// MiB each alloc-free pod touches and frees (podvisor pods need --mem-mib above it
    /// plus the guest's own use).
    #[arg(long, default_value_t = 200)]
    pub alloc_mib: u64,
    /// Seconds between an alloc-free pod's free and its last measurement.
    #[arg(long, default_value_t = 30)]
    pub reclaim_wait: u64,
}

impl DensityArgs {
    /// The arguments of a series another bench runs through the harness: `pods` pods of
    /// `runtime` in a private containerd, the host's knobs at their defaults (the caller
    /// sets the fields it needs).
    pub fn series(
        pods: usize,
        runtime: RuntimeChoice,
        out: &Path,
        guest: &GuestArgs,
        mem_mib: Option<u64>,
        timeout: u64,
    ) -> DensityArgs {
        DensityArgs {
            pods,
            parallel: 1,
            runtime,
            out: out.to_path_buf(),
            address: None,
            work_dir: None,
            guest: guest.clone(),
            mem_mib,
            vcpus: None,
            ksm: None,
            noreserve: None,
            template: None,
            settle: None,
            timeout,
            from_json: None,
            scenario: Scenario::Idle,
            alloc_mib: 200,
            reclaim_wait: 30,
        }
    }
}

/// What podvisor pods boot, and the shim that boots them.
#[derive(Args, Debug, Clone, Default)]
pub struct GuestArgs {
    /// Guest kernel (vmlinux) for podvisor pods.
    #[arg(long, env = "PODVISOR_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// Agent initramfs for podvisor pods.
    #[arg(long, env = "PODVISOR_INITRD")]
    pub initrd: Option<PathBuf>,
    /// The podvisor shim binary. Default: containerd-shim-podvisor-v2 next to this binary.
    #[arg(long)]
    pub shim: Option<PathBuf>,
    /// Sample where each podvisor pod's guest runs this many times a second (the shim's
    /// PODVISOR_GUEST_PROFILE_HZ): the report adds the most sampled guest functions per
    /// start phase. A diagnostic (each sample is a vCPU exit); 0: off.
    #[arg(long, default_value_t = 0)]
    pub guest_profile_hz: u32,
}

/// Errors of the density harness; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DensityError {
    #[error("invalid arguments: {0}")]
    Usage(String),
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error("cannot write {path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start `{what}`: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("interrupted: pods, containerd and temp dirs were torn down")]
    Interrupted,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C / SIGTERM arrived (after [`install_interrupt_handler`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Routes SIGINT/SIGTERM/SIGHUP to a flag the harness polls (once per process).
pub fn install_interrupt_handler() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if let Err(e) = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("podvisor bench density: still tearing down, please wait");
            } else {
                eprintln!("podvisor bench density: interrupted, tearing down ...");
            }
        }) {
            log::warn!("no Ctrl-C handler ({e}): an interrupt will skip teardown");
        }
    });
}

fn check_interrupt() -> Result<(), DensityError> {
    if interrupted() {
        Err(DensityError::Interrupted)
    } else {
        Ok(())
    }
}

/// Sleeps `d`, waking early on an interrupt.
fn sleep_interruptible(d: Duration) -> Result<(), DensityError> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupt()?;
        std::thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
    }
    check_interrupt()
}

/// Arguments checked and resolved, before anything is created.
#[derive(Debug, Clone)]
pub struct Plan {
    pub pods: usize,
    pub parallel: usize,
    pub runtimes: Vec<Runtime>,
    pub out: PathBuf,
    pub address: Option<PathBuf>,
    pub work_dir: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub shim_dir: Option<PathBuf>,
    pub mem_mib: u64,
    pub vcpus: usize,
    pub ksm: bool,
    pub noreserve: bool,
    pub template: bool,
    pub settle: Duration,
    pub timeout: Duration,
    pub scenario: Scenario,
    pub alloc_mib: u64,
    pub reclaim_wait: Duration,
    pub guest_profile_hz: u32,
}

/// The shim's default guest memory (src/shim/config.rs), used when --mem-mib is not given.
pub const DEFAULT_MEM_MIB: u64 = 256;

/// Checks `args` (no side effects): every problem is a [`DensityError::Usage`] that says
/// what to change.
pub fn plan(args: &DensityArgs) -> Result<Plan, DensityError> {
    let usage = |m: String| Err(DensityError::Usage(m));
    if args.pods == 0 {
        return usage("--pods must be at least 1".into());
    }
    if args.parallel == 0 || args.parallel > args.pods {
        return usage(format!(
            "--parallel must be between 1 and --pods ({}), got {}",
            args.pods, args.parallel
        ));
    }
    if args.timeout == 0 {
        return usage("--timeout must be at least 1 second".into());
    }
    if let Some(m) = args.mem_mib {
        if !(64..=65536).contains(&m) {
            return usage(format!("--mem-mib must be between 64 and 65536, got {m}"));
        }
    }
    if args.vcpus == Some(0) {
        return usage("--vcpus must be at least 1".into());
    }
    let mem_mib = args.mem_mib.unwrap_or(DEFAULT_MEM_MIB);
    if args.scenario == Scenario::AllocFree {
        if args.alloc_mib == 0 {
            return usage("--alloc-mib must be at least 1".into());
        }
        // The guest itself needs some of its memory (kernel, agent, page cache floor).
        let needed = args.alloc_mib + ALLOC_FREE_GUEST_MIB;
        if args.runtime != RuntimeChoice::Runc && mem_mib < needed {
            return usage(format!(
                "--alloc-mib {} needs podvisor pods of at least {needed} MiB (the guest's                  own {ALLOC_FREE_GUEST_MIB} MiB on top): pass --mem-mib {needed} or more",
                args.alloc_mib
            ));
        }
    }
    let runtimes = args.runtime.runtimes();
    let podvisor = runtimes.contains(&Runtime::Podvisor);
    let knobs_set = args.mem_mib.is_some()
        || args.vcpus.is_some()
        || args.ksm.is_some()
        || args.noreserve.is_some()
        || args.template.is_some();
    if args.address.is_some() {
        if knobs_set {
            return usage(
                "--mem-mib/--vcpus/--ksm/--noreserve/--template are set in the harness's own containerd's \
                 environment: drop --address, or configure that containerd instead"
                    .into(),
            );
        }
        if args.work_dir.is_some() {
            return usage(
                "--work-dir is for the harness's own containerd: drop --address or --work-dir"
                    .into(),
            );
        }
    }
    let work_dir = match &args.work_dir {
        Some(d) if d.exists() => {
            return usage(format!(
                "--work-dir {} exists: name a new path (the harness removes it afterwards)",
                d.display()
            ))
        }
        Some(d) => absolute(d),
        None => std::env::temp_dir().join(format!("podvisor-density-{}", std::process::id())),
    };
    let (mut kernel, mut initrd, mut shim_dir) = (None, None, None);
    if podvisor && args.address.is_none() {
        for (flag, path) in [
            ("--kernel", &args.guest.kernel),
            ("--initrd", &args.guest.initrd),
        ] {
            match path {
                None => {
                    return usage(format!(
                        "podvisor pods need {flag} (or PODVISOR_{}): `make guest-kernel` prints \
                         the kernel, `make rootfs` builds out/agent-test.cpio",
                        flag[2..].to_uppercase()
                    ))
                }
                Some(p) if !p.is_file() => {
                    return usage(format!("{flag} {} is not a file", p.display()))
                }
                Some(_) => {}
            }
        }
        kernel = args.guest.kernel.as_deref().map(absolute);
        initrd = args.guest.initrd.as_deref().map(absolute);
        let shim = match &args.guest.shim {
            Some(s) => absolute(s),
            None => std::env::current_exe()
                .map_err(|e| DensityError::Usage(format!("cannot find this binary: {e}")))?
                .with_file_name(Runtime::Podvisor.shim_binary()),
        };
        if !shim.is_file() || shim.file_name() != Some(Runtime::Podvisor.shim_binary().as_ref()) {
            return usage(format!(
                "the podvisor shim {} is missing: `cargo build -p podvisor` builds it next to \
                 podvisor, or pass --shim PATH/containerd-shim-podvisor-v2",
                shim.display()
            ));
        }
        shim_dir = shim.parent().map(Path::to_path_buf);
    }
    let ksm = args.ksm == Some(OnOff::On);
    Ok(Plan {
        pods: args.pods,
        parallel: args.parallel,
        runtimes,
        out: absolute(&args.out),
        address: args.address.clone(),
        work_dir,
        kernel,
        initrd,
        shim_dir,
        mem_mib,
        vcpus: args.vcpus.unwrap_or(1),
        ksm,
        noreserve: args.noreserve != Some(OnOff::Off),
        template: args.template != Some(OnOff::Off),
        settle: Duration::from_secs(args.settle.unwrap_or(if ksm { 60 } else { 5 })),
        timeout: Duration::from_secs(args.timeout),
        scenario: args.scenario,
        alloc_mib: args.alloc_mib,
        reclaim_wait: Duration::from_secs(args.reclaim_wait),
        guest_profile_hz: args.guest.guest_profile_hz,
    })
}

/// Guest memory an alloc-free pod needs besides its allocation, MiB.
pub const ALLOC_FREE_GUEST_MIB: u64 = 128;

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

impl Plan {
    /// The private containerd of this plan: in the work dir, the podvisor shim's directory
    /// first on its `PATH`, [`Self::shim_env`] in its environment.
    pub fn private_containerd(&self) -> PrivateConfig {
        PrivateConfig {
            dir: self.work_dir.clone(),
            path_prepend: self.shim_dir.clone(),
            envs: self.shim_env(),
            ..Default::default()
        }
    }

    /// containerd's (and so the podvisor shim's) environment for this plan.
    pub fn shim_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("PODVISOR_MEM_MIB".to_string(), self.mem_mib.to_string()),
            ("PODVISOR_VCPUS".to_string(), self.vcpus.to_string()),
            (
                "PODVISOR_RUN_DIR".to_string(),
                self.work_dir.join("podvisor-run").display().to_string(),
            ),
            (
                "PODVISOR_AGENT_TIMEOUT_SECS".to_string(),
                self.timeout.as_secs().to_string(),
            ),
            (
                "PODVISOR_NORESERVE".to_string(),
                if self.noreserve { "1" } else { "0" }.to_string(),
            ),
            (
                "PODVISOR_KSM".to_string(),
                if self.ksm { "1" } else { "0" }.to_string(),
            ),
            (
                "PODVISOR_TEMPLATE".to_string(),
                if self.template { "auto" } else { "off" }.to_string(),
            ),
            (
                "PODVISOR_TEMPLATE_DIR".to_string(),
                self.work_dir.join("templates").display().to_string(),
            ),
        ];
        if self.guest_profile_hz > 0 {
            env.push((
                "PODVISOR_GUEST_PROFILE_HZ".to_string(),
                self.guest_profile_hz.to_string(),
            ));
        }
        for (k, v) in [
            ("PODVISOR_KERNEL", &self.kernel),
            ("PODVISOR_INITRD", &self.initrd),
        ] {
            if let Some(v) = v {
                env.push((k.to_string(), v.display().to_string()));
            }
        }
        env
    }
}

/// Restores KSM's `run` on drop when the harness changed it.
pub struct KsmGuard {
    previous: Option<u32>,
}

impl KsmGuard {
    /// Turns KSM on when `on`; returns the guard and a note for the report.
    fn enable(on: bool) -> (KsmGuard, String) {
        let state = memory::ksm_state();
        if !on {
            return (
                KsmGuard { previous: None },
                format!("off (host ksm/run = {:?})", state.run),
            );
        }
        match state.run {
            None => (
                KsmGuard { previous: None },
                "requested, but this kernel has no KSM (/sys/kernel/mm/ksm missing)".into(),
            ),
            Some(1) => (
                KsmGuard { previous: None },
                "on (ksm/run was already 1)".into(),
            ),
            Some(prev) => {
                match memory::set_ksm_run(1) {
                    Ok(()) => (
                        KsmGuard {
                            previous: Some(prev),
                        },
                        format!("on (ksm/run set 1 for the run, back to {prev} afterwards)"),
                    ),
                    Err(e) => {
                        log::warn!("cannot switch KSM on ({e}): guest RAM is marked mergeable but not merged");
                        (
                        KsmGuard { previous: None },
                        format!("requested, but /sys/kernel/mm/ksm/run is not writable ({e}): nothing merged"),
                    )
                    }
                }
            }
        }
    }
}

impl Drop for KsmGuard {
    fn drop(&mut self) {
        if let Some(prev) = self.previous {
            if let Err(e) = memory::set_ksm_run(prev) {
                log::warn!("cannot restore /sys/kernel/mm/ksm/run to {prev}: {e}");
            }
        }
    }
}

/// Removes an image the harness imported into an existing containerd.
struct ImageGuard<'a> {
    containerd: &'a Containerd,
    imported: bool,
}

impl Drop for ImageGuard<'_> {
    fn drop(&mut self) {
        if self.imported && self.containerd.dir().is_none() {
            let _ = self.containerd.ctr(&["image", "rm", image::IMAGE]);
        }
    }
}

/// Times of a pod's task events, from `ctr events`.
#[derive(Debug, Default, Clone, Copy)]
struct EventTimes {
    created: Option<Instant>,
    started: Option<Instant>,
}

type EventMap = Arc<Mutex<HashMap<String, EventTimes>>>;

/// (topic, container id) of a `ctr events` line (`time namespace topic json`).
pub fn parse_event(line: &str) -> Option<(String, String)> {
    let topic = line.split_whitespace().find(|w| w.starts_with("/tasks/"))?;
    let json: serde_json::Value = serde_json::from_str(&line[line.find('{')?..]).ok()?;
    let id = json.get("container_id")?.as_str()?;
    Some((topic.to_string(), id.to_string()))
}

/// The `ctr events` child for the run; killed on drop.
struct Events {
    child: Child,
    times: EventMap,
}

impl Events {
    fn start(containerd: &Containerd) -> Result<Events, DensityError> {
        let mut cmd = containerd.ctr_cmd(&["events"]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| DensityError::Spawn {
            what: "ctr events".into(),
            source,
        })?;
        let times: EventMap = Arc::default();
        let stdout = child.stdout.take().expect("piped");
        let t = times.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let now = Instant::now();
                if let Some((topic, id)) = parse_event(&line) {
                    let mut map = t.lock().unwrap();
                    let e = map.entry(id).or_default();
                    match topic.as_str() {
                        "/tasks/create" => e.created = e.created.or(Some(now)),
                        "/tasks/start" => e.started = e.started.or(Some(now)),
                        _ => {}
                    }
                }
            }
        });
        // `ctr events` subscribes asynchronously: give it a moment before the first pod.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Events { child, times })
    }

    fn get(&self, id: &str) -> EventTimes {
        self.times
            .lock()
            .unwrap()
            .get(id)
            .copied()
            .unwrap_or_default()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One pod being started: its `ctr run` child and what it printed.
struct Pod {
    id: String,
    index: usize,
    wave: usize,
    spawned: Instant,
    child: Child,
    first_line: Arc<Mutex<Option<(Instant, String)>>>,
    /// Every stdout line, with when it came.
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    stderr: Arc<Mutex<String>>,
    /// Why it failed (exited early, timed out), when it did.
    error: Option<String>,
    exited: bool,
}

impl Pod {
    fn spawn(
        containerd: &Containerd,
        runtime: Runtime,
        id: String,
        index: usize,
        wave: usize,
    ) -> Result<Pod, DensityError> {
        Self::spawn_running(containerd, runtime, id, index, wave, &POD_COMMAND)
    }

    /// A pod running `command` (its first stdout line says it is up).
    fn spawn_running(
        containerd: &Containerd,
        runtime: Runtime,
        id: String,
        index: usize,
        wave: usize,
        command: &[&str],
    ) -> Result<Pod, DensityError> {
        let mut args = vec!["run", "--rm", "--runtime", runtime.containerd_name()];
        args.extend(runtime.run_args());
        args.extend([image::IMAGE, &id]);
        args.extend(command);
        let mut cmd = containerd.ctr_cmd(&args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        die_with_parent(&mut cmd);
        let spawned = Instant::now();
        let mut child = cmd.spawn().map_err(|source| DensityError::Spawn {
            what: format!("ctr run {id}"),
            source,
        })?;
        let first_line: Arc<Mutex<Option<(Instant, String)>>> = Arc::default();
        let stderr: Arc<Mutex<String>> = Arc::default();
        let out = child.stdout.take().expect("piped");
        let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let fl = first_line.clone();
        let all = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let now = Instant::now();
                let mut first = fl.lock().unwrap();
                if first.is_none() {
                    *first = Some((now, line.clone()));
                }
                all.lock().unwrap().push((now, line));
            }
        });
        let mut err = child.stderr.take().expect("piped");
        let se = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = err.read_to_string(&mut buf);
            *se.lock().unwrap() = buf;
        });
        Ok(Pod {
            id,
            index,
            wave,
            spawned,
            child,
            first_line,
            lines,
            stderr,
            error: None,
            exited: false,
        })
    }

    fn first_output(&self) -> Option<Instant> {
        self.first_line.lock().unwrap().as_ref().map(|(t, _)| *t)
    }

    /// When the pod printed `line`, if it did.
    fn printed(&self, line: &str) -> Option<Instant> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| l == line)
            .map(|(t, _)| *t)
    }

    /// Whether the pod is settled for its wave: printed its first line, or failed.
    fn poll(&mut self, timeout: Duration) -> bool {
        if self.first_output().is_some() {
            return true;
        }
        if self.error.is_some() {
            return true;
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            self.exited = true;
            // Let the stderr reader finish.
            std::thread::sleep(Duration::from_millis(100));
            if self.first_output().is_none() {
                self.error = Some(format!(
                    "ctr run exited ({status}) before any output: {}",
                    self.stderr.lock().unwrap().trim()
                ));
            }
            return true;
        }
        if self.spawned.elapsed() > timeout {
            self.error = Some(format!(
                "no output within {} s (raise --timeout)",
                timeout.as_secs()
            ));
            return true;
        }
        false
    }
}

/// The pods of one runtime; torn down on drop (also on errors and interrupts).
struct Pods<'a> {
    containerd: &'a Containerd,
    runtime: Runtime,
    pods: Vec<Pod>,
    torn_down: bool,
}

impl Pods<'_> {
    /// Kills every task, deletes tasks and containers (in parallel), reaps the `ctr run`
    /// children (up to 60 s each before they are killed) and waits (up to 120 s) for the
    /// runtime's shims to exit. Returns problems.
    fn teardown(&mut self) -> Vec<String> {
        self.torn_down = true;
        let containerd = self.containerd;
        let ids: Vec<String> = self.pods.iter().map(|p| p.id.clone()).collect();
        let mut problems = Vec::new();
        std::thread::scope(|s| {
            let handles: Vec<_> = ids
                .iter()
                .map(|id| {
                    s.spawn(move || {
                        containerd
                            .remove_container(id, Duration::from_secs(120))
                            .err()
                            .map(|e| format!("{id}: {e}"))
                    })
                })
                .collect();
            for h in handles {
                if let Ok(Some(p)) = h.join() {
                    problems.push(p);
                }
            }
        });
        // A `ctr run --rm` still deleting its task must not be killed: containerd's runc
        // shim does not exit when a Delete's context is cancelled (containerd#11392). With
        // a 10 s grace, a runc shim was once left running on a loaded 2-core host.
        for pod in &mut self.pods {
            let deadline = Instant::now() + Duration::from_secs(60);
            while pod.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = pod.child.kill();
            let _ = pod.child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left: Vec<u32> = ids
                .iter()
                .flat_map(|id| {
                    memory::shim_pids(self.runtime.shim_binary(), Some(id), containerd.sock())
                })
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let threads: Vec<String> = left
                    .iter()
                    .map(|&p| podvisor_test_kit::processes::process_threads(p))
                    .collect();
                problems.push(format!(
                    "shims still running after 120 s: {left:?}; their threads: {}",
                    threads.join("; ")
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        problems
    }
}

impl Drop for Pods<'_> {
    fn drop(&mut self) {
        if !self.torn_down {
            for p in self.teardown() {
                log::warn!("teardown: {p}");
            }
        }
    }
}

/// CPU time (clock ticks) of each pod's shim, every thread, by pod id.
fn shim_cpu(pods: &Pods<'_>, containerd: &Containerd) -> HashMap<String, u64> {
    pods.pods
        .iter()
        .filter(|p| p.error.is_none())
        .filter_map(|p| {
            let shims =
                memory::shim_pids(pods.runtime.shim_binary(), Some(&p.id), containerd.sock());
            let [shim] = shims[..] else { return None };
            memory::cpu_ticks(shim).map(|t| (p.id.clone(), t))
        })
        .collect()
}

/// Mean CPU per pod between two [`shim_cpu`] samples `elapsed` apart, millicores.
fn idle_millicores(
    before: &HashMap<String, u64>,
    after: &HashMap<String, u64>,
    elapsed: Duration,
) -> Option<f64> {
    let ticks: Vec<u64> = after
        .iter()
        .filter_map(|(id, a)| before.get(id).map(|b| a.saturating_sub(*b)))
        .collect();
    if ticks.is_empty() || elapsed.is_zero() {
        return None;
    }
    let per_pod = ticks.iter().sum::<u64>() as f64 / ticks.len() as f64;
    Some(per_pod / memory::clock_ticks_per_sec() as f64 / elapsed.as_secs_f64() * 1000.0)
}

/// `MemAvailable` inside pod `id`'s guest (its container reads the VM's `/proc/meminfo`).
fn guest_available_kib(containerd: &Containerd, id: &str) -> Option<u64> {
    let exec_id = format!("meminfo-{}", std::process::id());
    match containerd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        &exec_id,
        id,
        "cat",
        "/proc/meminfo",
    ]) {
        Ok(out) if out.status.success() => {
            memory::kib_field(&String::from_utf8_lossy(&out.stdout), "MemAvailable")
        }
        Ok(out) => {
            log::warn!(
                "pod {id}: cat /proc/meminfo in the guest failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
        Err(e) => {
            log::warn!("pod {id}: cat /proc/meminfo in the guest: {e}");
            None
        }
    }
}

/// Memory of one pod (shim + descendants), KiB.
fn measure_pod(runtime: Runtime, id: &str, sock: &Path, mem_mib: u64) -> Result<PodMemory, String> {
    let shims = memory::shim_pids(runtime.shim_binary(), Some(id), sock);
    let [shim] = shims[..] else {
        return Err(format!(
            "expected one {} for {id}, found {shims:?}",
            runtime.shim_binary()
        ));
    };
    let shim_mem = memory::rollup(shim).map_err(|e| e.to_string())?;
    let children = memory::descendants(shim);
    let mut children_pss = 0;
    let mut rss = shim_mem.rss_kib;
    let mut private = shim_mem.private_kib;
    for c in &children {
        if let Ok(r) = memory::rollup(*c) {
            children_pss += r.pss_kib;
            rss += r.rss_kib;
            private += r.private_kib;
        }
    }
    let (overhead, workload) = match runtime {
        Runtime::Podvisor | Runtime::PodvisorCold => {
            let smaps = std::fs::read_to_string(format!("/proc/{shim}/smaps"))
                .map_err(|e| format!("cannot read /proc/{shim}/smaps: {e}"))?;
            let split = memory::split_smaps(&smaps, &memory::guest_region_sizes(mem_mib));
            if split.guest_mappings == 0 {
                return Err(format!(
                    "no {mem_mib} MiB guest RAM mapping in shim {shim}'s smaps (does \
                     containerd's PODVISOR_MEM_MIB match --mem-mib?); large anonymous \
                     mappings: {:?}",
                    memory::large_anonymous(&smaps, 32 << 20)
                ));
            }
            if !split.by_flag {
                log::warn!(
                    "shim {shim}: guest RAM recognised by size only (no `dd` flag: a VMM \
                     from before MADV_DONTDUMP); overhead may be understated"
                );
            }
            (
                shim_mem.pss_kib.saturating_sub(split.guest_pss_kib) + children_pss,
                split.guest_pss_kib,
            )
        }
        Runtime::Runc => (shim_mem.pss_kib, children_pss),
    };
    Ok(PodMemory {
        shim,
        processes: 1 + children.len(),
        overhead,
        workload,
        rss,
        private,
    })
}

/// One pod's memory (KiB): see [`report::PodRecord`].
struct PodMemory {
    shim: u32,
    processes: usize,
    overhead: u64,
    workload: u64,
    rss: u64,
    private: u64,
}

/// Runs one runtime's pods and measures them: one [`RuntimeRun`] for `plan.pods` pods.
fn run_runtime(
    plan: &Plan,
    containerd: &Containerd,
    events: &Events,
    runtime: Runtime,
) -> Result<RuntimeRun, DensityError> {
    let mut runs = run_runtime_at(plan, containerd, events, runtime, &[plan.pods], "")?;
    Ok(runs.pop().expect("one checkpoint, one run"))
}

/// Wave boundaries: chunks of at most `parallel` pods that end at every checkpoint.
fn waves(parallel: usize, checkpoints: &[usize]) -> Vec<std::ops::Range<usize>> {
    let total = checkpoints.iter().copied().max().unwrap_or(0);
    let mut out = Vec::new();
    let mut start = 0;
    while start < total {
        let stop = checkpoints
            .iter()
            .copied()
            .filter(|&c| c > start)
            .min()
            .unwrap_or(total);
        let end = (start + parallel.max(1)).min(stop);
        out.push(start..end);
        start = end;
    }
    out
}

/// Starts one runtime's pods in waves and measures every pod up so far each time their
/// number reaches a checkpoint (after `plan.settle`): one [`RuntimeRun`] per checkpoint,
/// named `<runtime><label>` (with ` N=<n>` when there are several). Tears down at the end.
fn run_runtime_at(
    plan: &Plan,
    containerd: &Containerd,
    events: &Events,
    runtime: Runtime,
    checkpoints: &[usize],
    label: &str,
) -> Result<Vec<RuntimeRun>, DensityError> {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run_no = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let total = checkpoints.iter().copied().max().unwrap_or(0);
    let before = memory::meminfo()?;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} [{bar:30}] {pos}/{len} pods up  {elapsed_precise}  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(runtime.name());
    let mut pods = Pods {
        containerd,
        runtime,
        pods: Vec::new(),
        torn_down: false,
    };
    let mut samples = Vec::new();
    let mut runs = Vec::new();
    let started = Instant::now();
    let mut last_up = started;
    for (wave, range) in waves(plan.parallel, checkpoints).into_iter().enumerate() {
        check_interrupt()?;
        bar.set_message(format!("wave {}", wave + 1));
        let first = pods.pods.len();
        for index in range {
            let id = format!(
                "density-{}-{}-{run_no}-{index}",
                std::process::id(),
                runtime.name()
            );
            pods.pods
                .push(Pod::spawn(containerd, runtime, id, index, wave)?);
        }
        let mut done = vec![false; pods.pods.len() - first];
        while done.iter().any(|d| !d) {
            check_interrupt()?;
            for (i, pod) in pods.pods[first..].iter_mut().enumerate() {
                if !done[i] && pod.poll(plan.timeout) {
                    done[i] = true;
                    bar.inc(1);
                    if let Some(e) = &pod.error {
                        bar.println(format!("{}: pod {} failed: {e}", runtime.name(), pod.id));
                    } else if let Some(t) = pod.first_output() {
                        last_up = last_up.max(t);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let now = memory::meminfo()?;
        samples.push(WaveSample {
            pods_up: pods.pods.iter().filter(|p| p.error.is_none()).count(),
            seconds: started.elapsed().as_secs_f64(),
            used_delta_kib: now.used_delta_kib(&before),
        });
        let n = pods.pods.len();
        if !checkpoints.contains(&n) {
            continue;
        }
        bar.set_message(format!("settling {} s", plan.settle.as_secs()));
        let cpu_before = shim_cpu(&pods, containerd);
        let settle_start = Instant::now();
        sleep_interruptible(plan.settle)?;
        let idle_cpu = idle_millicores(
            &cpu_before,
            &shim_cpu(&pods, containerd),
            settle_start.elapsed(),
        );
        bar.set_message(format!("measuring {n} pods"));
        let name = if checkpoints.len() > 1 {
            format!("{}{label} N={n}", runtime.name())
        } else {
            format!("{}{label}", runtime.name())
        };
        let mut run = measure_run(
            plan, containerd, events, runtime, &pods, &samples, &before, started, last_up, name,
        )?;
        run.idle_cpu_millicores = idle_cpu;
        if runtime != Runtime::Runc {
            run.guest_available_kib = pods
                .pods
                .iter()
                .find(|p| p.error.is_none())
                .and_then(|p| guest_available_kib(containerd, &p.id));
        }
        runs.push(run);
    }
    bar.set_message("tearing down");
    let problems = pods.teardown();
    bar.finish_with_message("done");
    if let Some(last) = runs.last_mut() {
        last.teardown_problems = problems;
    }
    Ok(runs)
}

/// Measures every pod of `pods` (all up or failed) into a [`RuntimeRun`] called `name`.
#[allow(clippy::too_many_arguments)]
fn measure_run(
    plan: &Plan,
    containerd: &Containerd,
    events: &Events,
    runtime: Runtime,
    pods: &Pods<'_>,
    samples: &[WaveSample],
    before: &memory::MemInfo,
    started: Instant,
    last_up: Instant,
    name: String,
) -> Result<RuntimeRun, DensityError> {
    let mut records = Vec::new();
    for pod in &pods.pods {
        let ev = events.get(&pod.id);
        let ms = |t: Option<Instant>| t.map(|t| t.duration_since(pod.spawned).as_secs_f64() * 1e3);
        let mut rec = PodRecord {
            id: pod.id.clone(),
            index: pod.index,
            wave: pod.wave,
            error: pod.error.clone(),
            to_created_ms: ms(ev.created),
            to_running_ms: ms(ev.started),
            to_first_output_ms: ms(pod.first_output()),
            ..PodRecord::default()
        };
        if runtime != Runtime::Runc && containerd.dir().is_some() {
            // The shim writes it into the pod's state dir once the pod printed.
            let state = plan.work_dir.join("podvisor-run").join(&pod.id);
            rec.timeline = std::fs::read(state.join("timeline.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            // The guest's console (kernel and agent log, with what each container
            // operation cost the guest) goes before the pod and its state dir do.
            let consoles = plan.out.join("consoles");
            if std::fs::create_dir_all(&consoles).is_ok() {
                let _ = std::fs::copy(
                    state.join("console.log"),
                    consoles.join(format!("{}.log", pod.id)),
                );
            }
        }
        if rec.error.is_none() {
            match measure_pod(runtime, &pod.id, containerd.sock(), plan.mem_mib) {
                Ok(m) => {
                    rec.shim_pid = Some(m.shim);
                    rec.processes = m.processes;
                    rec.overhead_pss_kib = Some(m.overhead);
                    rec.workload_pss_kib = Some(m.workload);
                    rec.pss_kib = Some(m.overhead + m.workload);
                    rec.rss_kib = Some(m.rss);
                    rec.private_kib = Some(m.private);
                }
                Err(e) => rec.error = Some(format!("memory: {e}")),
            }
        }
        records.push(rec);
    }
    let after = memory::meminfo()?;
    // The harness's own `ctr` clients (one `ctr run` per pod, `ctr events`) are not part
    // of a pod: their PSS comes off the machine delta.
    let clients: u64 = pods
        .pods
        .iter()
        .map(|p| p.child.id())
        .chain([events.child.id()])
        .filter_map(|pid| memory::rollup(pid).ok())
        .map(|r| r.pss_kib)
        .sum();
    let ksm = memory::ksm_state();
    let n = pods.pods.len().max(1) as f64;
    let used_delta = after.used_delta_kib(before);
    let machine = MachineDelta {
        before: *before,
        after,
        used_delta_kib: used_delta,
        harness_clients_pss_kib: clients,
        used_per_pod_kib: (used_delta as f64 - clients as f64) / n,
        committed_per_pod_kib: (after.committed_kib as f64 - before.committed_kib as f64) / n,
        ksm_pages_sharing: ksm.pages_sharing,
    };
    let ok = records.iter().filter(|r| r.error.is_none()).count();
    let wall = last_up.duration_since(started).as_secs_f64();
    let summary = RunSummary::of(&records);
    Ok(RuntimeRun {
        runtime: name,
        pods: records,
        waves: samples.to_vec(),
        machine,
        start_wall_s: wall,
        pods_per_s: if wall > 0.0 { ok as f64 / wall } else { 0.0 },
        summary,
        teardown_problems: Vec::new(),
        idle_cpu_millicores: None,
        guest_available_kib: None,
    })
}

/// `podvisor bench density`.
pub fn run(args: DensityArgs) -> Result<u8, Box<dyn std::error::Error>> {
    if let Some(json) = &args.from_json {
        let report = report::read(json)?;
        print!("{}", report::markdown(&report));
        for p in write_reports(&report, &absolute(&args.out))? {
            println!("wrote {}", p.display());
        }
        return Ok(0);
    }
    let plan = plan(&args)?;
    install_interrupt_handler();
    match run_plan(&plan) {
        Ok((report, paths)) => {
            print!("{}", report::markdown(&report));
            for p in &paths {
                println!("wrote {}", p.display());
            }
            let failed: usize = report.runs.iter().map(|r| r.summary.failures).sum();
            Ok(if failed > 0 { 1 } else { 0 })
        }
        Err(DensityError::Interrupted) => {
            eprintln!("podvisor bench density: {}", DensityError::Interrupted);
            Ok(130)
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs `plan` end to end; returns the report and the files written.
pub fn run_plan(plan: &Plan) -> Result<(Report, Vec<PathBuf>), DensityError> {
    let mut alloc_free = Vec::new();
    let mut report = run_session(plan, |containerd, events| {
        let mut runs = Vec::new();
        for &runtime in &plan.runtimes {
            check_interrupt()?;
            match plan.scenario {
                Scenario::Idle => runs.push(run_runtime(plan, containerd, events, runtime)?),
                Scenario::AllocFree => {
                    alloc_free.push(alloc_free::run(plan, containerd, runtime)?);
                }
            }
        }
        Ok(runs)
    })?;
    report.alloc_free = alloc_free;
    let paths = write_reports(&report, &plan.out)?;
    Ok((report, paths))
}

/// `bench template`'s series in one session: runc and template clones at every
/// checkpoint of `clones` (cumulative: N=10 is the first pod plus nine more), one cold
/// pod (templates off), and the pod that builds the template first (its own run, so the
/// clone rows hold clones only). With `runc` false, runc is left out.
pub fn run_template_series(
    plan: &Plan,
    clones: &[usize],
    runc: bool,
) -> Result<Report, DensityError> {
    // (runtime, checkpoints, label), in order.
    let mut series: Vec<(Runtime, &[usize], &str)> = Vec::new();
    if runc {
        series.push((Runtime::Runc, clones, ""));
    }
    series.push((Runtime::PodvisorCold, &[1], " (boot)"));
    series.push((Runtime::Podvisor, &[1], " (template build + first clone)"));
    series.push((Runtime::Podvisor, clones, " clones"));
    run_session(plan, |containerd, events| {
        let mut runs = Vec::new();
        for (runtime, checkpoints, label) in series {
            check_interrupt()?;
            runs.extend(run_runtime_at(
                plan,
                containerd,
                events,
                runtime,
                checkpoints,
                label,
            )?);
        }
        Ok(runs)
    })
}

/// A private (or the given) containerd with the busybox image and an event stream around
/// `body`, whose runs make the report.
fn run_session(
    plan: &Plan,
    body: impl FnOnce(&Containerd, &Events) -> Result<Vec<RuntimeRun>, DensityError>,
) -> Result<Report, DensityError> {
    let (_ksm, ksm_note) = KsmGuard::enable(plan.ksm);
    let containerd = match &plan.address {
        Some(sock) => Containerd::existing(sock)?,
        None => Containerd::start(plan.private_containerd())?,
    };
    check_interrupt()?;
    let image_dir = match containerd.dir() {
        Some(d) => d.join("image"),
        None => plan.work_dir.join("image"),
    };
    let archive = image::build_image(&image_dir);
    let imported = archive
        .map_err(DensityError::from)
        .and_then(|a| Ok(containerd.import_image(&a, image::IMAGE)?));
    if containerd.dir().is_none() {
        let _ = std::fs::remove_dir_all(&plan.work_dir);
    }
    let _image = ImageGuard {
        containerd: &containerd,
        imported: imported?,
    };
    let events = Events::start(&containerd)?;
    let runs = body(&containerd, &events)?;
    Ok(Report {
        config: ConfigRecord::new(plan, &ksm_note),
        runs,
        alloc_free: Vec::new(),
    })
}

/// Writes density.json, density.md ([`report`]) and density.png ([`plot`]) into `dir`
/// (created); returns the
/// paths written. A plot that cannot be drawn (no font) is logged, not fatal.
fn write_reports(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, DensityError> {
    let text = serde_json::to_string_pretty(report).expect("report serialises");
    let json = report::write_file(dir, "density.json", &text)?;
    let png = dir.join("density.png");
    // The plot is of the idle pods' start latency and memory; an alloc-free run has none.
    let plotted = !report.runs.is_empty()
        && match plot::draw(report, &png) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("no plot: {e}");
                false
            }
        };
    let mut text = report::markdown(report);
    if plotted {
        text += &format!("\nPlot: {}\n", png.display());
    }
    if !report.runs.is_empty() {
        text += &report::pod_table(report);
    }
    let md = report::write_file(dir, "density.md", &text)?;
    let mut paths = vec![md, json];
    if plotted {
        paths.push(png);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> DensityArgs {
        crate::parse_args(line)
    }

    #[test]
    fn waves_end_at_every_checkpoint() {
        let w = waves(4, &[1, 10, 12]);
        assert_eq!(w, vec![0..1, 1..5, 5..9, 9..10, 10..12]);
        assert_eq!(waves(2, &[3]), vec![0..2, 2..3]);
        assert!(waves(2, &[]).is_empty());
    }

    fn usage_error(line: &str) -> String {
        match plan(&args(line)) {
            Err(DensityError::Usage(m)) => m,
            other => panic!("{line}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(usage_error("--pods 0 --runtime runc").contains("--pods"));
        assert!(usage_error("--pods 2 --parallel 3 --runtime runc").contains("--parallel"));
        assert!(usage_error("--pods 2 --parallel 0 --runtime runc").contains("--parallel"));
        assert!(usage_error("--pods 1 --runtime runc --mem-mib 8").contains("--mem-mib"));
        assert!(
            usage_error("--pods 1 --runtime runc --address /x.sock --ksm on")
                .contains("drop --address")
        );
        assert!(usage_error("--pods 1 --runtime runc --work-dir /").contains("exists"));
        assert!(usage_error(
            "--pods 1 --runtime podvisor --kernel /nonexistent/vmlinux --initrd /nonexistent/i"
        )
        .contains("not a file"));
        assert!(crate::try_parse_args::<DensityArgs>("--pods 1 --runtime kata").is_err());
        assert!(crate::try_parse_args::<DensityArgs>("--pods 1 --ksm maybe").is_err());
    }

    #[test]
    fn plans_knobs_into_the_shim_environment() {
        let p = plan(&args(
            "--pods 4 --parallel 2 --runtime runc --mem-mib 128 --ksm on --noreserve off --template on",
        ))
        .unwrap();
        assert_eq!(p.runtimes, vec![Runtime::Runc]);
        assert_eq!(p.settle, Duration::from_secs(60), "KSM needs time to scan");
        let env: HashMap<_, _> = p.shim_env().into_iter().collect();
        assert_eq!(env["PODVISOR_MEM_MIB"], "128");
        assert_eq!(env["PODVISOR_KSM"], "1");
        assert_eq!(env["PODVISOR_NORESERVE"], "0");
        assert_eq!(env["PODVISOR_TEMPLATE"], "auto");
        assert!(env["PODVISOR_TEMPLATE_DIR"].starts_with(&*p.work_dir.to_string_lossy()));
        assert!(!p.work_dir.exists());
        let both = plan(&args("--pods 1 --runtime runc")).unwrap();
        assert_eq!(both.mem_mib, DEFAULT_MEM_MIB);
        assert!(both.noreserve && !both.ksm);
        assert_eq!(
            RuntimeChoice::Both.runtimes(),
            vec![Runtime::Runc, Runtime::Podvisor]
        );
    }

    #[test]
    fn parses_ctr_events() {
        let line = r#"2026-11-23 10:00:00.1 +0000 UTC default /tasks/start {"container_id":"p1","pid":42}"#;
        assert_eq!(
            parse_event(line),
            Some(("/tasks/start".into(), "p1".into()))
        );
        assert_eq!(
            parse_event(r#"2026-11-23 default /images/create {"name":"x"}"#),
            None
        );
        assert_eq!(parse_event("garbage"), None);
    }
}
