//! What a density run found: the records (serialised as `density.json`), the Markdown
//! tables (`density.md`, also printed) and the files written to `--out`.
//!
//! Columns (per runtime):
//! * latency: `ctr run` spawned → `/tasks/start` event (running) and → first stdout line
//!   (first output), p50/p95/p99 over the pods;
//! * PSS/pod: the pod's host processes (shim + its descendants), mean and max;
//! * overhead: PSS outside guest RAM (podvisor: VMM + shim; runc: the runc shim);
//! * workload: podvisor: guest RAM the guest touched; runc: the container's processes;
//! * machine/pod: (MemTotal − MemAvailable) after minus before, less the PSS of the
//!   harness's own `ctr` clients, divided by N (catches what PSS misses: kernel memory,
//!   KVM's own structures, containerd's growth; noisy for small N);
//! * commit/pod: `Committed_AS` delta / N (what `MAP_NORESERVE` keeps out);
//! * pods/s: pods up / time from the first spawn to the last first output line.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use podvisor_shim::timeline::TimelineRecord;

use super::memory::MemInfo;
use super::stats::Summary;
use super::{DensityError, Plan};

/// The whole run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub config: ConfigRecord,
    pub runs: Vec<RuntimeRun>,
    /// The alloc-free scenario's runs (`--scenario alloc-free`).
    #[serde(default)]
    pub alloc_free: Vec<AllocFreeRun>,
}

/// One runtime's alloc-free pods ([`super::alloc_free`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AllocFreeRun {
    pub runtime: String,
    /// MiB each pod touched and freed.
    pub alloc_mib: u64,
    /// Seconds between the free and the last measurement.
    pub reclaim_wait_s: u64,
    pub pods: Vec<AllocFreeRecord>,
    pub teardown_problems: Vec<String>,
}

/// One alloc-free pod: its PSS (shim + descendants, KiB) before, right after the free and
/// after the wait.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AllocFreeRecord {
    pub id: String,
    pub error: Option<String>,
    /// Spawn to `ready`, seconds.
    pub start_s: Option<f64>,
    /// The allocation and free (from the end of the pause to `freed`), seconds.
    pub alloc_s: Option<f64>,
    pub baseline_pss_kib: Option<u64>,
    /// The most seen while the pod allocated (sampled about once a second).
    #[serde(default)]
    pub peak_pss_kib: Option<u64>,
    pub freed_pss_kib: Option<u64>,
    pub settled_pss_kib: Option<u64>,
}

