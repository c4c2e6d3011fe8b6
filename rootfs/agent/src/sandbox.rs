//! The pod: its containers, pod-wide settings (hostname, DNS, shared mounts, guest env),
//! and its teardown. Request handlers in `server` call into this; it owns the container
//! table and hands libcontainer work to `container`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use podvisor_agent_protocol::agent::{
    ConfigureNetworkRequest, CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest,
    SharedMount, StatsResponse, Stdio,
};

use crate::cgroup::{Cgroup, CGROUP_ROOT};
use crate::cgroup_pool::CgroupPool;
use crate::container::{validate_id, Container, Layout, ProcessIo};
use crate::error::{RpcError, RpcResult};
use crate::oom::{OomError, OomWatcher};
use crate::process::{Exit, Process};
use crate::reaper::Reaper;
use crate::stream::Streams;

/// Errors of pod-wide operations.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the sandbox was already created")]
    AlreadyCreated,
    #[error("container {0} already exists")]
    ContainerExists(String),
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("setting the hostname to {name:?} failed: {source}")]
    Hostname {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting {fstype} {source_name} on {target}: {errno}; check the tag/device and that the guest kernel has {fstype}")]
    Mount {
        fstype: String,
        source_name: String,
        target: String,
        errno: nix::Error,
    },
    #[error("the sandbox is being destroyed")]
    Destroying,
    #[error("setting the guest clock: {0}")]
    Clock(nix::Error),
    #[error("seeding the guest's random pool: {0}")]
    Entropy(std::io::Error),
    #[error(transparent)]
    Sysctl(#[from] crate::sysctl::SysctlError),
    #[error(
        "CreateSandbox brought {0} bytes of host entropy, fewer than {MIN_ENTROPY}: a VM \
         cloned from a template would share its template's random state"
    )]
    NoEntropy(usize),
}

/// The least host entropy a CreateSandbox must bring when the agent owns the machine.
pub const MIN_ENTROPY: usize = 32;

impl From<SandboxError> for RpcError {
    fn from(err: SandboxError) -> Self {
        let msg = err.to_string();
        match err {
            SandboxError::AlreadyCreated | SandboxError::ContainerExists(_) => {
                RpcError::AlreadyExists(msg)
            }
            SandboxError::ContainerNotFound(_) => RpcError::NotFound(msg),
            SandboxError::Destroying => RpcError::FailedPrecondition(msg),
            SandboxError::Sysctl(
                crate::sysctl::SysctlError::BadName(_) | crate::sysctl::SysctlError::Unknown { .. },
            ) => RpcError::InvalidArgument(msg),
            _ => RpcError::Internal(msg),
        }
    }
}

impl From<OomError> for RpcError {
    fn from(err: OomError) -> Self {
        let msg = err.to_string();
        match err {
            OomError::Timeout => RpcError::DeadlineExceeded(msg),
            OomError::Closed => RpcError::FailedPrecondition(msg),
            _ => RpcError::Internal(msg),
        }
    }
}

/// Agent-wide settings from the command line.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub layout: Layout,
    /// Where CreateSandbox writes DNS settings.
    pub resolv_conf: PathBuf,
    /// Environment every process gets (from the agent's own environment, e.g.
    /// GLIBC_TUNABLES given on the kernel command line).
    pub base_env: Vec<String>,
    /// PID 1 of a VM: CreateSandbox may set the clock and seed the random pool (never in
    /// host-test mode, where they are the host's).
    pub owns_machine: bool,
}

#[derive(Default)]
struct State {
    created: bool,
    destroying: bool,
    guest_env: Vec<String>,
    mounts: Vec<String>,
    containers: HashMap<String, Arc<Container>>,
}

/// The pod.
pub struct Sandbox {
    config: SandboxConfig,
    reaper: Arc<Reaper>,
    streams: Arc<Streams>,
    oom: Arc<OomWatcher>,
    /// Container cgroups made ahead of time.
    cgroups: Arc<CgroupPool>,
    state: Mutex<State>,
    /// Set when DestroySandbox finished; `main` waits for it.
    destroyed: (Mutex<bool>, Condvar),
}

