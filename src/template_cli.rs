//! `podvisor template create|list|rm`: the shim's pod templates by hand.
//!
//! The settings are the shim's own ([`ShimConfig::load`]: `$PODVISOR_CONFIG`, else
//! `/etc/podvisor/config.toml`, then the `PODVISOR_*` environment overrides), so `create`
//! builds exactly the template a pod of that configuration restores, under the same lock
//! and in the same directory; `--config`, `--vcpus`, `--mem-mib` and `--dir` override them
//! for one call.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use podvisor_shim::pod::{pod_vm_config, StateDir};
use podvisor_shim::{template, ShimConfig};

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Build the template pods of this configuration restore (a cold boot; the first pod
    /// would otherwise pay it). Prints the template's directory.
    Create(CreateArgs),
    /// The templates in the template directory, with their shape and disk use.
    List(CommonArgs),
    /// Remove templates (pods already running from one keep working).
    Rm(RmArgs),
}

#[derive(Args)]
pub struct CommonArgs {
    /// The podvisor config file (default: $PODVISOR_CONFIG, else /etc/podvisor/config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The template directory (default: the config's `template_dir`).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// vCPUs of the pod VM (default: the config's).
    #[arg(long)]
    vcpus: Option<usize>,
    /// Guest memory in MiB (default: the config's).
    #[arg(long)]
    mem_mib: Option<u64>,
    /// Rebuild even if the template exists.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct RmArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Template keys (from `podvisor template list`).
    keys: Vec<String>,
    /// Remove every template in the directory.
    #[arg(long, conflicts_with = "keys")]
    all: bool,
}

fn settings(common: &CommonArgs) -> Result<ShimConfig, String> {
    let mut config = match &common.config {
        Some(path) => ShimConfig::load_file(path).map_err(|e| e.to_string())?,
        None => ShimConfig::load(None).map_err(|e| e.to_string())?,
    };
    if let Some(dir) = &common.dir {
        config.template_dir = dir.clone();
    }
    Ok(config)
}

pub fn run(cmd: TemplateCommand) -> Result<u8, String> {
    match cmd {
        TemplateCommand::Create(args) => create(args),
        TemplateCommand::List(common) => list(&common),
        TemplateCommand::Rm(args) => rm(args),
    }
}

fn create(args: CreateArgs) -> Result<u8, String> {
    let mut config = settings(&args.common)?;
    if let Some(v) = args.vcpus {
        config.vcpus = v;
    }
    if let Some(m) = args.mem_mib {
        config.mem_mib = m;
    }
    std::fs::create_dir_all(&config.template_dir)
        .map_err(|e| format!("template dir {}: {e}", config.template_dir.display()))?;
    // The pod paths only have to exist; the build replaces them with scratch ones.
    let scratch = config
        .template_dir
        .join(format!(".cli-{}", std::process::id()));
    let state = StateDir {
        root: scratch.clone(),
    };
    std::fs::create_dir_all(state.shared())
        .map_err(|e| format!("create {}: {e}", state.shared().display()))?;
    let result = pod_vm_config(&config, &state)
        .map_err(|e| e.to_string())
        .and_then(|vm_config| {
            let key = template::key(&vm_config.shape);
            template::clear_failure(&config.template_dir, &key);
            if args.force && config.template_dir.join(&key).is_dir() {
                template::remove(&config.template_dir, &key)?;
            }
            let timeout = config.agent_timeout.max(Duration::from_secs(60));
            template::ensure(
                &config.template_dir,
                config.max_templates,
                &vm_config,
                timeout,
            )
        });
    let _ = std::fs::remove_dir_all(&scratch);
    let dir = result?;
    println!("{}", dir.display());
    Ok(0)
}

fn list(common: &CommonArgs) -> Result<u8, String> {
    let config = settings(common)?;
    let entries = template::list(&config.template_dir)?;
    if entries.is_empty() {
        println!("no templates in {}", config.template_dir.display());
        return Ok(0);
    }
    println!(
        "{:<32}  {:>5}  {:>7}  {:>8}  {:<19}  kernel / initrd",
        "KEY", "VCPUS", "MEM MiB", "DISK MiB", "CREATED (UTC)"
    );
    for e in entries {
        let created = e.created.map_or_else(|| "?".to_string(), utc);
        let disk = format!("{:.1}", e.disk_bytes as f64 / f64::from(1 << 20));
        match &e.state {
            Ok(s) => println!(
                "{:<32}  {:>5}  {:>7}  {:>8}  {:<19}  {} / {}",
                e.key,
                s.shape.vcpus,
                s.shape.mem_mib,
                disk,
                created,
                s.shape.kernel.display(),
                s.shape
                    .initrd
                    .as_ref()
                    .map_or_else(|| "-".into(), |p| p.display().to_string()),
            ),
            Err(why) => println!(
                "{:<32}  {:>5}  {:>7}  {:>8}  {:<19}  unusable: {why}",
                e.key, "?", "?", disk, created
            ),
        }
    }
    Ok(0)
}

fn rm(args: RmArgs) -> Result<u8, String> {
    let config = settings(&args.common)?;
    let keys: Vec<String> = if args.all {
        template::list(&config.template_dir)?
            .into_iter()
            .map(|e| e.key)
            .collect()
    } else if args.keys.is_empty() {
        return Err(
            "name the templates to remove (keys from `podvisor template list`) or pass --all"
                .into(),
        );
    } else {
        args.keys
    };
    let mut failed = 0u8;
    for key in keys {
        match template::remove(&config.template_dir, &key) {
            Ok(()) => println!("removed {key}"),
            Err(e) => {
                eprintln!("podvisor: {e}");
                failed = 1;
            }
        }
    }
    Ok(failed)
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_civil_dates() {
        let at = |s: u64| utc(std::time::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01 00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(at(1_795_435_199), "2026-11-23 11:59:59");
    }
}
