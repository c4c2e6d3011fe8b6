//! `podvisor bench net`: network throughput and latency between a pod and a peer network
//! namespace, podvisor next to runc in the same run of one private containerd.
//!
//! Per runtime: a pod namespace and a peer namespace joined by a veth pair ([`pair`], as
//! a CNI plugin would set them up); one pod in the pod namespace (`ctr run --with-ns
//! network:…`) running three busybox servers ([`probe::POD_SERVERS`]); the host-side
//! client ([`probe`]) in the peer namespace measures, in this order: readiness (the echo
//! server answers), TCP connect latency (and connect + first echo), one-byte request/response round trips, and TCP
//! stream throughput peer → pod and pod → peer. runc's pod sits on the veth directly;
//! podvisor's guest NIC is a virtio-net device on a tap that the shim joins to the veth
//! with tc mirred redirects, so the difference is the VM's network path.
//!
//! On a host whose `/dev/kvm` emulates guest kernel code (a nested "PVM" host), every packet
//! costs guest kernel time that runs thousands of times slower than on real hardware:
//! podvisor's figures here measure that emulation more than the device.
//!
//! Writes `net.md` (printed too) and `net.json` to `--out`; the pods, namespaces and the
//! private containerd are removed afterwards, also on errors and Ctrl-C.

mod pair;
mod probe;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use super::density::report::{self, mib};
use super::density::stats::Summary;
use super::density::RuntimeChoice;
use podvisor_test_kit::containerd::Containerd;
use podvisor_test_kit::image;

use super::density::{self, DensityArgs, DensityError, GuestArgs, OnOff, Runtime};
use pair::NetnsPair;
use probe::Throughput;

#[derive(Args, Debug, Clone)]
pub struct NetBenchArgs {
    #[arg(long, value_enum, default_value_t = RuntimeChoice::Both)]
    pub runtime: RuntimeChoice,
    /// Seconds of each measurement (request/response, each stream direction).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Most request/response round trips to time.
    #[arg(long, default_value_t = 10_000)]
    pub rr_max: usize,
    /// TCP connects to time.
    #[arg(long, default_value_t = 10)]
    pub connects: usize,
    /// Where net.md and net.json go (created).
    #[arg(long, default_value = "bench-net")]
    pub out: PathBuf,
    /// Guest memory of the podvisor pod, MiB (shim default 256).
    #[arg(long)]
    pub mem_mib: Option<u64>,
    /// VM templates for the podvisor pod (the shim's default: on; the first networked pod
    /// builds a template with one NIC).
    #[arg(long, value_enum)]
    pub template: Option<OnOff>,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Limit for a pod to start and answer, seconds.
    #[arg(long, default_value_t = 1200)]
    pub timeout: u64,
}

/// One runtime's figures (or why it has none).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct NetRun {
    pub runtime: String,
    /// `ctr run -d` returned, ms after it was started.
    pub started_ms: Option<f64>,
    /// The echo server answered, ms after `ctr run -d` was started.
    pub ready_ms: Option<f64>,
    /// TCP connect, ms.
    pub connect_ms: Summary,
    /// TCP connect + one-byte echo on the new connection (TCP_CRR without the close), ms.
    pub connect_echo_ms: Summary,
    /// One-byte request/response round trip, µs.
    pub rr_us: Summary,
    pub rr_per_sec: Option<f64>,
    pub to_pod: Option<Throughput>,
    pub from_pod: Option<Throughput>,
    /// The first thing that failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NetReport {
    pub seconds: u64,
    pub mem_mib: u64,
    pub template: bool,
    pub runs: Vec<NetRun>,
}

fn density_args(args: &NetBenchArgs) -> DensityArgs {
    DensityArgs {
        template: args.template,
        ..DensityArgs::series(
            1,
            args.runtime,
            &args.out,
            &args.guest,
            args.mem_mib,
            args.timeout,
        )
    }
}