/// The mean of `f` over the pods where it is known.
fn mean_of<T>(items: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = items.iter().filter_map(f).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The alloc-free table: one row per runtime, means over its pods.
pub fn alloc_free_markdown(runs: &[AllocFreeRun]) -> String {
    let Some(first) = runs.first() else {
        return String::new();
    };
    let mut out = format!(
        "\n## Alloc-free: each pod touches {} MiB, frees it and idles\n\nPSS per pod (shim + descendants), mean over the pods: before the allocation, its peak while allocating (sampled each second), right after the free, and {} s later. Given back: how much of the growth at the peak came back.\n\n| runtime | pods ok | PSS before (MiB) | peak (MiB) | right after the free (MiB) | {} s later (MiB) | still above before (MiB) | given back | alloc + free took |\n|---|---|---|---|---|---|---|---|---|\n",
        first.alloc_mib, first.reclaim_wait_s, first.reclaim_wait_s
    );
    for r in runs {
        let ok: Vec<&AllocFreeRecord> = r
            .pods
            .iter()
            .filter(|p| p.error.is_none() && p.settled_pss_kib.is_some())
            .collect();
        let kib = |f: fn(&AllocFreeRecord) -> Option<u64>| mean_of(&ok, |p| f(p).map(|v| v as f64));
        let (before, peak, freed, settled) = (
            kib(|p| p.baseline_pss_kib),
            kib(|p| p.peak_pss_kib.max(p.freed_pss_kib)),
            kib(|p| p.freed_pss_kib),
            kib(|p| p.settled_pss_kib),
        );
        let above = before.zip(settled).map(|(b, s)| s - b);
        // Of what the pod grew by at its peak, how much came back.
        let given_back = match (before, peak, settled) {
            (Some(b), Some(p), Some(s)) if p - b > 1024.0 => {
                format!("{:.0}%", 100.0 * (p - s) / (p - b))
            }
            (Some(_), Some(_), Some(_)) => "no growth seen (back within a sample)".into(),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {} |",
            r.runtime,
            ok.len(),
            r.pods.len(),
            mib(before),
            mib(peak),
            mib(freed),
            mib(settled),
            mib(above),
            given_back,
            secs(mean_of(&ok, |p| p.alloc_s).map(|s| s * 1000.0)),
        );
    }
    for r in runs {
        for p in r.pods.iter().filter(|p| p.error.is_some()) {
            let _ = writeln!(
                out,
                "\n{} alloc-free pod {} failed: {}",
                r.runtime,
                p.id,
                p.error.as_deref().unwrap_or_default()
            );
        }
        for t in &r.teardown_problems {
            let _ = writeln!(out, "\n{} alloc-free teardown: {t}", r.runtime);
        }
    }
    out
}

/// How the run was set up.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ConfigRecord {
    pub pods: usize,
    pub parallel: usize,
    pub mem_mib: u64,
    pub vcpus: usize,
    pub ksm: String,
    pub noreserve: bool,
    #[serde(default)]
    pub template: bool,
    pub settle_s: u64,
    pub containerd: String,
    pub host_cpus: usize,
    pub host_mem_total_kib: u64,
    pub unix_time: u64,
    /// The shim's `guest_overhead_mib` and `memory_step_mib` (its defaults: the harness
    /// does not change them), for the overhead advice.
    #[serde(default)]
    pub guest_overhead_mib: u64,
    #[serde(default)]
    pub memory_step_mib: u64,
    /// The scenario: `idle` or `alloc-free`.
    #[serde(default)]
    pub scenario: String,
}

impl ConfigRecord {
    pub fn new(plan: &Plan, ksm_note: &str) -> ConfigRecord {
        ConfigRecord {
            pods: plan.pods,
            parallel: plan.parallel,
            mem_mib: plan.mem_mib,
            vcpus: plan.vcpus,
            ksm: ksm_note.to_string(),
            noreserve: plan.noreserve,
            template: plan.template,
            settle_s: plan.settle.as_secs(),
            containerd: match &plan.address {
                Some(a) => format!("existing at {}", a.display()),
                None => "private (Debian containerd)".into(),
            },
            host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            host_mem_total_kib: super::memory::meminfo().map_or(0, |m| m.total_kib),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            guest_overhead_mib: shim_defaults().guest_overhead_mib,
            memory_step_mib: shim_defaults().memory_step_mib,
            scenario: plan.scenario.name().to_string(),
        }
    }
}

fn shim_defaults() -> podvisor_shim::config::ShimConfig {
    podvisor_shim::config::ShimConfig::default()
}

/// One pod.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PodRecord {
    pub id: String,
    /// Start order, 0-based.
    pub index: usize,
    pub wave: usize,
    /// Why the pod failed (not started, no output, memory unreadable).
    pub error: Option<String>,
    pub to_created_ms: Option<f64>,
    pub to_running_ms: Option<f64>,
    pub to_first_output_ms: Option<f64>,
    pub shim_pid: Option<u32>,
    /// Host processes of the pod (shim + descendants).
    pub processes: usize,
    pub pss_kib: Option<u64>,
    pub overhead_pss_kib: Option<u64>,
    pub workload_pss_kib: Option<u64>,
    pub rss_kib: Option<u64>,
    /// Pages only this pod maps (Private_Clean + Private_Dirty of its processes).
    #[serde(default)]
    pub private_kib: Option<u64>,
    /// The shim's start timeline of the pod (podvisor pods; `timeline.json` in its state
    /// dir, `podvisor_shim::timeline`).
    #[serde(default)]
    pub timeline: Option<TimelineRecord>,
}

/// Machine-wide memory before the first pod and after the last settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MachineDelta {
    pub before: MemInfo,
    pub after: MemInfo,
    pub used_delta_kib: i64,
    /// PSS of the harness's `ctr` clients (not pods), subtracted from the delta.
    pub harness_clients_pss_kib: u64,
    /// (used delta - harness clients) / N.
    pub used_per_pod_kib: f64,
    pub committed_per_pod_kib: f64,
    pub ksm_pages_sharing: Option<u64>,
}

