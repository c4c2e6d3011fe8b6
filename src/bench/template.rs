//! `podvisor bench template`: pod start from a template clone next to a cold boot and
//! runc, and the clones' memory split into shared template pages and private pages, for
//! N = 1, 10, 50 clones (`--clones`), all in one run of one private containerd.
//!
//! The series (density harness, [`density::run_template_series`]): runc pods up to each N;
//! one podvisor pod with templates off (annotation `io.podvisor.config.template=off`: a
//! cold boot); the podvisor pod that builds the template (a cold boot plus snapshot, then
//! its own clone: reported apart); then clones up to each N. Memory is measured at each N
//! after `--settle` seconds with every pod of the series still running. Per pod: PSS, and
//! private = Private_Clean + Private_Dirty of the shim (what the pod alone costs); PSS −
//! private is its share of pages mapped by others (for clones: the template's memory file
//! in the page cache, counted 1/N per clone).
//!
//! Writes `template.md` (printed too), `template.json` (every run, every pod) and
//! `template.png` (per-pod latency and memory at the largest N) to `--out`.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use super::density::report::{mib, secs, write_file, Report, RuntimeRun};
use super::density::{self, DensityArgs, DensityError, GuestArgs, OnOff, RuntimeChoice};

#[derive(Args, Debug, Clone)]
pub struct TemplateBenchArgs {
    /// Clone counts to measure at, ascending (cumulative: the pods of N=1 stay for N=10).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    pub clones: Vec<usize>,
    /// Pods started at once.
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// Whether to run the runc column.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub runc: OnOff,
    /// Where template.md, template.json and template.png go (created).
    #[arg(long, default_value = "bench-template")]
    pub out: PathBuf,
    /// Guest memory per pod, MiB (shim default 256).
    #[arg(long)]
    pub mem_mib: Option<u64>,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Seconds to wait at each N before measuring memory.
    #[arg(long, default_value_t = 5)]
    pub settle: u64,
    /// Per-pod limit to reach its first output line, seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Start no pods: write template.md and template.png again from this template.json
    /// of an earlier run (the clone counts are read from it).
    #[arg(long)]
    pub from_json: Option<PathBuf>,
}

/// The density arguments of this series (checked by [`density::plan`]).
fn density_args(args: &TemplateBenchArgs) -> Result<DensityArgs, DensityError> {
    let mut sorted = args.clones.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.is_empty() || sorted[0] == 0 || sorted != args.clones {
        return Err(DensityError::Usage(format!(
            "--clones must be distinct ascending counts >= 1 (e.g. 1,10,50), got {:?}",
            args.clones
        )));
    }
    let max = *sorted.last().expect("not empty");
    Ok(DensityArgs {
        parallel: args.parallel.min(max),
        template: Some(OnOff::On),
        settle: Some(args.settle),
        ..DensityArgs::series(
            max,
            RuntimeChoice::Both,
            &args.out,
            &args.guest,
            args.mem_mib,
            args.timeout,
        )
    })
}