pub fn run(args: NetBenchArgs) -> Result<u8, Box<dyn std::error::Error>> {
    if args.seconds == 0 || args.rr_max == 0 || args.connects == 0 {
        return Err(DensityError::Usage(
            "--seconds, --rr-max and --connects must be at least 1".into(),
        )
        .into());
    }
    let plan = density::plan(&density_args(&args))?;
    density::install_interrupt_handler();
    let containerd = Containerd::start(plan.private_containerd())?;
    let archive = image::build_image(&plan.work_dir.join("image"))?;
    containerd.import_image(&archive, image::IMAGE)?;
    let mut report = NetReport {
        seconds: args.seconds,
        mem_mib: plan.mem_mib,
        template: plan.template,
        runs: Vec::new(),
    };
    for &runtime in &plan.runtimes {
        if density::interrupted() {
            break;
        }
        eprintln!("bench net: {} ...", runtime.name());
        let run = run_runtime(&containerd, runtime, &args);
        if let Some(e) = &run.error {
            eprintln!("bench net: {}: {e}", runtime.name());
        }
        report.runs.push(run);
    }
    drop(containerd);
    if density::interrupted() {
        eprintln!("podvisor bench net: {}", DensityError::Interrupted);
        return Ok(130);
    }
    let md = markdown(&report);
    print!("{md}");
    for (name, text) in [
        ("net.md", md),
        ("net.json", serde_json::to_string_pretty(&report)?),
    ] {
        let path = report::write_file(&plan.out, name, &text)?;
        println!("wrote {}", path.display());
    }
    Ok(u8::from(report.runs.iter().any(|r| r.error.is_some())))
}

/// One runtime end to end; a failure is recorded in the run, and everything it created
/// (pod, namespaces) is removed before it returns.
fn run_runtime(containerd: &Containerd, runtime: Runtime, args: &NetBenchArgs) -> NetRun {
    let mut run = NetRun {
        runtime: runtime.name().to_string(),
        ..NetRun::default()
    };
    let pair = match NetnsPair::create(runtime.name()) {
        Ok(p) => p,
        Err(e) => {
            run.error = Some(e.to_string());
            return run;
        }
    };
    let id = format!("net-{}", runtime.name());
    if let Err(e) = measure(containerd, runtime, args, &pair, &id, &mut run) {
        run.error = Some(e);
    }
    if let Err(e) = containerd.remove_container(&id, Duration::from_secs(120)) {
        log::warn!("bench net: removing {id}: {e}");
    }
    drop(pair);
    run
}

fn measure(
    containerd: &Containerd,
    runtime: Runtime,
    args: &NetBenchArgs,
    pair: &NetnsPair,
    id: &str,
    run: &mut NetRun,
) -> Result<(), String> {
    let with_ns = format!("network:{}", pair.pod_path().display());
    let start = Instant::now();
    containerd
        .ctr_ok(&[
            "run",
            "-d",
            "--null-io",
            "--runtime",
            runtime.containerd_name(),
            "--with-ns",
            &with_ns,
            image::IMAGE,
            id,
            "sh",
            "-c",
            probe::POD_SERVERS,
        ])
        .map_err(|e| format!("{e}\ncontainerd log:\n{}", containerd.log_tail(20)))?;
    run.started_ms = Some(start.elapsed().as_secs_f64() * 1e3);
    let peer = podvisor_shim::Netns::open(&pair.peer_path())
        .map_err(|e| format!("open {}: {e}", pair.peer_path().display()))?;
    let addr = |port| SocketAddr::from((pair::POD_IP, port));
    let seconds = Duration::from_secs(args.seconds);
    let timeout = Duration::from_secs(args.timeout).saturating_sub(start.elapsed());
    let in_peer = |what: &str, f: &mut (dyn FnMut() -> Result<(), probe::ProbeError> + Send)| {
        peer.run(&format!("bench-net-{what}"), f)
            .map_err(|e| format!("{what}: {e}"))?
            .map_err(|e| format!("{what}: {e}"))
    };
    let mut ready = Duration::ZERO;
    in_peer("ready", &mut || {
        ready = probe::wait_ready(addr(probe::ECHO_PORT), timeout, density::interrupted)?;
        Ok(())
    })?;
    run.ready_ms = Some((start.elapsed()).as_secs_f64() * 1e3);
    log::info!("bench net: {id} answers after {ready:?} of probing");
    in_peer("connect", &mut || {
        let times = probe::connect_times(addr(probe::ECHO_PORT), args.connects)?;
        run.connect_ms = Summary::of(times.iter().map(|t| t.0));
        run.connect_echo_ms = Summary::of(times.iter().map(|t| t.1));
        Ok(())
    })?;
    in_peer("request/response", &mut || {
        let rtts = probe::request_response(addr(probe::ECHO_PORT), seconds, args.rr_max)?;
        let total: f64 = rtts.iter().sum::<f64>() / 1e6;
        run.rr_per_sec = (total > 0.0).then(|| rtts.len() as f64 / total);
        run.rr_us = Summary::of(rtts);
        Ok(())
    })?;
    in_peer("stream to the pod", &mut || {
        run.to_pod = Some(probe::stream_to(addr(probe::SINK_PORT), seconds)?);
        Ok(())
    })?;
    in_peer("stream from the pod", &mut || {
        run.from_pod = Some(probe::stream_from(addr(probe::SOURCE_PORT), seconds)?);
        Ok(())
    })?;
    Ok(())
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn mbit(t: &Option<Throughput>) -> String {
    t.as_ref().map_or("–".into(), |t| {
        format!(
            "{:.1} ({} in {:.1} s)",
            t.mbit_per_sec(),
            mib(Some(t.bytes as f64 / 1024.0)),
            t.secs
        )
    })
}

/// The report as a Markdown table (one row per runtime) plus failures.
pub fn markdown(r: &NetReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# podvisor bench net\n\npod ↔ peer network namespace over a veth pair (podvisor: \
         virtio-net on a tap, tc mirred to the veth); {} s per measurement; podvisor guest \
         {} MiB, templates {}.\n",
        r.seconds,
        r.mem_mib,
        if r.template { "on" } else { "off" }
    );
    let _ = writeln!(
        s,
        "| runtime | start → answers (s) | connect p50 / p95 (ms) | connect + echo p50 (ms) | \
         RR p50 / p99 (µs) | RR/s | peer → pod Mbit/s (MiB moved) | pod → peer Mbit/s (MiB \
         moved) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for run in &r.runs {
        let _ = writeln!(
            s,
            "| {} | {} | {} / {} | {} | {} / {} | {} | {} | {} |",
            run.runtime,
            fmt(run.ready_ms.map(|ms| ms / 1e3), 1),
            fmt(run.connect_ms.p50, 2),
            fmt(run.connect_ms.p95, 2),
            fmt(run.connect_echo_ms.p50, 2),
            fmt(run.rr_us.p50, 0),
            fmt(run.rr_us.p99, 0),
            fmt(run.rr_per_sec, 0),
            mbit(&run.to_pod),
            mbit(&run.from_pod),
        );
    }
    for run in r.runs.iter().filter(|r| r.error.is_some()) {
        let _ = writeln!(
            s,
            "\n{} failed: {}",
            run.runtime,
            run.error.as_deref().unwrap_or("")
        );
    }
    if r.runs.iter().any(|run| run.runtime != "runc") && vmm_emulates_guest_kernel() {
        let _ = writeln!(
            s,
            "\nThis host's /dev/kvm emulates guest kernel code (PVM): every packet's guest \
             kernel work runs far slower than on VMX/SVM hardware."
        );
    }
    s
}

