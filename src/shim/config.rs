//! The shim's settings: a TOML file, environment overrides and per-pod annotations.
//!
//! Where a setting comes from, lowest priority first:
//! 1. built-in defaults ([`ShimConfig::default`]);
//! 2. the configuration file: `PODVISOR_CONFIG` if set, else the `ConfigPath` of the
//!    runtime options containerd passes with the first Create (`runtimeoptions.v1.Options`,
//!    from `[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.podvisor.options]` or
//!    `ctr run --runtime-config-path`; an inline `ConfigBody` is used when no path is
//!    given), else [`DEFAULT_CONFIG_PATH`] when that file exists;
//! 3. the environment containerd passes to its shims: `PODVISOR_KERNEL`,
//!    `PODVISOR_INITRD`, `PODVISOR_VCPUS`, `PODVISOR_MEM_MIB`, `PODVISOR_RUN_DIR`,
//!    `PODVISOR_AGENT_TIMEOUT_SECS`, and the VMM's host settings, which only the
//!    environment sets: `PODVISOR_KVM_DEVICE` (another KVM device node: tests use it),
//!    `PODVISOR_HOST_QUIRKS` (`pvm`/`none`: override host detection), `PODVISOR_NORESERVE`
//!    (`0`: guest RAM without `MAP_NORESERVE`) and `PODVISOR_KSM` (`1`: guest RAM
//!    mergeable by KSM), which `podvisor bench density` sets;
//! 4. per pod, the OCI annotations `io.podvisor.config.vcpus`,
//!    `io.podvisor.config.memory_mib` (bounded by `max_vcpus` / `max_memory_mib`) and
//!    `io.podvisor.config.kernel` (only with `allow_kernel_override = true`),
//!    `io.podvisor.config.template` (`auto`/`off`), see
//!    [`ShimConfig::with_annotations`].
//!
//! The file's keys (all optional; unknown keys are an error):
//! `kernel`, `initrd`, `vcpus`, `memory_mib`, `run_dir`, `agent_timeout_secs`,
//! `log_level` (`off`/`error`/`warn`/`info`/`debug`/`trace`; `RUST_LOG` wins),
//! `max_vcpus`, `max_memory_mib`, `allow_kernel_override`, `template` (`"off"` or
//! `"auto"`, see `template.rs`), `template_dir` and `seccomp` (`"enforce"`, the default,
//! `"log"` or `"off"`: the filters of the threads that handle guest data, see
//! `devices::confine`; also `PODVISOR_SECCOMP`), `template_shapes` (`[[vcpus, MiB], ...]`:
//! shapes chosen by annotation that may have templates; others boot cold) and
//! `max_templates` (default 8; the least recently used go first), `size_from_pod` (default
//! true), `guest_overhead_mib` and `memory_step_mib` (a pod's VM from its CRI resources,
//! `super::sizing`), `balloon` (default true: a virtio-balloon that resizes a running pod's
//! memory and hands memory the guest frees back to the host, `super::pod::resize`),
//! `resizable_vcpus` (default true: pod VMs have `max_vcpus` vCPUs, at most the host's CPUs,
//! those beyond the pod's
//! parked until an Update brings them online), `guest_profile_hz` (default 0, off; also
//! `PODVISOR_GUEST_PROFILE_HZ`: sample where each pod's guest runs, per start phase, into
//! its timeline; a diagnostic). `config/podvisor.toml` in the repository documents each key with its
//! default.
//!
//! Per pod, before the `io.podvisor.config.*` annotations: with `size_from_pod`, the
//! CRI sandbox's resources (`io.kubernetes.cri.sandbox-memory`, `-cpu-quota`,
//! `-cpu-period`) size the VM.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;
use serde::Deserialize;
pub use vmm::SeccompMode;

use super::sizing::{PodResources, SizingError, SizingRules};
use vmm::{HostQuirks, HostSettings, MemoryKnobs};

/// Default directory of the pods' host state.
pub const DEFAULT_RUN_DIR: &str = "/run/podvisor";
/// The configuration file read when neither `PODVISOR_CONFIG` nor containerd's runtime
/// options name one (a missing default file means built-in defaults).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/podvisor/config.toml";
/// Environment variable naming the configuration file (overrides runtime options).
pub const CONFIG_ENV: &str = "PODVISOR_CONFIG";
/// Protobuf name of containerd's runtime options for non-runc runtimes
/// (`pkg/runtimeoptions/v1/api.proto`).
pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
/// File in a container's bundle naming the run dir its pod's state lives in, for
/// `shim delete` (which gets neither the runtime options nor the pod's annotations).
pub const BUNDLE_RUN_DIR_FILE: &str = "podvisor-run-dir";
/// Prefix of the per-pod override annotations.
pub const ANNOTATION_PREFIX: &str = "io.podvisor.config.";
/// Annotation: vCPUs of the pod's VM.
pub const ANNOTATION_VCPUS: &str = "io.podvisor.config.vcpus";
/// Annotation: guest memory of the pod's VM, MiB.
pub const ANNOTATION_MEMORY_MIB: &str = "io.podvisor.config.memory_mib";
/// Annotation: guest kernel of the pod's VM (needs `allow_kernel_override = true`).
pub const ANNOTATION_KERNEL: &str = "io.podvisor.config.kernel";
/// Annotation: `auto` or `off`, this pod's template mode (e.g. `off` to boot one pod cold).
pub const ANNOTATION_TEMPLATE: &str = "io.podvisor.config.template";

const DEFAULT_VCPUS: usize = 1;
const DEFAULT_MEM_MIB: u64 = 256;
/// The guest's own memory next to a pod's limit: kernel, agent and a page-cache floor
/// (measured 29–34 MiB in use with an idle container; the rest is room under load).
const DEFAULT_GUEST_OVERHEAD_MIB: u64 = 64;
/// Pod memory sizes are rounded up to this: pods of similar size share a template.
const DEFAULT_MEMORY_STEP_MIB: u64 = 128;
/// A guest boot takes minutes on nested-KVM hosts.
const DEFAULT_AGENT_TIMEOUT_SECS: u64 = 600;
const DEFAULT_MAX_VCPUS: usize = 8;
const DEFAULT_MAX_MEM_MIB: u64 = 16384;
const DEFAULT_MAX_TEMPLATES: usize = 8;

/// VM templates: whether pods start as clones of a booted template VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateMode {
    /// Every pod boots its own VM.
    Off,
    /// The first pod of a (kernel, initrd, vCPUs, memory) combination boots a template VM
    /// and snapshots it under `template_dir`; every pod then restores a copy-on-write clone.
    /// The default: where the host's KVM cannot save VMs, or a build failed in the last
    /// minutes, pods boot cold (with a log line).
    #[default]
    Auto,
}