/// Machine used-memory delta after each wave.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WaveSample {
    pub pods_up: usize,
    pub seconds: f64,
    pub used_delta_kib: i64,
}

/// Summaries over a runtime's pods (latencies in ms, memory in KiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunSummary {
    pub ok: usize,
    pub failures: usize,
    pub to_running_ms: Summary,
    pub to_first_output_ms: Summary,
    pub pss_kib: Summary,
    pub overhead_pss_kib: Summary,
    pub workload_pss_kib: Summary,
    #[serde(default)]
    pub private_kib: Summary,
}

impl RunSummary {
    pub fn of(pods: &[PodRecord]) -> RunSummary {
        let ok: Vec<&PodRecord> = pods.iter().filter(|p| p.error.is_none()).collect();
        let f = |g: fn(&PodRecord) -> Option<f64>| Summary::of(ok.iter().filter_map(|p| g(p)));
        RunSummary {
            ok: ok.len(),
            failures: pods.len() - ok.len(),
            to_running_ms: f(|p| p.to_running_ms),
            to_first_output_ms: f(|p| p.to_first_output_ms),
            pss_kib: f(|p| p.pss_kib.map(|v| v as f64)),
            overhead_pss_kib: f(|p| p.overhead_pss_kib.map(|v| v as f64)),
            workload_pss_kib: f(|p| p.workload_pss_kib.map(|v| v as f64)),
            private_kib: f(|p| p.private_kib.map(|v| v as f64)),
        }
    }
}

/// One runtime's pods.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RuntimeRun {
    pub runtime: String,
    pub pods: Vec<PodRecord>,
    pub waves: Vec<WaveSample>,
    pub machine: MachineDelta,
    /// First spawn → last first-output line, seconds.
    pub start_wall_s: f64,
    pub pods_per_s: f64,
    pub summary: RunSummary,
    pub teardown_problems: Vec<String>,
    /// CPU of each pod's shim (every thread) over the settle period, millicores, mean.
    #[serde(default)]
    pub idle_cpu_millicores: Option<f64>,
    /// `MemAvailable` inside the first pod's guest (podvisor), KiB.
    #[serde(default)]
    pub guest_available_kib: Option<u64>,
}

/// The density targets (printed next to the figures, never asserted).
pub const TARGET_OVERHEAD_MIB: f64 = 4.0;
pub const TARGET_TOTAL_MIB: f64 = 24.0;

/// A latency for tables: `850 ms`, `12.3 s`, or `n/a`.
pub fn secs(ms: Option<f64>) -> String {
    ms.map_or("n/a".into(), |v| {
        if v < 1000.0 {
            format!("{v:.0} ms")
        } else {
            format!("{:.1} s", v / 1000.0)
        }
    })
}

/// KiB as MiB with one decimal, or `n/a`.
pub fn mib(kib: Option<f64>) -> String {
    kib.map_or("n/a".into(), |v| format!("{:.1}", v / 1024.0))
}

