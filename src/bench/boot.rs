//! `podvisor bench boot`: boots the guest N times, each in a fresh `podvisor boot` process (so host
//! set-up time includes everything a real start pays), and prints the median of each figure.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Args;
use vmm::BootTimings;

#[derive(Args)]
pub struct BenchBootArgs {
    #[arg(long, env = "PODVISOR_KERNEL")]
    kernel: PathBuf,
    #[arg(long, env = "PODVISOR_INITRD")]
    initrd: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Per-boot timeout in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

pub fn run(args: BenchBootArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("podvisor-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut records = Vec::new();
    for i in 0..args.runs {
        let json = dir.join(format!("run{i}.json"));
        let mut cmd = Command::new(&exe);
        cmd.arg("boot")
            .arg("--kernel")
            .arg(&args.kernel)
            .args([
                "--vcpus",
                &args.vcpus.to_string(),
                "--mem-mib",
                &args.mem_mib.to_string(),
            ])
            .args(["--console", "none", "--timeout", &args.timeout.to_string()])
            .arg("--timings-json")
            .arg(&json)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(initrd) = &args.initrd {
            cmd.arg("--initrd").arg(initrd);
        }
        eprintln!("bench boot: run {}/{} ...", i + 1, args.runs);
        let status = cmd.status()?;
        let record: TimingsRecord = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("boot run {} failed: {}", i + 1, record.reason).into());
        }
        records.push(record);
    }
    let _ = std::fs::remove_dir_all(&dir);
    print!("{}", boot_table(&records, args.vcpus, args.mem_mib));
    Ok(0)
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    Some(values[values.len() / 2])
}

fn boot_table(records: &[TimingsRecord], vcpus: usize, mem_mib: u64) -> String {
    let col =
        |f: &dyn Fn(&TimingsRecord) -> Option<f64>| median(records.iter().filter_map(f).collect());
    let fmt = |v: Option<f64>, unit: &str, scale: f64| {
        v.map_or("n/a".into(), |v| format!("{:.1} {unit}", v / scale))
    };
    let rows = [
        (
            "host setup (exec -> first KVM_RUN)",
            fmt(col(&|r| r.host_setup_ms), "ms", 1.0),
        ),
        (
            "guest time to init",
            fmt(col(&|r| r.guest_to_init_ms), "s", 1000.0),
        ),
        (
            "VMM RSS outside guest RAM",
            fmt(col(&|r| r.vmm_rss_kib.map(|v| v as f64)), "MiB", 1024.0),
        ),
        (
            "VMM PSS outside guest RAM",
            fmt(col(&|r| r.vmm_pss_kib.map(|v| v as f64)), "MiB", 1024.0),
        ),
        (
            "guest RAM touched at init",
            fmt(col(&|r| r.guest_rss_kib.map(|v| v as f64)), "MiB", 1024.0),
        ),
    ];
    let mut out = format!(
        "\nboot benchmark: {vcpus} vCPU, {mem_mib} MiB, median of {} runs\n",
        records.len()
    );
    out += &format!(
        "| {:<36} | {:>12} |\n|{:-<38}|{:-<14}|\n",
        "figure", "median", "", ""
    );
    for (name, value) in rows {
        out += &format!("| {name:<36} | {value:>12} |\n");
    }
    out
}

/// One boot's figures, as `--timings-json` writes them (ms, KiB; null when not measured).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TimingsRecord {
    pub host_setup_ms: Option<f64>,
    pub guest_to_init_ms: Option<f64>,
    pub vmm_rss_kib: Option<u64>,
    pub vmm_pss_kib: Option<u64>,
    pub guest_rss_kib: Option<u64>,
    /// At stop: the VMM's PSS, guest RAM PSS, and guest RAM private to this VM (for a
    /// restored VM, its copy-on-write copies; the rest is shared with the snapshot file).
    pub vmm_pss_kib_at_stop: Option<u64>,
    pub guest_pss_kib_at_stop: Option<u64>,
    pub guest_private_kib_at_stop: Option<u64>,
    pub total_ms: f64,
    pub exit_code: i32,
    pub reason: String,
}

impl TimingsRecord {
    pub fn new(t: &BootTimings, reason: &str, exit_code: i32) -> Self {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        TimingsRecord {
            host_setup_ms: ms(t.host_setup),
            guest_to_init_ms: ms(t.guest_to_init),
            vmm_rss_kib: t.memory_at_init.map(|m| m.vmm_rss_kib),
            vmm_pss_kib: t.memory_at_init.map(|m| m.vmm_pss_kib),
            guest_rss_kib: t.memory_at_init.map(|m| m.guest_rss_kib),
            vmm_pss_kib_at_stop: t.memory_at_stop.map(|m| m.vmm_pss_kib),
            guest_pss_kib_at_stop: t.memory_at_stop.map(|m| m.guest_pss_kib),
            guest_private_kib_at_stop: t.memory_at_stop.map(|m| m.guest_anon_kib),
            total_ms: t.total.as_secs_f64() * 1e3,
            exit_code,
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(setup: f64, rss: u64) -> TimingsRecord {
        TimingsRecord {
            host_setup_ms: Some(setup),
            guest_to_init_ms: Some(45_000.0),
            vmm_rss_kib: Some(rss),
            vmm_pss_kib: None,
            guest_rss_kib: Some(26 * 1024),
            vmm_pss_kib_at_stop: None,
            guest_pss_kib_at_stop: None,
            guest_private_kib_at_stop: None,
            total_ms: 46_000.0,
            exit_code: 0,
            reason: "ok".into(),
        }
    }

    #[test]
    fn median_of_odd_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn table_shows_medians() {
        let t = boot_table(
            &[record(30.0, 4096), record(50.0, 2048), record(40.0, 3072)],
            1,
            128,
        );
        assert!(t.contains("40.0 ms"), "{t}");
        assert!(t.contains("3.0 MiB"), "{t}");
        assert!(t.contains("45.0 s"), "{t}");
        assert!(t.contains("n/a"), "PSS not measured: {t}");
    }
}