/// Whether the shim's VMM runs on a PVM host (with the shim's host-quirks setting).
fn vmm_emulates_guest_kernel() -> bool {
    let quirks = podvisor_shim::ShimConfig::from_env().host_quirks;
    vmm::HostKind::detect(quirks) == vmm::HostKind::NestedPvm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_has_a_row_per_runtime_and_the_failures() {
        let report = NetReport {
            seconds: 5,
            mem_mib: 256,
            template: true,
            runs: vec![
                NetRun {
                    runtime: "runc".into(),
                    ready_ms: Some(150.0),
                    connect_ms: Summary::of([0.1, 0.2]),
                    rr_us: Summary::of([20.0, 30.0, 40.0]),
                    rr_per_sec: Some(33_000.0),
                    to_pod: Some(Throughput {
                        bytes: 1 << 30,
                        secs: 5.0,
                    }),
                    from_pod: Some(Throughput {
                        bytes: 1 << 29,
                        secs: 5.0,
                    }),
                    ..NetRun::default()
                },
                NetRun {
                    runtime: "podvisor".into(),
                    error: Some("did not answer".into()),
                    ..NetRun::default()
                },
            ],
        };
        let md = markdown(&report);
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 3, "{md}");
        assert!(
            rows[1].starts_with(
                "| runc | 0.1 | 0.10 / 0.20 | – | 30 / 40 | 33000 | 1718.0 (1024.0 in 5.0 s) |"
            ),
            "{md}"
        );
        assert!(rows[2].starts_with("| podvisor | – |"), "{md}");
        assert!(md.contains("podvisor failed: did not answer"), "{md}");
        let json = serde_json::to_string(&report).unwrap();
        let back: NetReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.runs.len(), 2);
        assert_eq!(back.runs[0].to_pod, report.runs[0].to_pod);
    }

    #[test]
    fn rejects_zero_durations() {
        let args: NetBenchArgs = crate::parse_args("--runtime runc --seconds 0");
        assert!(run(args).unwrap_err().to_string().contains("--seconds"));
    }
}