/// The Markdown report: configuration, one summary row per runtime, targets, failures.
pub fn markdown(report: &Report) -> String {
    if report.runs.is_empty() {
        return format!(
            "{}{}",
            failures(report),
            alloc_free_markdown(&report.alloc_free)
        );
    }
    let c = &report.config;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Density: {} idle busybox pods per runtime, waves of {}\n",
        c.pods, c.parallel
    );
    let _ = writeln!(
        out,
        "podvisor guest: {} MiB, {} vCPU, MAP_NORESERVE {}, KSM {}, templates {}; containerd: {}; host: {} CPUs, {:.1} GiB; memory measured {} s after the last pod started. machine/pod counts the whole host: anything else running meanwhile shows up in it.\n",
        c.mem_mib,
        c.vcpus,
        if c.noreserve { "on" } else { "off" },
        c.ksm,
        if c.template { "on" } else { "off" },
        c.containerd,
        c.host_cpus,
        c.host_mem_total_kib as f64 / (1024.0 * 1024.0),
        c.settle_s
    );
    out += "| runtime | pods ok | running p50 / p95 / p99 | first output p50 / p95 / p99 | PSS/pod mean / max (MiB) | overhead mean / max (MiB) | workload mean (MiB) | machine/pod (MiB) | commit/pod (MiB) | pods/s |\n";
    out += "|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &report.runs {
        let s = &r.summary;
        let _ = writeln!(
            out,
            "| {} | {}/{} | {} / {} / {} | {} / {} / {} | {} / {} | {} / {} | {} | {:.1} | {:.1} | {:.3} |",
            r.runtime,
            s.ok,
            r.pods.len(),
            secs(s.to_running_ms.p50),
            secs(s.to_running_ms.p95),
            secs(s.to_running_ms.p99),
            secs(s.to_first_output_ms.p50),
            secs(s.to_first_output_ms.p95),
            secs(s.to_first_output_ms.p99),
            mib(s.pss_kib.mean),
            mib(s.pss_kib.max),
            mib(s.overhead_pss_kib.mean),
            mib(s.overhead_pss_kib.max),
            mib(s.workload_pss_kib.mean),
            r.machine.used_per_pod_kib / 1024.0,
            r.machine.committed_per_pod_kib / 1024.0,
            r.pods_per_s
        );
    }
    if let Some(p) = report.runs.iter().find(|r| r.runtime == "podvisor") {
        let s = &p.summary;
        let reach = |v: Option<f64>, target: f64| match v {
            Some(v) if v / 1024.0 <= target => "met",
            Some(_) => "NOT met",
            None => "not measured",
        };
        // The machine-wide delta is noisy (anything else on the host moves it): when it
        // came out at or below zero, the pods' PSS is the estimate.
        let (per_pod_kib, basis) = if p.machine.used_per_pod_kib > 0.0 {
            (p.machine.used_per_pod_kib, "machine/pod")
        } else {
            (
                s.pss_kib.mean.unwrap_or(0.0),
                "PSS/pod (machine/pod came out <= 0: noise)",
            )
        };
        let _ = writeln!(
            out,
            "\nTargets (podvisor, figures not assertions): overhead outside guest RAM <= {TARGET_OVERHEAD_MIB} MiB/pod: {} (mean {} MiB); total <= {TARGET_TOTAL_MIB} MiB/pod: {} (mean {} MiB); 100 pods on this host at the measured {basis}: {:.1} GiB.",
            reach(s.overhead_pss_kib.mean, TARGET_OVERHEAD_MIB),
            mib(s.overhead_pss_kib.mean),
            reach(s.pss_kib.mean, TARGET_TOTAL_MIB),
            mib(s.pss_kib.mean),
            100.0 * per_pod_kib / (1024.0 * 1024.0)
        );
    }
    out += &failures(report);
    out += &where_the_time_goes(report);
    out += &alloc_free_markdown(&report.alloc_free);
    if let Some(p) = super::overhead::pod_fixed(report) {
        out += &super::overhead::markdown(&p);
    }
    out
}