pub fn run(args: TemplateBenchArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let (report, clones) = match &args.from_json {
        Some(json) => {
            let report = density::report::read(json)?;
            let clones = clone_counts(&report);
            (report, clones)
        }
        None => {
            let plan = density::plan(&density_args(&args)?)?;
            density::install_interrupt_handler();
            match density::run_template_series(&plan, &args.clones, args.runc == OnOff::On) {
                Ok(r) => (r, args.clones.clone()),
                Err(DensityError::Interrupted) => {
                    eprintln!("podvisor bench template: {}", DensityError::Interrupted);
                    return Ok(130);
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    write(&report, &clones, &args.out)
}

/// The clone counts of a report: the N of its `podvisor clones N=<n>` runs.
fn clone_counts(report: &Report) -> Vec<usize> {
    report
        .runs
        .iter()
        .filter(|r| r.runtime.starts_with("podvisor clones"))
        .filter_map(|r| r.runtime.rsplit_once("N=")?.1.parse().ok())
        .collect()
}

/// Prints the table and writes template.md, template.json and template.png to `out`.
fn write(
    report: &Report,
    clones: &[usize],
    out: &std::path::Path,
) -> Result<u8, Box<dyn std::error::Error>> {
    let text = markdown(report, clones);
    print!("{text}");
    let json = write_file(out, "template.json", &serde_json::to_string_pretty(report)?)?;
    let png = out.join("template.png");
    let mut full = text;
    match density::plot::draw(&largest_only(report, clones), &png) {
        Ok(()) => {
            let _ = writeln!(full, "\nPlot: {}", png.display());
        }
        Err(e) => log::warn!("no plot: {e}"),
    }
    full += &density::report::pod_table(report);
    let md = write_file(out, "template.md", &full)?;
    for p in [&md, &json, &png] {
        if p.exists() {
            println!("wrote {}", p.display());
        }
    }
    let failed: usize = report.runs.iter().map(|r| r.summary.failures).sum();
    Ok(if failed > 0 { 1 } else { 0 })
}

/// The runs at the largest N plus the single-pod runs (for the plot).
fn largest_only(report: &Report, clones: &[usize]) -> Report {
    let max = clones.iter().max().copied().unwrap_or(0);
    let suffix = format!(" N={max}");
    Report {
        config: report.config.clone(),
        runs: report
            .runs
            .iter()
            .filter(|r| r.runtime.ends_with(&suffix) || !r.runtime.contains(" N="))
            .cloned()
            .collect(),
        alloc_free: Vec::new(),
    }
}

/// The template targets (figures, not assertions).
pub const TARGET_CLONE_VS_RUNC: f64 = 3.0;
pub const TARGET_PRIVATE_MIB: f64 = 8.0;

/// The side-by-side table: one row per run.
pub fn markdown(report: &Report, clones: &[usize]) -> String {
    let c = &report.config;
    let mut out = format!(
        "\n## Pod start from a template: cold boot vs clone vs runc, N = {}\n\n\
         podvisor guest: {} MiB, {} vCPU; pods started {} at a time; memory measured {} s \
         after the last pod of each N, all pods of the series still running. Start = `ctr run` \
         spawned → the pod's first output line. PSS − private = the pod's share of pages it \
         maps with others (clones: the template's memory file).\n\n",
        clones
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        c.mem_mib,
        c.vcpus,
        c.parallel,
        c.settle_s
    );
    out += "| run | pods ok | start p50 / p95 | PSS/pod mean (MiB) | private/pod mean / max (MiB) | shared PSS/pod mean (MiB) | machine/pod (MiB) |\n";
    out += "|---|---|---|---|---|---|---|\n";
    for r in &report.runs {
        let s = &r.summary;
        let shared = match (s.pss_kib.mean, s.private_kib.mean) {
            (Some(p), Some(q)) => Some((p - q).max(0.0)),
            _ => None,
        };
        let _ = writeln!(
            out,
            "| {} | {}/{} | {} / {} | {} | {} / {} | {} | {:.1} |",
            r.runtime,
            s.ok,
            r.pods.len(),
            secs(s.to_first_output_ms.p50),
            secs(s.to_first_output_ms.p95),
            mib(s.pss_kib.mean),
            mib(s.private_kib.mean),
            mib(s.private_kib.max),
            mib(shared),
            r.machine.used_per_pod_kib / 1024.0
        );
    }
    let p50 = |pred: &dyn Fn(&RuntimeRun) -> bool| {
        report
            .runs
            .iter()
            .rev()
            .filter(|r| pred(r))
            .find_map(|r| r.summary.to_first_output_ms.p50)
    };
    let runc = p50(&|r| r.runtime.starts_with("runc"));
    let clone = p50(&|r| r.runtime.starts_with("podvisor clones"));
    let cold = p50(&|r| r.runtime.starts_with("podvisor-cold"));
    let private = report
        .runs
        .iter()
        .rev()
        .filter(|r| r.runtime.starts_with("podvisor clones"))
        .find_map(|r| r.summary.private_kib.mean);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.1}x", a / b),
        _ => "n/a".into(),
    };
    let _ = writeln!(
        out,
        "\nClone start vs runc: {} (target <= {TARGET_CLONE_VS_RUNC}x); clone vs cold boot: {}; \
         private memory per idle clone at the largest N: {} MiB (target <= {TARGET_PRIVATE_MIB} MiB).",
        ratio(clone, runc),
        ratio(clone, cold),
        mib(private)
    );
    out += &density::report::failures(report);
    out += &density::report::where_the_time_goes(report);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> TemplateBenchArgs {
        crate::parse_args(line)
    }

    #[test]
    fn clone_counts_must_ascend() {
        let a = density_args(&args("--clones 1,10,50 --parallel 4")).unwrap();
        assert_eq!((a.pods, a.parallel), (50, 4));
        assert_eq!(a.template, Some(OnOff::On));
        let small = density_args(&args("--clones 1 --parallel 4")).unwrap();
        assert_eq!(small.parallel, 1, "no more at once than there are pods");
        for bad in ["--clones 10,1", "--clones 0,1", "--clones 1,1"] {
            let e = density_args(&args(bad)).unwrap_err().to_string();
            assert!(e.contains("ascending"), "{bad}: {e}");
        }
    }

    #[test]
    fn table_compares_clones_with_runc_and_cold() {
        let mut report = density::report::tests::sample();
        let base = report.runs[0].clone();
        let run = |name: &str, first_ms: f64, pss: f64, private: f64| {
            let mut r = base.clone();
            r.runtime = name.into();
            r.summary.to_first_output_ms.p50 = Some(first_ms);
            r.summary.pss_kib.mean = Some(pss);
            r.summary.private_kib.mean = Some(private);
            r.pods.iter_mut().for_each(|p| p.error = None);
            r.teardown_problems.clear();
            r
        };
        report.runs = vec![
            run("runc N=10", 500.0, 4096.0, 2048.0),
            run("podvisor-cold (boot)", 60_000.0, 40_960.0, 40_960.0),
            run("podvisor clones N=10", 1500.0, 20_480.0, 6144.0),
        ];
        let text = markdown(&report, &[1, 10]);
        assert!(text.contains("Clone start vs runc: 3.0x"), "{text}");
        assert!(text.contains("clone vs cold boot: 0.0x"), "{text}");
        assert!(text.contains("at the largest N: 6.0 MiB"), "{text}");
        assert!(text.contains("| podvisor clones N=10 |"), "{text}");
        // Shared = PSS - private.
        assert!(text.contains("| 20.0 | 6.0 / "), "{text}");
        assert!(text.contains("| 14.0 |"), "{text}");
        let plot = largest_only(&report, &[1, 10]);
        assert_eq!(plot.runs.len(), 3);
        assert_eq!(clone_counts(&report), vec![10]);
    }
}