impl std::str::FromStr for TemplateMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "off" => Ok(TemplateMode::Off),
            "auto" => Ok(TemplateMode::Auto),
            other => Err(format!("{other:?}: use \"auto\" or \"off\"")),
        }
    }
}

/// Default directory of VM templates.
pub const DEFAULT_TEMPLATE_DIR: &str = "/var/lib/podvisor/templates";

/// The shim's effective settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ShimConfig {
    /// Guest kernel (ELF vmlinux); `None` makes Create fail with a message naming the key.
    pub kernel: Option<PathBuf>,
    /// Agent initramfs.
    pub initrd: Option<PathBuf>,
    pub vcpus: usize,
    pub mem_mib: u64,
    /// Pods' host state: `<run_dir>/<sandbox id>/`.
    pub run_dir: PathBuf,
    /// How long to wait for the guest agent: to answer after the VM started, and for each
    /// request (a container create forks and execs in a guest that may be slow).
    pub agent_timeout: Duration,
    /// The shim's log level (`None`: containerd-shim's default; `RUST_LOG` wins).
    pub log_level: Option<log::LevelFilter>,
    /// Upper bound of `io.podvisor.config.vcpus`.
    pub max_vcpus: usize,
    /// Upper bound of `io.podvisor.config.memory_mib`.
    pub max_mem_mib: u64,
    /// Whether `io.podvisor.config.kernel` may choose another guest kernel.
    pub allow_kernel_override: bool,
    /// VM templates: clone pods from a booted template VM, or boot each cold.
    pub template: TemplateMode,
    /// Where templates live: `<template_dir>/<key>/`.
    pub template_dir: PathBuf,
    /// Seccomp filters of the VMM's guest-facing threads.
    pub seccomp: SeccompMode,
    /// Shapes (vCPUs, MiB) that pods choosing their shape by annotation may get templates
    /// for; the configured shape always may. Other pods boot cold, so that annotations
    /// cannot make templates without bound.
    pub template_shapes: Vec<[u64; 2]>,
    /// Templates kept at most; the least recently used go first.
    pub max_templates: usize,
    /// Size each pod's VM from its resources (CRI's sandbox annotations, `super::sizing`).
    pub size_from_pod: bool,
    /// What the guest itself uses, added to a pod's memory limit.
    pub guest_overhead_mib: u64,
    /// Pod memory sizes are rounded up to a multiple of this (few template shapes).
    pub memory_step_mib: u64,
    /// Give pod VMs a balloon: memory resize on Update, free page reporting.
    pub balloon: bool,
    /// Give pod VMs `max_vcpus` vCPUs, parked beyond the pod's: CPU resize on Update.
    pub resizable_vcpus: bool,
    /// Guest samples per second per vCPU for the start timeline's guest profile (0: off).
    pub guest_profile_hz: u32,
    /// The KVM device node (`PODVISOR_KVM_DEVICE`).
    pub kvm_device: PathBuf,
    /// Host quirks: detected, or forced (`PODVISOR_HOST_QUIRKS`).
    pub host_quirks: HostQuirks,
    /// How guest RAM is mapped (`PODVISOR_NORESERVE`, `PODVISOR_KSM`).
    pub memory: MemoryKnobs,
    /// This pod's VM shape came from its annotations.
    pub annotated: bool,
    /// The file the settings came from, if any (for messages).
    pub source: Option<PathBuf>,
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            kernel: None,
            initrd: None,
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            agent_timeout: Duration::from_secs(DEFAULT_AGENT_TIMEOUT_SECS),
            log_level: None,
            max_vcpus: DEFAULT_MAX_VCPUS,
            max_mem_mib: DEFAULT_MAX_MEM_MIB,
            allow_kernel_override: false,
            template: TemplateMode::Auto,
            template_dir: PathBuf::from(DEFAULT_TEMPLATE_DIR),
            seccomp: SeccompMode::Enforce,
            template_shapes: Vec::new(),
            size_from_pod: true,
            guest_overhead_mib: DEFAULT_GUEST_OVERHEAD_MIB,
            memory_step_mib: DEFAULT_MEMORY_STEP_MIB,
            balloon: true,
            resizable_vcpus: true,
            guest_profile_hz: 0,
            max_templates: DEFAULT_MAX_TEMPLATES,
            kvm_device: PathBuf::from(vmm::config::DEFAULT_KVM_DEVICE),
            host_quirks: HostQuirks::Auto,
            memory: MemoryKnobs::default(),
            annotated: false,
            source: None,
        }
    }
}

/// Why the settings cannot be used; every message names its source and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("podvisor config {path}: {source} (fix the path in $PODVISOR_CONFIG or containerd's runtime option ConfigPath)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("podvisor config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("podvisor config {origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("environment {var}={value:?}: {message}")]
    Env {
        var: &'static str,
        value: String,
        message: String,
    },
    #[error("containerd runtime options ({type_url}): {message}")]
    Options { type_url: String, message: String },
    #[error("sizing the pod's VM from its resources: {0}")]
    Sizing(#[from] SizingError),
    #[error("annotation {key}={value:?}: {message}")]
    Annotation {
        key: String,
        value: String,
        message: String,
    },
}

/// The file's schema: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    vcpus: Option<usize>,
    memory_mib: Option<u64>,
    run_dir: Option<PathBuf>,
    agent_timeout_secs: Option<u64>,
    log_level: Option<String>,
    max_vcpus: Option<usize>,
    max_memory_mib: Option<u64>,
    allow_kernel_override: Option<bool>,
    template: Option<TemplateMode>,
    template_dir: Option<PathBuf>,
    seccomp: Option<SeccompMode>,
    template_shapes: Option<Vec<[u64; 2]>>,
    size_from_pod: Option<bool>,
    guest_overhead_mib: Option<u64>,
    memory_step_mib: Option<u64>,
    balloon: Option<bool>,
    resizable_vcpus: Option<bool>,
    guest_profile_hz: Option<u32>,
    max_templates: Option<usize>,
}

/// containerd's `runtimeoptions.v1.Options` (type_url = 1, config_path = 2,
/// config_body = 3).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RuntimeOptions {
    pub type_url: String,
    pub config_path: String,
    pub config_body: Vec<u8>,
}