/// The median of `v` (none when empty).
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// "Where the time goes": per runtime run with timelines, each phase of the shim's start
/// timeline (the time since the previous mark), median over the pods that have it, with
/// the VM's exits and vCPU time in it and the shim process's CPU time.
pub fn where_the_time_goes(report: &Report) -> String {
    let mut out = String::new();
    for r in &report.runs {
        let timelines: Vec<&TimelineRecord> =
            r.pods.iter().filter_map(|p| p.timeline.as_ref()).collect();
        if timelines.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "\n### Where the time goes: {} ({} pods with a timeline; median per phase, from the previous mark)\n",
            r.runtime,
            timelines.len()
        );
        out += "| phase | ms | vCPU ms | exits | port I/O | MMIO | interrupted | shim CPU ms |\n|---|---|---|---|---|---|---|---|\n";
        // Phases in the order the first complete timeline has them.
        let order: Vec<String> = timelines
            .iter()
            .max_by_key(|t| t.marks.len())
            .map(|t| t.marks.iter().skip(1).map(|m| m.phase.clone()).collect())
            .unwrap_or_default();
        for phase in &order {
            let steps: Vec<(f64, vmm::VmStats, f64)> = timelines
                .iter()
                .filter_map(|t| {
                    let i = t.marks.iter().position(|m| &m.phase == phase)?;
                    let (a, b) = (&t.marks[i.checked_sub(1)?], &t.marks[i]);
                    let zero = vmm::VmStats::default();
                    Some((
                        b.at_ms - a.at_ms,
                        b.vm.unwrap_or(zero).since(&a.vm.unwrap_or(zero)),
                        b.process_cpu_ms - a.process_cpu_ms,
                    ))
                })
                .collect();
            let med = |f: &dyn Fn(&(f64, vmm::VmStats, f64)) -> f64| {
                median(steps.iter().map(f).collect()).map_or("n/a".into(), |v| format!("{v:.0}"))
            };
            let _ = writeln!(
                out,
                "| {phase} | {} | {} | {} | {} | {} | {} | {} |",
                med(&|s| s.0),
                med(&|s| s.1.vcpu_cpu_ns as f64 / 1e6),
                med(&|s| s.1.exits() as f64),
                med(&|s| s.1.exits_port_io as f64),
                med(&|s| s.1.exits_mmio as f64),
                med(&|s| s.1.exits_interrupted as f64),
                med(&|s| s.2),
            );
        }
        let totals: Vec<f64> = timelines
            .iter()
            .filter(|t| t.complete)
            .filter_map(|t| t.marks.last().map(|m| m.at_ms))
            .collect();
        let _ = writeln!(
            out,
            "\nCreate received → first output, median over {} complete timelines: {} ms; sources: {}.",
            totals.len(),
            median(totals).map_or("n/a".into(), |v| format!("{v:.0}")),
            {
                let mut s: Vec<&str> = timelines
                    .iter()
                    .map(|t| t.source.as_deref().unwrap_or("none"))
                    .collect();
                s.sort_unstable();
                s.dedup();
                s.join(", ")
            }
        );
        out += &guest_profile(&timelines, &order);
    }
    out
}

/// Functions named per phase in the guest profile table.
const PROFILE_FUNCTIONS: usize = 8;

/// The guest profile per phase, summed over the pods (profiled runs only): the most
/// sampled functions with their share of the phase's samples.
fn guest_profile(timelines: &[&TimelineRecord], order: &[String]) -> String {
    let mut rows = String::new();
    for phase in order {
        let mut by: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for m in timelines
            .iter()
            .flat_map(|t| &t.marks)
            .filter(|m| &m.phase == phase)
        {
            for e in &m.guest_profile {
                *by.entry(e.function.as_str()).or_default() += e.samples;
            }
        }
        let total: u64 = by.values().sum();
        if total == 0 {
            continue;
        }
        let mut top: Vec<(&str, u64)> = by.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let named: Vec<String> = top
            .iter()
            .take(PROFILE_FUNCTIONS)
            .map(|(f, n)| format!("{f} {:.0}%", *n as f64 * 100.0 / total as f64))
            .collect();
        let _ = writeln!(rows, "| {phase} | {total} | {} |", named.join(", "));
    }
    if rows.is_empty() {
        return rows;
    }
    format!(
        "\nGuest profile (where the vCPUs were; samples summed over the pods, `[user]` is guest \
         user space, `(other)` the functions past each pod's top 40):\n\n\
         | phase | samples | most sampled |\n|---|---|---|\n{rows}"
    )
}

