//! The shim's settings. For now from the environment (containerd passes its own environment
//! to the shims it starts): `PODVISOR_KERNEL`, `PODVISOR_INITRD` (the agent initramfs),
//! `PODVISOR_VCPUS` (1), `PODVISOR_MEM_MIB` (256), `PODVISOR_RUN_DIR` (`/run/podvisor`),
//! `PODVISOR_AGENT_TIMEOUT_SECS` (600: a guest boot takes minutes on nested-KVM hosts).

use std::path::PathBuf;
use std::time::Duration;

/// Default directory of the pods' host state.
pub const DEFAULT_RUN_DIR: &str = "/run/podvisor";

#[derive(Debug, Clone)]
pub struct ShimConfig {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub vcpus: usize,
    pub mem_mib: u64,
    pub run_dir: PathBuf,
    pub agent_timeout: Duration,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl ShimConfig {
    pub fn from_env() -> Self {
        let path = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Self {
            kernel: path("PODVISOR_KERNEL"),
            initrd: path("PODVISOR_INITRD"),
            vcpus: env_num("PODVISOR_VCPUS", 1),
            mem_mib: env_num("PODVISOR_MEM_MIB", 256),
            run_dir: path("PODVISOR_RUN_DIR").unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR)),
            agent_timeout: Duration::from_secs(env_num("PODVISOR_AGENT_TIMEOUT_SECS", 600)),
        }
    }
}