impl RuntimeOptions {
    /// Decodes containerd's runtime options. `Ok(None)` for an empty `Any` (no options);
    /// any type other than `runtimeoptions.v1.Options` is an error.
    pub fn from_any(any: &Any) -> Result<Option<RuntimeOptions>, ConfigError> {
        if any.type_url.is_empty() && any.value.is_empty() {
            return Ok(None);
        }
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        let err = |message: String| ConfigError::Options {
            type_url: any.type_url.clone(),
            message,
        };
        if name != RUNTIME_OPTIONS_TYPE {
            return Err(err(format!(
                "podvisor understands only {RUNTIME_OPTIONS_TYPE}; give the runtime's options \
                 as `ConfigPath = \"/etc/podvisor/config.toml\"`"
            )));
        }
        let mut opts = RuntimeOptions::default();
        let mut input = CodedInputStream::from_bytes(&any.value);
        let bad = |e: containerd_shim::protos::protobuf::Error| err(format!("bad encoding: {e}"));
        while let Some(tag) = input.read_raw_tag_or_eof().map_err(bad)? {
            let (field, wire_type) = (tag >> 3, tag & 7);
            match (field, wire_type) {
                (1, 2) => opts.type_url = input.read_string().map_err(bad)?,
                (2, 2) => opts.config_path = input.read_string().map_err(bad)?,
                (3, 2) => opts.config_body = input.read_bytes().map_err(bad)?,
                _ => {
                    let wt = containerd_shim::protos::protobuf::rt::WireType::new(wire_type)
                        .ok_or_else(|| err(format!("bad wire type {wire_type}")))?;
                    input.skip_field(wt).map_err(bad)?;
                }
            }
        }
        Ok(Some(opts))
    }
}

impl ShimConfig {
    /// Defaults and environment only, never failing (malformed variables are logged and
    /// ignored): for `shim delete`, which has no runtime options and must clean up anyway.
    pub fn from_env() -> Self {
        Self::from_env_with(&|name| std::env::var_os(name))
    }