/// Evicts the guest's unused dentries and inodes (`vm.drop_caches` = 2), so that the guest
/// FORGETs the shared files a removed container used: the host's virtio-fs server keeps a
/// descriptor per inode the guest knows (which also keeps the container's unmounted rootfs
/// alive on the host) until the guest forgets it, and a guest keeps unused dentries for as
/// long as its memory allows. Only in a VM: it is the whole machine's cache.
fn forget_unused_files() {
    if let Err(err) = std::fs::write("/proc/sys/vm/drop_caches", "2") {
        log::warn!("dropping unused dentries and inodes: {err}");
    }
}

/// A CreateSandbox of a VM must bring at least [`MIN_ENTROPY`] bytes of host entropy.
fn enough_entropy(bytes: &[u8]) -> Result<(), SandboxError> {
    if bytes.len() < MIN_ENTROPY {
        return Err(SandboxError::NoEntropy(bytes.len()));
    }
    Ok(())
}

fn mount_flags(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

impl Sandbox {
    pub fn new(
        config: SandboxConfig,
        reaper: Arc<Reaper>,
        streams: Arc<Streams>,
        oom: Arc<OomWatcher>,
        cgroups: Arc<CgroupPool>,
    ) -> Self {
        let guest_env = config.base_env.clone();
        Self {
            config,
            reaper,
            streams,
            oom,
            cgroups,
            state: Mutex::new(State {
                guest_env,
                ..State::default()
            }),
            destroyed: (Mutex::new(false), Condvar::new()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn container(&self, id: &str) -> RpcResult<Arc<Container>> {
        self.state()
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::ContainerNotFound(id.to_string()).into())
    }

    /// The process (container id, exec id).
    pub fn process(&self, container_id: &str, exec_id: &str) -> RpcResult<Arc<Process>> {
        Ok(self.container(container_id)?.process(exec_id)?)
    }

    fn mount_shared(&self, shared: &SharedMount) -> Result<(), SandboxError> {
        let mount_err = |errno| SandboxError::Mount {
            fstype: shared.fstype.clone(),
            source_name: shared.source.clone(),
            target: shared.target.clone(),
            errno,
        };
        fs::create_dir_all(&shared.target)
            .map_err(|e| mount_err(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
        let (flags, data) = mount_flags(&shared.options);
        mount(
            Some(shared.source.as_str()),
            shared.target.as_str(),
            Some(shared.fstype.as_str()),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(mount_err)?;
        log::debug!(
            "mounted {} {} on {}",
            shared.fstype,
            shared.source,
            shared.target
        );
        Ok(())
    }

    /// CreateSandbox.
    pub fn create(&self, req: &CreateSandboxRequest) -> RpcResult<()> {
        let mut state = self.state();
        if state.destroying {
            return Err(SandboxError::Destroying.into());
        }
        if state.created {
            return Err(SandboxError::AlreadyCreated.into());
        }
        if self.config.owns_machine {
            // Checked before anything changes: a refused request leaves the VM as it was.
            enough_entropy(&req.entropy)?;
            if req.realtime_ns > 0 {
                let ts = libc::timespec {
                    tv_sec: req.realtime_ns / 1_000_000_000,
                    tv_nsec: req.realtime_ns % 1_000_000_000,
                };
                // SAFETY: a valid timespec on the stack; the kernel only reads it.
                if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
                    return Err(SandboxError::Clock(nix::Error::last()).into());
                }
            }
            add_entropy(&req.entropy).map_err(SandboxError::Entropy)?;
            log::debug!("{} bytes of host entropy added", req.entropy.len());
        }
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname).map_err(|source| SandboxError::Hostname {
                name: req.hostname.clone(),
                source,
            })?;
        }
        if !req.sysctls.is_empty() {
            if self.config.owns_machine {
                crate::sysctl::apply(Path::new("/proc/sys"), &req.sysctls)
                    .map_err(SandboxError::from)?;
            } else {
                log::warn!(
                    "not the VM's agent: the pod's sysctls {:?} are not applied to this host",
                    req.sysctls
                );
            }
        }
        if !req.dns.is_empty() {
            let path = &self.config.resolv_conf;
            let text: String = req.dns.iter().map(|line| format!("{line}\n")).collect();
            fs::write(path, text).map_err(|source| SandboxError::Write {
                path: path.clone(),
                source,
            })?;
        }
        for shared in &req.mounts {
            self.mount_shared(shared)?;
            state.mounts.push(shared.target.clone());
        }
        crate::container::merge_env(&mut state.guest_env, &req.guest_env);
        if !state.guest_env.is_empty() {
            log::debug!("environment added to every process: {:?}", state.guest_env);
        }
        state.created = true;
        log::debug!("sandbox {} created", req.sandbox_id);
        Ok(())
    }

    /// ConfigureNetwork: the VM's interfaces and routes (see `network`).
    pub fn configure_network(&self, req: &ConfigureNetworkRequest) -> RpcResult<()> {
        if self.state().destroying {
            return Err(SandboxError::Destroying.into());
        }
        let resolv_conf = self
            .config
            .owns_machine
            .then_some(self.config.resolv_conf.as_path());
        crate::network::configure(req, resolv_conf)?;
        log::debug!(
            "network configured: {} interface(s), {} route(s)",
            req.interfaces.len(),
            req.routes.len()
        );
        Ok(())
    }

    /// CreateContainer; returns the init pid.
    pub fn create_container(&self, req: &CreateContainerRequest) -> RpcResult<u32> {
        let id = req.container_id.as_str();
        validate_id(id)?;
        let guest_env = {
            let state = self.state();
            if state.destroying {
                return Err(SandboxError::Destroying.into());
            }
            if state.containers.contains_key(id) {
                return Err(SandboxError::ContainerExists(id.to_string()).into());
            }
            state.guest_env.clone()
        };
        let attached = self.streams.take(id, "");
        let default_stdio = Stdio::new();
        let stdio = req.stdio.as_ref().unwrap_or(&default_stdio);
        let container = Container::create(
            &self.config.layout,
            &self.reaper,
            id,
            &req.oci_spec_json,
            &req.rootfs,
            self.cgroups.take(),
            ProcessIo {
                stdio,
                attached,
                guest_env: &guest_env,
            },
        )?;
        // A created process has a positive pid_t.
        let pid = container.init.pid().cast_unsigned();
        self.oom.watch(id, &container.cgroup);
        let mut state = self.state();
        if state.containers.contains_key(id) {
            // Lost a race with a concurrent create of the same id.
            drop(state);
            let _ = container.remove(&self.reaper);
            return Err(SandboxError::ContainerExists(id.to_string()).into());
        }
        state.containers.insert(id.to_string(), container);
        Ok(pid)
    }

    pub fn start_container(&self, id: &str) -> RpcResult<()> {
        Ok(self.container(id)?.start(&self.reaper)?)
    }

    /// ExecProcess; returns the pid.
    pub fn exec(&self, req: &ExecProcessRequest) -> RpcResult<u32> {
        let container = self.container(&req.container_id)?;
        let guest_env = self.state().guest_env.clone();
        let attached = self.streams.take(&req.container_id, &req.exec_id);
        let default_stdio = Stdio::new();
        let stdio = req.stdio.as_ref().unwrap_or(&default_stdio);
        let process = container.exec(
            &self.reaper,
            &req.exec_id,
            &req.oci_process_json,
            ProcessIo {
                stdio,
                attached,
                guest_env: &guest_env,
            },
        )?;
        Ok(process.pid().cast_unsigned())
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> RpcResult<()> {
        Ok(self
            .container(id)?
            .signal(&self.reaper, exec_id, signal, all)?)
    }

    /// WaitProcess: blocks until exit + drain.
    pub fn wait(&self, id: &str, exec_id: &str) -> RpcResult<Exit> {
        Ok(self.process(id, exec_id)?.wait())
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str, bytes: u64) -> RpcResult<()> {
        if let Some(stdin) = self.process(id, exec_id)?.stdin() {
            stdin.close_after(bytes);
        }
        Ok(())
    }

    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, columns: u32) -> RpcResult<()> {
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        self.process(id, exec_id)?
            .resize(clamp(rows), clamp(columns))
            .map_err(|e| crate::container::ContainerError::from(e).into())
    }

    pub fn pids(&self, id: &str) -> RpcResult<Vec<u32>> {
        let container = self.container(id)?;
        container
            .cgroup
            .pids()
            .map_err(|e| crate::container::ContainerError::from(e).into())
    }

    pub fn stats(&self, id: &str) -> RpcResult<StatsResponse> {
        Ok(self.container(id)?.cgroup.stats())
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> RpcResult<()> {
        Ok(self.container(id)?.update(resources_json)?)
    }

    pub fn set_paused(&self, id: &str, paused: bool) -> RpcResult<()> {
        Ok(self.container(id)?.set_paused(paused)?)
    }

    pub fn remove_exec(&self, id: &str, exec_id: &str) -> RpcResult<()> {
        if exec_id.is_empty() {
            return Err(RpcError::InvalidArgument(
                "exec id is empty: remove the init process with RemoveContainer".into(),
            ));
        }
        Ok(self.container(id)?.remove_exec(&self.reaper, exec_id)?)
    }

    /// RemoveContainer.
    pub fn remove_container(&self, id: &str) -> RpcResult<()> {
        let container = self.container(id)?;
        self.oom.unwatch(id);
        let result = container.remove(&self.reaper);
        self.streams.forget_container(id);
        self.state().containers.remove(id);
        if self.config.owns_machine {
            forget_unused_files();
        }
        Ok(result?)
    }

    /// GetOOMEvent.
    pub fn next_oom(&self, timeout: Option<Duration>) -> RpcResult<String> {
        Ok(self.oom.next(timeout)?)
    }

    /// DestroySandbox: removes every container, unmounts shared mounts, removes the pod
    /// cgroup. `main` then reboots the VM (guest) or exits (host test).
    pub fn destroy(&self) -> RpcResult<()> {
        let (containers, mounts) = {
            let mut state = self.state();
            state.destroying = true;
            (
                state.containers.drain().map(|(_, c)| c).collect::<Vec<_>>(),
                std::mem::take(&mut state.mounts),
            )
        };
        for container in containers {
            self.oom.unwatch(&container.id);
            if let Err(err) = container.remove(&self.reaper) {
                log::warn!("destroy: {err}");
            }
        }
        self.streams.forget_all();
        self.oom.close();
        for target in mounts.iter().rev() {
            if let Err(err) = umount2(target.as_str(), MntFlags::MNT_DETACH) {
                log::warn!("destroy: unmounting {target}: {err}");
            }
        }
        self.cgroups.drain();
        Cgroup::new(&PathBuf::from(&self.config.layout.cgroup_parent)).remove();
        // The host stops the VM as soon as this call answers: what the containers wrote
        // to the shared file systems must be on the host by then.
        nix::unistd::sync();
        log::info!("sandbox destroyed");
        let (lock, cond) = &self.destroyed;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cond.notify_all();
        Ok(())
    }

    /// Blocks until DestroySandbox finished.
    pub fn wait_destroyed(&self) {
        let (lock, cond) = &self.destroyed;
        let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = cond.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The pod cgroup's path (for logs).
    pub fn cgroup_parent_path(&self) -> PathBuf {
        PathBuf::from(CGROUP_ROOT).join(&self.config.layout.cgroup_parent)
    }
}

/// `RNDADDENTROPY`: mixes `bytes` into the kernel's pool and credits them (a plain write to
/// /dev/urandom mixes without crediting), then `RNDRESEEDCRNG`.
fn add_entropy(bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    let bytes = &bytes[..bytes.len().min(512)];
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut buf = Vec::with_capacity(8 + bytes.len());
    let len = i32::try_from(bytes.len()).expect("at most 512 bytes");
    buf.extend_from_slice(&(len * 8).to_ne_bytes());
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(bytes);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: `buf` is a rand_pool_info header followed by buf_size bytes, alive for the
    // call; the kernel only reads it.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, buf.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The CRNG reseeds from the pool only now and then: force it, so reads from now on
    // depend on the new entropy (a clone must not continue its template's output).
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: an ioctl without argument on our descriptor.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_sandbox_needs_host_entropy() {
        assert!(matches!(
            enough_entropy(&[]),
            Err(SandboxError::NoEntropy(0))
        ));
        assert!(enough_entropy(&[7; MIN_ENTROPY - 1]).is_err());
        assert!(enough_entropy(&[7; 64]).is_ok());
    }

    #[test]
    fn mount_options() {
        let (flags, data) = mount_flags(&[
            "ro".to_string(),
            "nodev".to_string(),
            "cache=auto".to_string(),
            "dax".to_string(),
        ]);
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NODEV);
        assert_eq!(data, "cache=auto,dax");
    }
}