/// Writes `text` to `dir/name` (creating `dir`); returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf, DensityError> {
    let path = dir.join(name);
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&path, text))
        .map_err(|source| DensityError::Output {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

/// A report written earlier (`density.json`, `template.json`), for `--from-json`.
pub fn read(path: &Path) -> Result<Report, DensityError> {
    let bad = |e: String| DensityError::Usage(format!("--from-json {}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
}

/// One paragraph per failed pod and per teardown problem.
pub fn failures(report: &Report) -> String {
    let mut out = String::new();
    for r in &report.runs {
        for p in r.pods.iter().filter(|p| p.error.is_some()) {
            let _ = writeln!(
                out,
                "\n{} pod {} failed: {}",
                r.runtime,
                p.id,
                p.error.as_deref().unwrap_or_default()
            );
        }
        for t in &r.teardown_problems {
            let _ = writeln!(out, "\n{} teardown: {t}", r.runtime);
        }
    }
    out
}

/// The per-pod table (appended to density.md).
pub fn pod_table(report: &Report) -> String {
    let mut out = String::from(
        "\n### Per pod\n\n| runtime | # | wave | created | running | first output | PSS (MiB) | overhead (MiB) | workload (MiB) | procs |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &report.runs {
        for p in &r.pods {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.runtime,
                p.index + 1,
                p.wave + 1,
                secs(p.to_created_ms),
                secs(p.to_running_ms),
                secs(p.to_first_output_ms),
                mib(p.pss_kib.map(|v| v as f64)),
                mib(p.overhead_pss_kib.map(|v| v as f64)),
                mib(p.workload_pss_kib.map(|v| v as f64)),
                p.processes
            );
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn pod(
        runtime: &str,
        index: usize,
        first_ms: f64,
        overhead: u64,
        workload: u64,
    ) -> PodRecord {
        PodRecord {
            id: format!("{runtime}-{index}"),
            index,
            wave: index / 2,
            to_created_ms: Some(first_ms * 0.5),
            to_running_ms: Some(first_ms * 0.9),
            to_first_output_ms: Some(first_ms),
            shim_pid: Some(100 + u32::try_from(index).unwrap()),
            processes: 1,
            pss_kib: Some(overhead + workload),
            overhead_pss_kib: Some(overhead),
            workload_pss_kib: Some(workload),
            rss_kib: Some(overhead + workload + 100),
            private_kib: Some(overhead),
            error: None,
            timeline: None,
        }
    }

    pub fn sample() -> Report {
        let run = |name: &str, ms: f64, overhead: u64, workload: u64| {
            let mut pods: Vec<PodRecord> = (0..4)
                .map(|i| pod(name, i, ms + i as f64 * 10.0, overhead, workload + i as u64))
                .collect();
            pods[3].error = Some("ctr run exited before any output".into());
            RuntimeRun {
                runtime: name.into(),
                summary: RunSummary::of(&pods),
                pods,
                waves: vec![WaveSample {
                    pods_up: 2,
                    seconds: 1.0,
                    used_delta_kib: 4096,
                }],
                machine: MachineDelta {
                    used_per_pod_kib: 20.0 * 1024.0,
                    committed_per_pod_kib: 2048.0,
                    ..Default::default()
                },
                start_wall_s: 2.0,
                pods_per_s: 1.5,
                teardown_problems: vec![],
                idle_cpu_millicores: None,
                guest_available_kib: None,
            }
        };
        Report {
            config: ConfigRecord {
                pods: 4,
                parallel: 2,
                mem_mib: 128,
                vcpus: 1,
                ksm: "off".into(),
                noreserve: true,
                ..Default::default()
            },
            runs: vec![
                run("runc", 120.0, 5 * 1024, 300),
                run("podvisor", 75_000.0, 3 * 1024, 20 * 1024),
            ],
            alloc_free: vec![],
        }
    }

    #[test]
    fn summary_skips_failed_pods() {
        let r = sample();
        let s = &r.runs[0].summary;
        assert_eq!((s.ok, s.failures), (3, 1));
        assert_eq!(s.to_first_output_ms.p50, Some(130.0));
        assert_eq!(s.to_first_output_ms.max, Some(140.0));
        assert_eq!(s.workload_pss_kib.mean, Some(301.0));
    }

    #[test]
    fn a_noisy_machine_delta_falls_back_to_pss() {
        let mut r = sample();
        for run in &mut r.runs {
            run.machine.used_per_pod_kib = -400.0;
        }
        let md = markdown(&r);
        assert!(
            md.contains("100 pods on this host at the measured PSS/pod (machine/pod came out <= 0: noise): 2.2 GiB"),
            "{md}"
        );
    }

    #[test]
    fn markdown_has_one_row_per_runtime_and_the_targets() {
        let md = markdown(&sample());
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 3, "{md}");
        assert!(
            rows[1].starts_with(
                "| runc | 3/4 | 117 ms / 126 ms / 126 ms | 130 ms / 140 ms / 140 ms | 5.3 / 5.3 |"
            ),
            "{md}"
        );
        assert!(rows[2].contains("| 75.0 s / 75.0 s / 75.0 s |"), "{md}");
        assert!(rows[2].contains("| 3.0 / 3.0 |"), "{md}");
        assert!(md.contains("<= 4 MiB/pod: met"), "{md}");
        assert!(md.contains("<= 24 MiB/pod: met (mean 23.0 MiB)"), "{md}");
        assert!(
            md.contains("100 pods on this host at the measured machine/pod: 2.0 GiB"),
            "{md}"
        );
        assert!(
            md.contains("runc pod runc-3 failed: ctr run exited"),
            "{md}"
        );
        let pods = pod_table(&sample());
        assert_eq!(
            pods.lines().filter(|l| l.starts_with("| podvisor")).count(),
            4
        );
    }

    #[test]
    fn alloc_free_rows_say_how_much_came_back() {
        let rec = |b: u64, f: u64, st: u64| AllocFreeRecord {
            id: "p".into(),
            alloc_s: Some(2.0),
            baseline_pss_kib: Some(b * 1024),
            freed_pss_kib: Some(f * 1024),
            settled_pss_kib: Some(st * 1024),
            ..Default::default()
        };
        let runs = vec![
            AllocFreeRun {
                runtime: "runc".into(),
                alloc_mib: 200,
                reclaim_wait_s: 30,
                pods: vec![rec(2, 2, 2)],
                teardown_problems: vec![],
            },
            AllocFreeRun {
                runtime: "podvisor".into(),
                alloc_mib: 200,
                reclaim_wait_s: 30,
                pods: vec![
                    rec(40, 240, 44),
                    AllocFreeRecord {
                        error: Some("no `freed`".into()),
                        ..Default::default()
                    },
                ],
                teardown_problems: vec![],
            },
        ];
        let md = alloc_free_markdown(&runs);
        assert!(
            md.contains("| runc | 1/1 | 2.0 | 2.0 | 2.0 | 2.0 | 0.0 | no growth seen (back within a sample) | 2.0 s |"),
            "{md}"
        );
        assert!(
            md.contains("| podvisor | 1/2 | 40.0 | 240.0 | 240.0 | 44.0 | 4.0 | 98% | 2.0 s |"),
            "{md}"
        );
        assert!(
            md.contains("podvisor alloc-free pod  failed: no `freed`"),
            "{md}"
        );
        assert_eq!(alloc_free_markdown(&[]), "");
    }

    #[test]
    fn the_time_table_has_a_median_row_per_phase() {
        use podvisor_shim::timeline::Mark;
        let mark = |phase: &str, at_ms: f64, exits: u64, vcpu_ms: u64| Mark {
            phase: phase.into(),
            at_ms,
            vm: Some(vmm::VmStats {
                exits_port_io: exits,
                vcpu_cpu_ns: vcpu_ms * 1_000_000,
                ..Default::default()
            }),
            process_cpu_ms: at_ms / 2.0,
            guest_profile: Vec::new(),
        };
        let mut r = sample();
        for (i, p) in r.runs[1].pods.iter_mut().enumerate() {
            let k = i as f64;
            p.timeline = Some(TimelineRecord {
                pod: p.id.clone(),
                source: Some("template".into()),
                container: Some(p.id.clone()),
                complete: true,
                marks: vec![
                    mark("create", 0.0, 0, 0),
                    mark("vm", 10.0 + k, 0, 0),
                    mark("agent", 900.0 + k, 40, 300),
                    mark("output", 5000.0, 100, 2000),
                ],
            });
        }
        let md = where_the_time_goes(&r);
        assert!(
            md.contains("### Where the time goes: podvisor (4 pods"),
            "{md}"
        );
        assert!(md.contains("| vm | 12 | 0 | 0 | 0 | 0 | 0 | 6 |"), "{md}");
        assert!(
            md.contains("| agent | 890 | 300 | 40 | 40 | 0 | 0 | 445 |"),
            "{md}"
        );
        assert!(md.contains("| output | 4098 | 1700 | 60 |"), "{md}");
        assert!(
            md.contains("median over 4 complete timelines: 5000 ms; sources: template."),
            "{md}"
        );
        assert!(!md.contains("runc"), "{md}");
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn json_round_trips() {
        let r = sample();
        let text = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back.runs[1].pods, r.runs[1].pods);
        assert_eq!(back.runs[1].summary, r.runs[1].summary);
    }
}