    fn from_env_with(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Self {
        let mut config = Self::default();
        // Each variable on its own, so that one malformed value does not hide the others.
        for var in ENV_VARS {
            let one = |name: &str| if name == *var { env(name) } else { None };
            if let Err(e) = config.apply_env(&one) {
                log::warn!("{e}; using the default");
            }
        }
        config
    }

    /// The settings `shim delete` needs, run in the container's `bundle`: [`Self::from_env`]
    /// with the run dir [`record_run_dir`] wrote there at Create, if any (a config file may
    /// have moved it away from the environment's).
    pub fn for_delete(bundle: &Path) -> Self {
        Self::for_delete_with(bundle, &|name| std::env::var_os(name))
    }

    fn for_delete_with(bundle: &Path, env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Self {
        let mut config = Self::from_env_with(env);
        let file = bundle.join(BUNDLE_RUN_DIR_FILE);
        match std::fs::read_to_string(&file) {
            Ok(text) if Path::new(text.trim_end_matches('\n')).is_absolute() => {
                config.run_dir = PathBuf::from(text.trim_end_matches('\n'));
            }
            Ok(text) => log::warn!("{}: not an absolute path: {text:?}", file.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("{}: {e}", file.display()),
        }
        config
    }

    /// The shim's settings for a pod: the configuration file (see the module docs for
    /// which one; `options` are containerd's runtime options from CreateTaskRequest), then
    /// the environment's overrides; checked.
    pub fn load(options: Option<&Any>) -> Result<ShimConfig, ConfigError> {
        let options = match options {
            Some(any) => RuntimeOptions::from_any(any)?,
            None => None,
        };
        if let Some(o) = &options {
            log::debug!(
                "runtime options: config_path {:?}, config_body {} bytes",
                o.config_path,
                o.config_body.len()
            );
        }
        Self::load_with(
            options.as_ref(),
            &|name| std::env::var_os(name),
            Path::new(DEFAULT_CONFIG_PATH),
        )
    }

    /// [`ShimConfig::load`] with the environment and default path given (for tests).
    fn load_with(
        options: Option<&RuntimeOptions>,
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
        default_path: &Path,
    ) -> Result<ShimConfig, ConfigError> {
        let env_path = env(CONFIG_ENV).filter(|p| !p.is_empty()).map(PathBuf::from);
        let option_path = options
            .map(|o| o.config_path.as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let mut config = if let Some(path) = env_path.or(option_path) {
            Self::from_file(&path)?
        } else if let Some(body) = options.map(|o| &o.config_body).filter(|b| !b.is_empty()) {
            let text = std::str::from_utf8(body).map_err(|e| ConfigError::Parse {
                origin: "ConfigBody".into(),
                message: format!("not UTF-8: {e}"),
            })?;
            Self::from_toml(text, "ConfigBody (containerd runtime options)")?
        } else if default_path.exists() {
            Self::from_file(default_path)?
        } else {
            Self::default()
        };
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    /// [`ShimConfig::load`] with the file given (`podvisor template --config`): the file,
    /// then the environment's overrides; checked.
    pub fn load_file(path: &Path) -> Result<ShimConfig, ConfigError> {
        let mut config = Self::from_file(path)?;
        config.apply_env(&|name| std::env::var_os(name))?;
        config.validate()?;
        Ok(config)
    }

    /// Defaults overlaid with the TOML file at `path`.
    pub fn from_file(path: &Path) -> Result<ShimConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_toml(&text, &path.display().to_string())?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Defaults overlaid with the TOML document `text`; `origin` names it in errors.
    fn from_toml(text: &str, origin: &str) -> Result<ShimConfig, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: toml_error_line(text, &e),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let d = Self::default();
        let log_level = match file.log_level {
            Some(l) => Some(l.parse::<log::LevelFilter>().map_err(|_| {
                invalid(format!(
                    "log_level = {l:?}: use off, error, warn, info, debug or trace"
                ))
            })?),
            None => None,
        };
        let config = Self {
            kernel: file.kernel,
            initrd: file.initrd,
            vcpus: file.vcpus.unwrap_or(d.vcpus),
            mem_mib: file.memory_mib.unwrap_or(d.mem_mib),
            run_dir: file.run_dir.unwrap_or(d.run_dir),
            agent_timeout: file
                .agent_timeout_secs
                .map(Duration::from_secs)
                .unwrap_or(d.agent_timeout),
            log_level,
            max_vcpus: file.max_vcpus.unwrap_or(d.max_vcpus),
            max_mem_mib: file.max_memory_mib.unwrap_or(d.max_mem_mib),
            allow_kernel_override: file.allow_kernel_override.unwrap_or(false),
            template: file.template.unwrap_or_default(),
            template_dir: file.template_dir.unwrap_or(d.template_dir),
            seccomp: file.seccomp.unwrap_or_default(),
            template_shapes: file.template_shapes.unwrap_or_default(),
            max_templates: file.max_templates.unwrap_or(d.max_templates),
            size_from_pod: file.size_from_pod.unwrap_or(d.size_from_pod),
            guest_overhead_mib: file.guest_overhead_mib.unwrap_or(d.guest_overhead_mib),
            memory_step_mib: file.memory_step_mib.unwrap_or(d.memory_step_mib),
            balloon: file.balloon.unwrap_or(d.balloon),
            resizable_vcpus: file.resizable_vcpus.unwrap_or(d.resizable_vcpus),
            guest_profile_hz: file.guest_profile_hz.unwrap_or(d.guest_profile_hz),
            kvm_device: d.kvm_device,
            host_quirks: d.host_quirks,
            memory: d.memory,
            annotated: false,
            source: None,
        };
        config.validate_as(origin)?;
        Ok(config)
    }

    /// Overlays the `PODVISOR_*` variables `env` returns.
    fn apply_env(
        &mut self,
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<(), ConfigError> {
        let path = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        fn num<T: std::str::FromStr>(
            env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
            var: &'static str,
        ) -> Result<Option<T>, ConfigError> {
            let Some(value) = env(var) else {
                return Ok(None);
            };
            let value = value.to_string_lossy().trim().to_string();
            if value.is_empty() {
                return Ok(None);
            }
            value.parse().map(Some).map_err(|_| ConfigError::Env {
                var,
                value,
                message: "not a number: set a positive integer or unset it".into(),
            })
        }
        if let Some(p) = path("PODVISOR_KERNEL") {
            self.kernel = Some(p);
        }
        if let Some(p) = path("PODVISOR_INITRD") {
            self.initrd = Some(p);
        }
        if let Some(p) = path("PODVISOR_RUN_DIR") {
            self.run_dir = p;
        }
        if let Some(n) = num(env, "PODVISOR_VCPUS")? {
            self.vcpus = n;
        }
        if let Some(n) = num(env, "PODVISOR_MEM_MIB")? {
            self.mem_mib = n;
        }
        if let Some(n) = num(env, GUEST_PROFILE_HZ_ENV)? {
            self.guest_profile_hz = n;
        }
        if let Some(n) = num(env, "PODVISOR_AGENT_TIMEOUT_SECS")? {
            self.agent_timeout = Duration::from_secs(n);
        }
        if let Some(v) = env("PODVISOR_TEMPLATE").filter(|v| !v.is_empty()) {
            let value = v.to_string_lossy().into_owned();
            self.template = value.parse().map_err(|message| ConfigError::Env {
                var: "PODVISOR_TEMPLATE",
                value,
                message,
            })?;
        }
        if let Some(p) = path("PODVISOR_TEMPLATE_DIR") {
            self.template_dir = p;
        }
        if let Some(v) = env("PODVISOR_SECCOMP").filter(|v| !v.is_empty()) {
            let value = v.to_string_lossy().into_owned();
            self.seccomp = value.parse().map_err(|message| ConfigError::Env {
                var: "PODVISOR_SECCOMP",
                value,
                message,
            })?;
        }
        let text = |name: &str| env(name).map(|v| v.to_string_lossy().into_owned());
        if let Some(p) = path(KVM_DEVICE_ENV) {
            self.kvm_device = p;
        }
        if let Some(Ok(q)) = text(HOST_QUIRKS_ENV).as_deref().map(parse_host_quirks) {
            self.host_quirks = q;
        }
        if let Some(Ok(on)) = text(NORESERVE_ENV).as_deref().map(parse_noreserve) {
            self.memory.noreserve = on;
        }
        if let Some(Ok(on)) = text(KSM_ENV).as_deref().map(parse_ksm) {
            self.memory.ksm = on;
        }
        Ok(())
    }

    /// The VMM's host settings of these settings.
    pub fn host_settings(&self) -> HostSettings {
        HostSettings {
            kvm_device: self.kvm_device.clone(),
            memory: self.memory,
            quirks: self.host_quirks,
            seccomp: self.seccomp,
            profile_hz: self.guest_profile_hz,
        }
    }

    /// Checks the settings (after the environment's overrides).
    fn validate(&self) -> Result<(), ConfigError> {
        let origin = match &self.source {
            Some(p) => format!("{} with the PODVISOR_* environment", p.display()),
            None => "(built-in defaults with the PODVISOR_* environment)".to_string(),
        };
        self.validate_as(&origin)
    }

    fn validate_as(&self, origin: &str) -> Result<(), ConfigError> {
        use vmm::config::{MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB};
        let invalid = |message: String| {
            Err(ConfigError::Invalid {
                origin: origin.to_string(),
                message,
            })
        };
        if self.guest_profile_hz > MAX_GUEST_PROFILE_HZ {
            return invalid(format!(
                "guest_profile_hz = {}: sample at most {MAX_GUEST_PROFILE_HZ} times a second (or 0: off)",
                self.guest_profile_hz
            ));
        }
        if self.max_templates == 0 {
            return invalid(
                "max_templates = 0: keep at least 1 (or set template = \"off\")".into(),
            );
        }
        if !(1..=MAX_VCPUS).contains(&self.max_vcpus) {
            return invalid(format!(
                "max_vcpus = {}: must be 1 to {MAX_VCPUS}",
                self.max_vcpus
            ));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.max_mem_mib) {
            return invalid(format!(
                "max_memory_mib = {}: must be {MIN_MEM_MIB} to {MAX_MEM_MIB}",
                self.max_mem_mib
            ));
        }
        if !(1..=self.max_vcpus).contains(&self.vcpus) {
            return invalid(format!(
                "vcpus = {}: must be 1 to max_vcpus ({})",
                self.vcpus, self.max_vcpus
            ));
        }
        if !(MIN_MEM_MIB..=self.max_mem_mib).contains(&self.mem_mib) {
            return invalid(format!(
                "memory_mib = {}: must be {MIN_MEM_MIB} to max_memory_mib ({})",
                self.mem_mib, self.max_mem_mib
            ));
        }
        if self.agent_timeout.is_zero() {
            return invalid("agent_timeout_secs = 0: give the guest time to boot".into());
        }
        Ok(())
    }

    /// These settings with a pod's `io.podvisor.config.*` annotations applied (from the
    /// sandbox container's OCI spec). Values outside the `max_*` limits, non-numbers,
    /// unknown `io.podvisor.config.*` keys and a kernel override without
    /// `allow_kernel_override = true` are errors naming the annotation.
    /// Whether this pod may start from (or build) a template: always for the configured
    /// shape; for a shape chosen by annotation only if `template_shapes` lists it (a pod
    /// with a kernel chosen by annotation boots cold: its `template` is off).
    pub fn template_allowed(&self) -> bool {
        !self.annotated
            || self
                .template_shapes
                .contains(&[self.vcpus as u64, self.mem_mib])
    }

    pub fn with_annotations(
        &self,
        annotations: &HashMap<String, String>,
    ) -> Result<ShimConfig, ConfigError> {
        let mut config = self.clone();
        if self.size_from_pod {
            let resources = PodResources::from_annotations(annotations)?;
            let sized = resources
                .is_set()
                .then(|| resources.vm_size(&self.sizing_rules()))
                .transpose()?;
            if let Some((vcpus, mem_mib)) = sized {
                log::info!("pod VM sized from the pod's resources: {vcpus} vCPU(s), {mem_mib} MiB");
                config.vcpus = vcpus;
                config.mem_mib = mem_mib;
            }
        }
        let mut keys: Vec<&String> = annotations
            .keys()
            .filter(|k| k.starts_with(ANNOTATION_PREFIX))
            .collect();
        keys.sort();
        let mut kernel_chosen = false;
        for key in keys {
            let value = &annotations[key];
            let err = |message: String| ConfigError::Annotation {
                key: key.clone(),
                value: value.clone(),
                message,
            };
            let number = |max: u64, min: u64| -> Result<u64, ConfigError> {
                let n: u64 = value.trim().parse().map_err(|_| {
                    err(format!("not a number: give an integer from {min} to {max}"))
                })?;
                if !(min..=max).contains(&n) {
                    return Err(err(format!(
                        "out of range: give {min} to {max} (the limit is set in {})",
                        self.limits_origin()
                    )));
                }
                Ok(n)
            };
            match key.as_str() {
                ANNOTATION_VCPUS => {
                    let max = u64::try_from(self.max_vcpus).unwrap_or(u64::MAX);
                    config.vcpus = usize::try_from(number(max, 1)?).unwrap_or(self.max_vcpus);
                    config.annotated = true;
                }
                ANNOTATION_MEMORY_MIB => {
                    config.mem_mib = number(self.max_mem_mib, vmm::config::MIN_MEM_MIB)?;
                    config.annotated = true;
                }
                ANNOTATION_KERNEL => {
                    if !self.allow_kernel_override {
                        return Err(err(format!(
                            "kernel overrides are off: set allow_kernel_override = true in {} \
                             to allow them",
                            self.limits_origin()
                        )));
                    }
                    let path = PathBuf::from(value);
                    if !path.is_absolute() || !path.is_file() {
                        return Err(err(
                            "give the absolute path of an existing guest kernel file".into(),
                        ));
                    }
                    config.kernel = Some(path);
                    kernel_chosen = true;
                }
                ANNOTATION_TEMPLATE => config.template = value.parse().map_err(err)?,
                _ => {
                    return Err(err(format!(
                        "unknown podvisor setting: use {ANNOTATION_VCPUS}, \
                         {ANNOTATION_MEMORY_MIB}, {ANNOTATION_KERNEL} or {ANNOTATION_TEMPLATE}"
                    )))
                }
            }
        }
        if kernel_chosen {
            // A template per kernel would be a template per pod's choice: boot cold.
            config.template = TemplateMode::Off;
        }
        Ok(config)
    }

    /// The bounds of sizing VMs from pods.
    pub fn sizing_rules(&self) -> SizingRules {
        SizingRules {
            default_vcpus: self.vcpus,
            max_vcpus: self.max_vcpus,
            default_mem_mib: self.mem_mib,
            min_mem_mib: vmm::config::MIN_MEM_MIB,
            max_mem_mib: self.max_mem_mib,
            guest_overhead_mib: self.guest_overhead_mib,
            memory_step_mib: self.memory_step_mib,
        }
    }

    /// Where the limits were set, for annotation errors.
    fn limits_origin(&self) -> String {
        match &self.source {
            Some(p) => p.display().to_string(),
            None => format!("the podvisor config file ({DEFAULT_CONFIG_PATH})"),
        }
    }

    /// The `log_level` of the configuration file found without runtime options, for the
    /// shim's logger before the first Create (`None` when unset or the file is unusable:
    /// Create reports that).
    pub fn startup_log_level() -> Option<log::LevelFilter> {
        Self::load(None).ok().and_then(|c| c.log_level)
    }

    /// Applies `log_level` to the shim's logger, unless `RUST_LOG` is set (it wins).
    pub fn apply_log_level(&self) {
        if let Some(level) = self.log_level {
            if std::env::var_os("RUST_LOG").is_none() {
                log::set_max_level(level);
            }
        }
    }
}

/// Records in a container's `bundle` the `run_dir` of its pod's state, for
/// [`ShimConfig::for_delete`].
pub fn record_run_dir(bundle: &Path, run_dir: &Path) -> std::io::Result<()> {
    let mut text = run_dir.as_os_str().to_string_lossy().into_owned();
    text.push('\n');
    std::fs::write(bundle.join(BUNDLE_RUN_DIR_FILE), text)
}

/// A one-line message for a TOML error: where, the line itself, what is wrong.
fn toml_error_line(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim_end().replace('\n', "; ");
    let Some(span) = e.span() else {
        return format!("{what} (see config/podvisor.toml for the keys)");
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or_default().trim();
    format!("line {line_no} `{line}`: {what} (see config/podvisor.toml for the keys)")
}

/// The environment variables [`ShimConfig::from_env`] reads.
const ENV_VARS: &[&str] = &[
    "PODVISOR_KERNEL",
    "PODVISOR_INITRD",
    "PODVISOR_VCPUS",
    "PODVISOR_MEM_MIB",
    "PODVISOR_RUN_DIR",
    "PODVISOR_AGENT_TIMEOUT_SECS",
    KVM_DEVICE_ENV,
    HOST_QUIRKS_ENV,
    NORESERVE_ENV,
    KSM_ENV,
    GUEST_PROFILE_HZ_ENV,
];

/// The most guest profile samples a second per vCPU (each one is a vCPU exit).
pub const MAX_GUEST_PROFILE_HZ: u32 = 10_000;
/// Overrides `guest_profile_hz`.
pub const GUEST_PROFILE_HZ_ENV: &str = "PODVISOR_GUEST_PROFILE_HZ";
/// Environment variable naming the KVM device (default `/dev/kvm`).
pub const KVM_DEVICE_ENV: &str = "PODVISOR_KVM_DEVICE";
/// Environment variable that overrides host detection (`pvm` or `none`; else detected).
pub const HOST_QUIRKS_ENV: &str = "PODVISOR_HOST_QUIRKS";
/// Environment variable: `0` maps guest RAM without `MAP_NORESERVE`.
pub const NORESERVE_ENV: &str = "PODVISOR_NORESERVE";
/// Environment variable: `1` marks guest RAM mergeable by KSM.
pub const KSM_ENV: &str = "PODVISOR_KSM";

/// [`HOST_QUIRKS_ENV`]'s value: `pvm` and `none` force the quirks either way, anything else
/// detects them. Never fails (an unknown value detects), as a clap parser too.
pub fn parse_host_quirks(value: &str) -> Result<HostQuirks, Infallible> {
    Ok(match value {
        "pvm" => HostQuirks::Pvm,
        "none" => HostQuirks::None,
        _ => HostQuirks::Auto,
    })
}

/// [`NORESERVE_ENV`]'s value: `0` turns `MAP_NORESERVE` off, anything else keeps it on.
pub fn parse_noreserve(value: &str) -> Result<bool, Infallible> {
    Ok(value.trim() != "0")
}

/// [`KSM_ENV`]'s value: `1` turns KSM on, anything else keeps it off.
pub fn parse_ksm(value: &str) -> Result<bool, Infallible> {
    Ok(value.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::CodedOutputStream;
    use std::ffi::OsString;

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "podvisor-config-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `load_with` with no options, `env` and a default path that does not exist.
    fn load_env(env: &[(&str, &str)]) -> Result<ShimConfig, ConfigError> {
        let env: Vec<(String, OsString)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        ShimConfig::load_with(None, &lookup, Path::new("/nonexistent/podvisor.toml"))
    }

    fn options_any(type_url: &str, path: &str, body: &[u8]) -> Any {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            out.write_string(1, "io.podvisor.config.v1").unwrap();
            if !path.is_empty() {
                out.write_string(2, path).unwrap();
            }
            // An unknown field (a later containerd) is skipped.
            out.write_uint64(7, 42).unwrap();
            if !body.is_empty() {
                out.write_bytes(3, body).unwrap();
            }
            out.flush().unwrap();
        }
        let mut any = Any::new();
        any.type_url = type_url.to_string();
        any.value = value;
        any
    }

    #[test]
    fn full_file() {
        let c = ShimConfig::from_toml(
            r#"
            kernel = "/k/vmlinux"
            initrd = "/k/agent.cpio"
            vcpus = 2
            memory_mib = 512
            run_dir = "/run/pv"
            agent_timeout_secs = 30
            log_level = "debug"
            max_vcpus = 4
            max_memory_mib = 2048
            allow_kernel_override = true
            template = "auto"
            template_dir = "/var/t"
            seccomp = "log"
            template_shapes = [[2, 512]]
            max_templates = 3
            "#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            c,
            ShimConfig {
                kernel: Some("/k/vmlinux".into()),
                initrd: Some("/k/agent.cpio".into()),
                vcpus: 2,
                mem_mib: 512,
                run_dir: "/run/pv".into(),
                agent_timeout: Duration::from_secs(30),
                log_level: Some(log::LevelFilter::Debug),
                max_vcpus: 4,
                max_mem_mib: 2048,
                allow_kernel_override: true,
                template: TemplateMode::Auto,
                template_dir: "/var/t".into(),
                seccomp: SeccompMode::Log,
                template_shapes: vec![[2, 512]],
                max_templates: 3,
                annotated: false,
                source: None,
                ..ShimConfig::default()
            }
        );
    }

    #[test]
    fn partial_and_empty_files_keep_defaults() {
        let c = ShimConfig::from_toml("memory_mib = 128\n", "t.toml").unwrap();
        assert_eq!(
            c,
            ShimConfig {
                mem_mib: 128,
                ..ShimConfig::default()
            }
        );
        assert_eq!(
            ShimConfig::from_toml("", "t.toml").unwrap(),
            ShimConfig::default()
        );
        assert_eq!(
            ShimConfig::from_toml("# nothing\n", "t.toml").unwrap(),
            ShimConfig::default()
        );
    }

    #[test]
    fn the_example_file_parses_to_the_defaults() {
        let text = include_str!("../../config/podvisor.toml");
        let c = ShimConfig::from_toml(text, "config/podvisor.toml").unwrap();
        assert_eq!(
            c,
            ShimConfig {
                kernel: c.kernel.clone(),
                initrd: c.initrd.clone(),
                log_level: c.log_level,
                ..ShimConfig::default()
            }
        );
        assert!(c.kernel.is_some() && c.initrd.is_some());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = ShimConfig::from_toml("vcpus = 1\nmemory = 512\n", "/etc/x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/x.toml"), "{e}");
        assert!(e.contains("unknown field `memory`"), "{e}");
    }

    #[test]
    fn bad_types_and_values() {
        for (text, needle) in [
            ("vcpus = \"two\"", "vcpus"),
            ("memory_mib = -1", "memory_mib"),
            ("allow_kernel_override = 1", "allow_kernel_override"),
            ("template = \"on\"", "template"),
            ("log_level = \"loud\"", "log_level"),
            ("vcpus = 0", "vcpus = 0"),
            ("vcpus = 9", "max_vcpus (8)"),
            ("memory_mib = 8", "memory_mib = 8"),
            (
                "max_memory_mib = 64\nmemory_mib = 128",
                "max_memory_mib (64)",
            ),
            ("max_vcpus = 1000", "max_vcpus = 1000"),
            ("agent_timeout_secs = 0", "agent_timeout_secs"),
            ("vcpus = 1\nvcpus = 2", "vcpus"),
            ("[vcpus", "t.toml"),
        ] {
            let e = ShimConfig::from_toml(text, "t.toml")
                .map(|c| format!("accepted: {c:?}"))
                .unwrap_or_else(|e| e.to_string());
            assert!(
                e.starts_with("podvisor config t.toml: ") && e.contains(needle),
                "{text:?} -> {e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn env_overrides_the_file() {
        let dir = temp_dir("env");
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "kernel = \"/file/vmlinux\"\nvcpus = 2\nmemory_mib = 512\nrun_dir = \"/file/run\"\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = load_env(&[(CONFIG_ENV, f)]).unwrap();
        assert_eq!(c.kernel, Some("/file/vmlinux".into()));
        assert_eq!((c.vcpus, c.mem_mib), (2, 512));
        assert_eq!(c.source, Some(file.clone()));

        let c = load_env(&[
            (CONFIG_ENV, f),
            ("PODVISOR_KERNEL", "/env/vmlinux"),
            ("PODVISOR_INITRD", "/env/agent.cpio"),
            ("PODVISOR_VCPUS", "3"),
            ("PODVISOR_MEM_MIB", " 1024 "),
            ("PODVISOR_RUN_DIR", "/env/run"),
            ("PODVISOR_AGENT_TIMEOUT_SECS", "5"),
        ])
        .unwrap();
        assert_eq!(c.kernel, Some("/env/vmlinux".into()));
        assert_eq!(c.initrd, Some("/env/agent.cpio".into()));
        assert_eq!((c.vcpus, c.mem_mib), (3, 1024));
        assert_eq!(c.run_dir, PathBuf::from("/env/run"));
        assert_eq!(c.agent_timeout, Duration::from_secs(5));

        // Empty variables are unset ones.
        let c = load_env(&[
            (CONFIG_ENV, f),
            ("PODVISOR_KERNEL", ""),
            ("PODVISOR_VCPUS", ""),
        ])
        .unwrap();
        assert_eq!((c.kernel, c.vcpus), (Some("/file/vmlinux".into()), 2));

        let e = load_env(&[(CONFIG_ENV, f), ("PODVISOR_VCPUS", "many")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("PODVISOR_VCPUS=\"many\""), "{e}");
        // The result is checked after the environment's overrides.
        let e = load_env(&[(CONFIG_ENV, f), ("PODVISOR_VCPUS", "100")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.toml with the PODVISOR_* environment") && e.contains("vcpus = 100"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_file_anywhere_means_defaults() {
        assert_eq!(load_env(&[]).unwrap(), ShimConfig::default());
    }

    #[test]
    fn a_named_file_must_exist() {
        let e = load_env(&[(CONFIG_ENV, "/nonexistent/pv.toml")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/pv.toml") && e.contains(CONFIG_ENV),
            "{e}"
        );
    }

    #[test]
    fn the_default_file_is_read_when_present() {
        let dir = temp_dir("default");
        let file = dir.join("config.toml");
        std::fs::write(&file, "vcpus = 2\n").unwrap();
        let c = ShimConfig::load_with(None, &no_env, &file).unwrap();
        assert_eq!((c.vcpus, c.source), (2, Some(file.clone())));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runtime_options_decode() {
        let dir = temp_dir("options");
        let file = dir.join("pod.toml");
        std::fs::write(&file, "memory_mib = 384\n").unwrap();
        let any = options_any(
            "runtimeoptions.v1.Options",
            file.to_str().unwrap(),
            b"vcpus = 2",
        );
        let opts = RuntimeOptions::from_any(&any).unwrap().unwrap();
        assert_eq!(
            opts,
            RuntimeOptions {
                type_url: "io.podvisor.config.v1".into(),
                config_path: file.to_str().unwrap().into(),
                config_body: b"vcpus = 2".to_vec(),
            }
        );
        // With a type.googleapis.com/ prefix too.
        let prefixed = options_any(
            "type.googleapis.com/runtimeoptions.v1.Options",
            file.to_str().unwrap(),
            b"",
        );
        assert_eq!(
            RuntimeOptions::from_any(&prefixed)
                .unwrap()
                .unwrap()
                .config_path,
            file.to_str().unwrap()
        );

        // ConfigPath wins over ConfigBody; PODVISOR_CONFIG wins over both.
        let c = ShimConfig::load_with(Some(&opts), &no_env, Path::new("/nonexistent")).unwrap();
        assert_eq!((c.mem_mib, c.vcpus), (384, 1));
        let other = dir.join("env.toml");
        std::fs::write(&other, "memory_mib = 640\n").unwrap();
        let env_path = other.clone().into_os_string();
        let env = move |n: &str| (n == CONFIG_ENV).then(|| env_path.clone());
        let c = ShimConfig::load_with(Some(&opts), &env, Path::new("/nonexistent")).unwrap();
        assert_eq!(c.mem_mib, 640);
        // ConfigBody alone.
        let body_only = RuntimeOptions {
            config_path: String::new(),
            ..opts.clone()
        };
        let c =
            ShimConfig::load_with(Some(&body_only), &no_env, Path::new("/nonexistent")).unwrap();
        assert_eq!((c.mem_mib, c.vcpus), (256, 2));
        let bad_body = RuntimeOptions {
            config_path: String::new(),
            config_body: b"cpus = 2".to_vec(),
            ..opts.clone()
        };
        let e = ShimConfig::load_with(Some(&bad_body), &no_env, Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ConfigBody") && e.contains("`cpus`"), "{e}");

        // Through the public entry point (the process environment has no PODVISOR_CONFIG in
        // `cargo test`, so ConfigPath decides).
        if std::env::var_os(CONFIG_ENV).is_none() {
            let c = ShimConfig::load(Some(&any)).unwrap();
            assert_eq!(c.source, Some(file.clone()));
        }

        // No options at all.
        assert_eq!(RuntimeOptions::from_any(&Any::new()).unwrap(), None);
        // Another runtime's options.
        let runc = options_any("containerd.runc.v1.Options", "", b"");
        let e = RuntimeOptions::from_any(&runc).unwrap_err().to_string();
        assert!(
            e.contains("containerd.runc.v1.Options") && e.contains("ConfigPath"),
            "{e}"
        );
        // Garbage.
        let mut garbage = Any::new();
        garbage.type_url = RUNTIME_OPTIONS_TYPE.into();
        garbage.value = vec![0x12, 0x20, b'a'];
        let e = RuntimeOptions::from_any(&garbage).unwrap_err().to_string();
        assert!(e.contains("bad encoding"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use crate::grouping::ann as annotations;

    #[test]
    fn annotations_within_limits() {
        let base = ShimConfig {
            max_vcpus: 4,
            max_mem_mib: 1024,
            ..ShimConfig::default()
        };
        let c = base
            .with_annotations(&annotations(&[
                (ANNOTATION_VCPUS, "4"),
                (ANNOTATION_MEMORY_MIB, "1024"),
                (ANNOTATION_TEMPLATE, "off"),
                ("io.kubernetes.cri.sandbox-id", "abc"),
            ]))
            .unwrap();
        assert_eq!((c.vcpus, c.mem_mib), (4, 1024));
        assert_eq!(c.template, TemplateMode::Off);
        assert_eq!(base.with_annotations(&HashMap::new()).unwrap(), base);

        for (key, value, needle) in [
            (ANNOTATION_VCPUS, "5", "give 1 to 4"),
            (ANNOTATION_VCPUS, "0", "give 1 to 4"),
            (ANNOTATION_VCPUS, "two", "not a number"),
            (ANNOTATION_MEMORY_MIB, "2048", "give 32 to 1024"),
            (ANNOTATION_MEMORY_MIB, "-5", "not a number"),
            (ANNOTATION_KERNEL, "/bin/sh", "allow_kernel_override = true"),
            (ANNOTATION_TEMPLATE, "yes", "use \"auto\" or \"off\""),
            ("io.podvisor.config.cpus", "2", "unknown podvisor setting"),
        ] {
            let e = base
                .with_annotations(&annotations(&[(key, value)]))
                .map(|c| format!("accepted: {c:?}"))
                .unwrap_or_else(|e| e.to_string());
            assert!(
                e.starts_with(&format!("annotation {key}=\"{value}\": ")) && e.contains(needle),
                "{key}={value} -> {e}"
            );
        }
    }

    #[test]
    fn the_shipped_config_file_parses() {
        let c = ShimConfig::from_toml(
            include_str!("../../config/podvisor.toml"),
            "config/podvisor.toml",
        )
        .unwrap();
        assert_eq!(c.seccomp, SeccompMode::Enforce);
        assert_eq!(c.max_templates, DEFAULT_MAX_TEMPLATES);
    }

    #[test]
    fn templates_only_for_the_configured_shape_and_listed_ones() {
        let base = ShimConfig {
            max_vcpus: 4,
            max_mem_mib: 4096,
            template_shapes: vec![[2, 512]],
            ..ShimConfig::default()
        };
        assert!(base.template_allowed());
        let shape = |vcpus: &str, mem: &str| {
            base.with_annotations(&annotations(&[
                (ANNOTATION_VCPUS, vcpus),
                (ANNOTATION_MEMORY_MIB, mem),
            ]))
            .unwrap()
            .template_allowed()
        };
        assert!(shape("2", "512"), "a listed shape");
        assert!(!shape("2", "513"), "every MiB would be a template");
        assert!(!shape("3", "512"));
    }

    #[test]
    fn cri_pod_resources_size_the_vm_and_podvisor_annotations_win() {
        let c = ShimConfig::from_toml(
            "max_vcpus = 4\nmax_memory_mib = 4096\nguest_overhead_mib = 48\nmemory_step_mib = 64\n",
            "t.toml",
        )
        .unwrap();
        let cri = [
            (super::super::sizing::CRI_SANDBOX_MEMORY, "268435456"),
            (super::super::sizing::CRI_SANDBOX_CPU_QUOTA, "150000"),
            (super::super::sizing::CRI_SANDBOX_CPU_PERIOD, "100000"),
        ];
        let sized = c.with_annotations(&annotations(&cri)).unwrap();
        assert_eq!((sized.vcpus, sized.mem_mib), (2, 320));
        assert!(
            sized.template_allowed(),
            "rounded pod sizes may have templates"
        );
        let mut both = cri.to_vec();
        both.push((ANNOTATION_MEMORY_MIB, "512"));
        let chosen = c.with_annotations(&annotations(&both)).unwrap();
        assert_eq!((chosen.vcpus, chosen.mem_mib), (2, 512));
        // Off: the configured shape.
        let off = ShimConfig {
            size_from_pod: false,
            ..c.clone()
        };
        let fixed = off.with_annotations(&annotations(&cri)).unwrap();
        assert_eq!((fixed.vcpus, fixed.mem_mib), (c.vcpus, c.mem_mib));
        // A limit the settings cannot hold is an error naming the fix.
        let big = [(super::super::sizing::CRI_SANDBOX_MEMORY, "68719476736")];
        let e = c
            .with_annotations(&annotations(&big))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_memory_mib"), "{e}");
    }

    #[test]
    fn kernel_annotation_when_allowed() {
        let dir = temp_dir("kernel");
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        let base = ShimConfig {
            allow_kernel_override: true,
            ..ShimConfig::default()
        };
        let c = base
            .with_annotations(&annotations(&[(
                ANNOTATION_KERNEL,
                kernel.to_str().unwrap(),
            )]))
            .unwrap();
        assert_eq!(c.kernel, Some(kernel.clone()));
        // A template per chosen kernel would be unbounded: such a pod boots cold, even if
        // its annotations ask for templates.
        let c = base
            .with_annotations(&annotations(&[
                (ANNOTATION_KERNEL, kernel.to_str().unwrap()),
                (ANNOTATION_TEMPLATE, "auto"),
            ]))
            .unwrap();
        assert_eq!(c.template, TemplateMode::Off);
        for bad in ["vmlinux", "/nonexistent/vmlinux"] {
            let e = base
                .with_annotations(&annotations(&[(ANNOTATION_KERNEL, bad)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("absolute path of an existing"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn log_level_applies_unless_rust_log_is_set() {
        let before = log::max_level();
        ShimConfig {
            log_level: Some(log::LevelFilter::Trace),
            ..ShimConfig::default()
        }
        .apply_log_level();
        let expected = if std::env::var_os("RUST_LOG").is_some() {
            before
        } else {
            log::LevelFilter::Trace
        };
        assert_eq!(log::max_level(), expected);
        log::set_max_level(before);
    }

    #[test]
    fn delete_finds_the_recorded_run_dir() {
        let bundle = temp_dir("bundle");
        let env = |name: &str| (name == "PODVISOR_RUN_DIR").then(|| OsString::from("/env/run"));
        // Nothing recorded: the environment's.
        assert_eq!(
            ShimConfig::for_delete_with(&bundle, &env).run_dir,
            PathBuf::from("/env/run")
        );
        record_run_dir(&bundle, Path::new("/file/run")).unwrap();
        assert_eq!(
            ShimConfig::for_delete_with(&bundle, &env).run_dir,
            PathBuf::from("/file/run")
        );
        // A relative path is not trusted.
        std::fs::write(bundle.join(BUNDLE_RUN_DIR_FILE), "run\n").unwrap();
        assert_eq!(
            ShimConfig::for_delete_with(&bundle, &env).run_dir,
            PathBuf::from("/env/run")
        );
        std::fs::remove_dir_all(&bundle).unwrap();
    }

    #[test]
    fn from_env_skips_malformed_variables() {
        let env = |name: &str| match name {
            "PODVISOR_VCPUS" => Some(OsString::from("many")),
            "PODVISOR_MEM_MIB" => Some(OsString::from("512")),
            "PODVISOR_RUN_DIR" => Some(OsString::from("/env/run")),
            // from_env reads no file, even a named one.
            CONFIG_ENV => Some(OsString::from("/nonexistent/pv.toml")),
            _ => None,
        };
        let c = ShimConfig::from_env_with(&env);
        assert_eq!(
            c,
            ShimConfig {
                mem_mib: 512,
                run_dir: "/env/run".into(),
                ..ShimConfig::default()
            }
        );
    }

    #[test]
    fn host_settings_come_from_the_environment_with_the_vmms_defaults() {
        let c = load_env(&[]).unwrap();
        let d = c.host_settings();
        assert_eq!(d.kvm_device, PathBuf::from("/dev/kvm"));
        assert_eq!(d.quirks, HostQuirks::Auto);
        assert_eq!(d.memory, MemoryKnobs::default());
        assert_eq!(d, vmm::HostSettings::default());
        let c = load_env(&[
            (KVM_DEVICE_ENV, "/nonexistent/kvm"),
            (HOST_QUIRKS_ENV, "pvm"),
            (NORESERVE_ENV, " 0 "),
            (KSM_ENV, "1"),
            ("PODVISOR_SECCOMP", "log"),
        ])
        .unwrap();
        let h = c.host_settings();
        assert_eq!(h.kvm_device, PathBuf::from("/nonexistent/kvm"));
        assert_eq!(h.quirks, HostQuirks::Pvm);
        assert_eq!(
            h.memory,
            MemoryKnobs {
                noreserve: false,
                ksm: true
            }
        );
        assert_eq!(h.seccomp, SeccompMode::Log);
        // Values they do not know keep the defaults, as they always did.
        let c = load_env(&[
            (HOST_QUIRKS_ENV, "auto"),
            (NORESERVE_ENV, "no"),
            (KSM_ENV, "yes"),
        ])
        .unwrap();
        assert_eq!(c.host_settings(), d);
        assert_eq!(
            load_env(&[(HOST_QUIRKS_ENV, "none")]).unwrap().host_quirks,
            HostQuirks::None
        );
    }
}
