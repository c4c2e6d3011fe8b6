//! One container: its OCI bundle on the agent's state dir, its libcontainer state, its
//! cgroup, its init process and its exec processes.
//!
//! Container work is done by youki's `libcontainer` (cgroup v2 only): namespaces, rootfs +
//! pivot_root, spec mounts, /dev, users and groups, capabilities, rlimits,
//! no_new_privileges, readonly/masked paths, hostname, terminal (pty via a console socket),
//! seccomp from the spec (libcontainer's `libseccomp` feature: the C library libseccomp,
//! linked statically from Debian's libseccomp-dev, see `.cargo/config.toml`), and exec by
//! joining the namespaces of the init process.
//!
//! The workload is started by [`AgentExecutor`]: libcontainer's default exec, after
//! resetting the signal dispositions and mask the agent would otherwise pass on (ignored
//! signals survive execve).
//!
//! Every libcontainer call runs under the reaper's spawn lock (see `reaper`). That also
//! serializes two process-global side effects of libcontainer: it forks with a raw `clone3`
//! syscall (glibc's fork handlers do not run, so the child must not need a lock another
//! agent thread held at that instant; libcontainer's child code allocates from the calling
//! thread's malloc arena only), and its console-socket setup changes the process's cwd for
//! a moment (the agent uses absolute paths only).
//!
//! Paths: `<state>/bundles/<id>/config.json` is the adapted spec (rootfs, cgroupsPath,
//! guest env), `<state>/c/<id>/` libcontainer's state (short, because libcontainer puts a
//! Unix socket there), `<state>/tty/<n>.sock` console sockets.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libcontainer::config::YoukiConfig;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container as LcContainer, ContainerStatus};
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{
    LinuxNamespaceType, LinuxResources, LinuxSeccomp, Process as OciProcess, Spec,
};
use podvisor_agent_protocol::agent::Stdio;

use crate::cgroup::{Cgroup, CgroupError};
use crate::error::RpcError;
use crate::held_signal;
use crate::process::{Process, ProcessError};
use crate::reaper::Reaper;
use crate::stream::{self, Attached};

/// How long RemoveContainer waits for killed processes to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent waits for libcontainer to hand over a pty master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long StartContainer waits for a lean-launched init's `execve` (an exec takes well
/// under a second even where the guest kernel is emulated; past this, Start answers).
const EXEC_WAIT: Duration = Duration::from_secs(10);

/// Errors of container operations.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid id {0:?}: use 1 to 1024 characters of [A-Za-z0-9_.-], not starting with '.'")]
    InvalidId(String),
    #[error("bad OCI {what} JSON: {source}")]
    BadJson {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the OCI spec has no {0}: add it")]
    MissingSpec(&'static str),
    #[error("stdio.terminal ({stdio}) must match the OCI process's terminal ({spec})")]
    TerminalMismatch { stdio: bool, spec: bool },
    #[error("{kind} requested for {name} but no {kind} stream was attached: attach streams before create/exec")]
    StreamNotAttached { kind: &'static str, name: String },
    #[error("container {0} was already started")]
    AlreadyStarted(String),
    #[error("container {0} is not running: start it first, or it has exited")]
    NotRunning(String),
    #[error("container {0} has stopped")]
    Stopped(String),
    #[error("exec id {exec_id} already exists in container {id}")]
    ExecExists { id: String, exec_id: String },
    #[error("process {0} not found")]
    ProcessNotFound(String),
    #[error("process {0} already finished")]
    ProcessFinished(String),
    #[error("signal {0} is not a valid Linux signal")]
    BadSignal(u32),
    #[error("signalling {name} failed: {source}")]
    Signal {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("container {id}: {what}: {source}")]
    Io {
        id: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("container {id}: {what}: {message}")]
    Libcontainer {
        id: String,
        what: &'static str,
        message: String,
        invalid_input: bool,
    },
    #[error("not supported in a podvisor pod: {0}")]
    Unsupported(&'static str),
    #[error("container {id}: {source}")]
    Launch {
        id: String,
        #[source]
        source: crate::launcher::LaunchError,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Process(#[from] ProcessError),
}

impl From<ContainerError> for RpcError {
    fn from(err: ContainerError) -> Self {
        let msg = err.to_string();
        match err {
            ContainerError::InvalidId(_)
            | ContainerError::BadJson { .. }
            | ContainerError::MissingSpec(_)
            | ContainerError::TerminalMismatch { .. }
            | ContainerError::BadSignal(_)
            | ContainerError::Unsupported(_)
            | ContainerError::Libcontainer {
                invalid_input: true,
                ..
            } => RpcError::InvalidArgument(msg),
            ContainerError::StreamNotAttached { .. }
            | ContainerError::AlreadyStarted(_)
            | ContainerError::NotRunning(_)
            | ContainerError::Stopped(_)
            | ContainerError::Process(ProcessError::NoTerminal(_)) => {
                RpcError::FailedPrecondition(msg)
            }
            ContainerError::ExecExists { .. } => RpcError::AlreadyExists(msg),
            ContainerError::ProcessNotFound(_) | ContainerError::ProcessFinished(_) => {
                RpcError::NotFound(msg)
            }
            _ => RpcError::Internal(msg),
        }
    }
}

/// Formats an error with its whole source chain (libcontainer's top-level messages alone
/// rarely say what failed).
fn chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    msg
}

fn lc_err(id: &str, what: &'static str) -> impl FnOnce(LibcontainerError) -> ContainerError {
    let id = id.to_string();
    move |err| {
        let invalid_input = matches!(
            err,
            LibcontainerError::InvalidSpec(_)
                | LibcontainerError::MissingSpec(_)
                | LibcontainerError::InvalidID(_)
                | LibcontainerError::InvalidInput(_)
                | LibcontainerError::Spec(_)
        );
        ContainerError::Libcontainer {
            id,
            what,
            message: chain(&err),
            invalid_input,
        }
    }
}

/// Checks a container or exec id: it names files and cgroups.
pub fn validate_id(id: &str) -> Result<(), ContainerError> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidId(id.to_string()))
    }
}

/// Adds `KEY=VALUE` entries of `extra` whose key `env` does not set yet.
pub fn merge_env(env: &mut Vec<String>, extra: &[String]) {
    for entry in extra {
        let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
        if !env
            .iter()
            .any(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
        {
            env.push(entry.clone());
        }
    }
}

/// Where the agent keeps container files, and what every process gets.
#[derive(Debug, Clone)]
pub struct Layout {
    pub state_dir: PathBuf,
    /// Pod cgroup, relative to /sys/fs/cgroup (e.g. "podvisor").
    pub cgroup_parent: String,
    /// Create containers whose spec allows it with the lean launcher (`crate::launcher`)
    /// rather than libcontainer.
    pub lean: bool,
}

impl Layout {
    fn bundle(&self, id: &str) -> PathBuf {
        self.state_dir.join("bundles").join(id)
    }

    /// libcontainer's state root.
    pub fn lc_root(&self) -> PathBuf {
        self.state_dir.join("c")
    }

    fn tty_dir(&self) -> PathBuf {
        self.state_dir.join("tty")
    }
}

/// How a new process is wired: the stdio it asked for, the streams attached for it, and
/// the environment added to its own.
pub struct ProcessIo<'a> {
    pub stdio: &'a Stdio,
    pub attached: Attached,
    pub guest_env: &'a [String],
}

impl ProcessIo<'_> {
    /// The terminal flag of the request must match the OCI process's.
    fn check_terminal(&self, spec_terminal: bool) -> Result<(), ContainerError> {
        if self.stdio.terminal == spec_terminal {
            Ok(())
        } else {
            Err(ContainerError::TerminalMismatch {
                stdio: self.stdio.terminal,
                spec: spec_terminal,
            })
        }
    }
}

/// The child ends of a process's stdio plus what the agent keeps.
struct ChildStdio {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    console: Option<Console>,
}

/// A console socket on which libcontainer sends the pty master.
struct Console {
    listener: UnixListener,
    path: PathBuf,
    conn: File,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Signals a pid listed in cgroup.procs. One that is no `pid_t` (the kernel lists none) is
/// skipped: a wrapped negative pid would signal a process group.
fn kill_cgroup_pid(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

fn dev_null() -> std::io::Result<OwnedFd> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/null")
        .map(OwnedFd::from)
}

/// Pipe whose both ends are close-on-exec (libcontainer dup2s the child end onto 0/1/2,
/// which clears the flag there only).
fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

static CONSOLE_SEQ: AtomicU64 = AtomicU64::new(0);

/// Connects the attached streams to a new process: pipes (and their pumps) for the
/// requested streams, /dev/null for the others, or a console socket for a terminal.
fn wire_stdio(
    layout: &Layout,
    process: &Arc<Process>,
    io: ProcessIo,
) -> Result<ChildStdio, ContainerError> {
    let ProcessIo {
        stdio,
        mut attached,
        ..
    } = io;
    let name = process.name();
    let io = |what| {
        let id = process.container_id.clone();
        move |source| ContainerError::Io { id, what, source }
    };
    let missing = |kind| ContainerError::StreamNotAttached {
        kind,
        name: name.clone(),
    };
    if stdio.terminal {
        let conn = attached.pty.take().ok_or_else(|| missing("pty"))?;
        let dir = layout.tty_dir();
        fs::create_dir_all(&dir).map_err(io("creating the console socket dir"))?;
        let path = dir.join(format!(
            "{}.sock",
            CONSOLE_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(io("binding the console socket"))?;
        let null = || dev_null().map_err(io("opening /dev/null"));
        return Ok(ChildStdio {
            stdin: null()?,
            stdout: null()?,
            stderr: null()?,
            console: Some(Console {
                listener,
                path,
                conn,
            }),
        });
    }
    let stdin = match (stdio.stdin, attached.stdin.take()) {
        (false, _) => dev_null().map_err(io("opening /dev/null"))?,
        (true, None) => return Err(missing("stdin")),
        (true, Some(conn)) => {
            let (read, write) = cloexec_pipe().map_err(io("creating the stdin pipe"))?;
            let control = stream::start_input_pump(process, conn, File::from(write))
                .map_err(io("starting the stdin pump"))?;
            process.set_stdin(control);
            read
        }
    };
    let output = |wanted: bool, conn: Option<File>, kind: &'static str| match (wanted, conn) {
        (false, _) => dev_null().map_err(io("opening /dev/null")),
        (true, None) => Err(missing(kind)),
        (true, Some(conn)) => {
            let (read, write) = cloexec_pipe().map_err(io("creating an output pipe"))?;
            stream::start_output_pump(process, kind, File::from(read), conn)
                .map_err(io("starting an output pump"))?;
            Ok(write)
        }
    };
    let stdout = output(stdio.stdout, attached.stdout.take(), "stdout")?;
    let stderr = output(stdio.stderr, attached.stderr.take(), "stderr")?;
    Ok(ChildStdio {
        stdin,
        stdout,
        stderr,
        console: None,
    })
}

/// Receives the pty master libcontainer sent on the console socket and starts the pumps.
fn attach_console(process: &Arc<Process>, console: Console) -> Result<(), ContainerError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let id = process.container_id.clone();
    let io = |what| {
        let id = id.clone();
        move |source| ContainerError::Io { id, what, source }
    };
    // libcontainer's init sent the master before `build` returned; the connection waits in
    // the backlog. Poll anyway so a broken init cannot hang the agent.
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&console.listener),
        nix::poll::PollFlags::POLLIN,
    )];
    let timeout =
        nix::poll::PollTimeout::try_from(CONSOLE_TIMEOUT).unwrap_or(nix::poll::PollTimeout::MAX);
    let ready = nix::poll::poll(&mut fds, timeout)
        .map_err(|e| io("waiting for the pty master")(e.into()))?;
    if ready == 0 {
        return Err(io("waiting for the pty master")(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        )));
    }
    let (sock, _) = console
        .listener
        .accept()
        .map_err(io("accepting the console socket"))?;
    let mut buf = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| io("receiving the pty master")(e.into()))?;
    let mut master = None;
    for cmsg in msg
        .cmsgs()
        .map_err(|e| io("receiving the pty master")(e.into()))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: SCM_RIGHTS installed this descriptor in our table for us alone.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                master.get_or_insert(fd);
            }
        }
    }
    let master = master.ok_or_else(|| {
        io("receiving the pty master")(std::io::Error::other("no descriptor in the message"))
    })?;
    let master = File::from(master);
    let conn = console
        .conn
        .try_clone()
        .map_err(io("cloning the pty stream"))?;
    let control = stream::start_input_pump(
        process,
        conn,
        master.try_clone().map_err(io("cloning the pty master"))?,
    )
    .map_err(io("starting the pty input pump"))?;
    process.set_stdin(control);
    process.set_pty(OwnedFd::from(
        master.try_clone().map_err(io("cloning the pty master"))?,
    ));
    stream::start_output_pump(
        process,
        "pty",
        master,
        console
            .conn
            .try_clone()
            .map_err(io("cloning the pty stream"))?,
    )
    .map_err(io("starting the pty output pump"))?;
    Ok(())
}

/// A libcontainer builder for container `id`; `exec_seccomp` is the container's seccomp
/// profile when the builder starts an exec process (see [`AgentExecutor`]).
fn builder(
    layout: &Layout,
    id: &str,
    child: ChildStdio,
    exec_seccomp: Option<LinuxSeccomp>,
) -> Result<(ContainerBuilder, Option<Console>), ContainerError> {
    let mut builder = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(layout.lc_root())
        .map_err(lc_err(id, "preparing the state dir"))?
        .with_stdin(child.stdin)
        .with_stdout(child.stdout)
        .with_stderr(child.stderr)
        .with_executor(AgentExecutor {
            seccomp: exec_seccomp,
        });
    if let Some(console) = &child.console {
        builder = builder.with_console_socket(Some(&console.path));
    }
    Ok((builder, child.console))
}

/// libcontainer's default executor (exec the spec's args), preceded by giving the new
/// program the signal state a fresh process has (the agent ignores SIGPIPE, as every Rust
/// program, and ignored signals stay ignored across execve) and, for an exec process of a
/// container with a seccomp profile, that profile.
///
/// libcontainer confines a container's init with its profile but not the processes exec'd
/// into it (its tenant drops `linux.seccomp`); runc confines both. Here the profile is
/// loaded last, right before execve, as runc does when no_new_privs is set. Without
/// no_new_privs, runc loads it before dropping capabilities, a step libcontainer offers no
/// hook for: the profile is loaded as is when the process may (CAP_SYS_ADMIN), else with
/// no_new_privs set first. An exec'd process is never left unconfined; in that last case a
/// setuid program it runs gains no privileges (which runc would allow).
#[derive(Clone)]
struct AgentExecutor {
    seccomp: Option<LinuxSeccomp>,
}

impl Executor for AgentExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        reset_signals();
        if let Some(profile) = &self.seccomp {
            load_exec_seccomp(profile)?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// Loads `profile` into this (exec'd) process: as is if it may, else after setting
/// no_new_privs.
fn load_exec_seccomp(profile: &LinuxSeccomp) -> Result<(), ExecutorError> {
    if libcontainer::seccomp::initialize_seccomp(profile).is_ok() {
        return Ok(());
    }
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes no pointers and only sets a flag.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(ExecutorError::Other(format!(
            "setting no_new_privs for the container's seccomp profile: {}",
            std::io::Error::last_os_error()
        )));
    }
    libcontainer::seccomp::initialize_seccomp(profile)
        .map(|_| ())
        .map_err(|e| ExecutorError::Other(format!("loading the container's seccomp profile: {e}")))
}

/// The kernel's `struct sigaction` on x86_64 (what the raw rt_sigaction syscall takes;
/// glibc's `struct sigaction` has a 128-byte mask and another field order).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Signals the agent ignores (bit `n - 1` for signal `n`), noted once at start-up by
/// [`note_ignored_signals`]; `u64::MAX` until then (every signal is checked).
static IGNORED_SIGNALS: AtomicU64 = AtomicU64::new(u64::MAX);

/// The disposition of `signal` (raw rt_sigaction: glibc's wrapper refuses its reserved
/// signals 32 and 33).
fn disposition(signal: u32) -> Option<usize> {
    let mut old = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: rt_sigaction with a null new action writes the current one into `old`, a
    // valid kernel sigaction of the size passed (8-byte mask).
    let got = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            signal,
            std::ptr::null::<KernelSigaction>(),
            &mut old as *mut KernelSigaction,
            8usize,
        )
    };
    (got == 0).then_some(old.handler)
}

/// Notes which signals the agent ignores, so that each container process resets just
/// those (a syscall per signal is costly where the guest kernel is slow). Call once at
/// start-up, after the agent set its own dispositions; the agent ignores no signal later.
pub fn note_ignored_signals() {
    let mask = (1..=64u32)
        .filter(|&s| disposition(s) == Some(libc::SIG_IGN))
        .fold(0u64, |m, s| m | 1 << (s - 1));
    IGNORED_SIGNALS.store(mask, Ordering::Relaxed);
}

/// Default disposition for every signal the agent ignores and an empty signal mask. Runs
/// in the container's init process just before execve (ignored signals stay ignored
/// across execve); async-signal-safe (the lean launcher's child calls it).
pub(crate) fn reset_signals() {
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    let noted = IGNORED_SIGNALS.load(Ordering::Relaxed);
    for signal in (1..=64u32).filter(|s| noted & (1 << (s - 1)) != 0) {
        // Unless noted, check first: only ignored signals need a change.
        if noted == u64::MAX && disposition(signal) != Some(libc::SIG_IGN) {
            continue;
        }
        // SAFETY: installs SIG_DFL from `default`, valid for the call; no handler runs.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
    // SAFETY: an empty, initialized set; pthread_sigmask copies it.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// The lean launcher's plan for `spec`, if the agent uses it and the spec allows it
/// (terminals go through libcontainer's console socket).
fn lean_plan(
    layout: &Layout,
    spec: &Spec,
    child: &ChildStdio,
) -> Option<crate::launcher::Prepared> {
    if !layout.lean || child.console.is_some() {
        return None;
    }
    let root = spec.root().as_ref()?.path();
    match crate::launcher::plan(spec, |uid| crate::launcher::home_of(root, uid)) {
        Ok(plan) => Some(plan),
        Err(reason) => {
            log::debug!("creating with libcontainer: the spec has {reason}");
            None
        }
    }
}

/// Creates the container with libcontainer (its init process waits for `start` on
/// libcontainer's notify socket).
fn launch_libcontainer(
    layout: &Layout,
    reaper: &Reaper,
    id: &str,
    bundle: &Path,
    child: ChildStdio,
    init: &Arc<Process>,
) -> Result<LcContainer, ContainerError> {
    let (builder, console) = builder(layout, id, child, None)?;
    let guard = reaper.lock_spawn();
    let _watch = crate::stall::watch(format!("create {id}"));
    let lc = builder
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(lc_err(id, "create"))?;
    guard.register(lc.pid().map(Pid::as_raw).unwrap_or(0), init);
    drop(guard);
    if let Some(console) = console {
        attach_console(init, console)?;
    }
    Ok(lc)
}

/// Creates the container's init process with the lean launcher in `cgroup` (made here
/// unless it is a spare, with the spec's resources), then libcontainer's state for it
/// (state.json, youki_config.json), so that exec, kill and delete work as for any
/// container. Returns the state and the init's start pipe.
#[allow(clippy::too_many_arguments)]
fn launch_lean(
    layout: &Layout,
    reaper: &Reaper,
    id: &str,
    spec: &Spec,
    bundle: &Path,
    cgroup: &Cgroup,
    plan: &crate::launcher::Prepared,
    child: ChildStdio,
    init: &Arc<Process>,
) -> Result<(LcContainer, crate::launcher::Starter), ContainerError> {
    let io_err = |what| {
        let id = id.to_string();
        move |source| ContainerError::Io { id, what, source }
    };
    crate::cgroup_pool::ensure_cgroup(Path::new(crate::cgroup::CGROUP_ROOT), cgroup.path())
        .map_err(io_err("creating the container's cgroup"))?;
    if let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
        cgroup.apply(resources)?;
    }
    let cgroup_dir = File::open(cgroup.path()).map_err(io_err("opening the container's cgroup"))?;
    let container_root = layout.lc_root().join(id);
    fs::create_dir(&container_root).map_err(io_err("creating the container's state dir"))?;
    let launched = {
        let guard = reaper.lock_spawn();
        let _watch = crate::stall::watch(format!("create {id}"));
        plan.launch(
            [
                child.stdin.as_raw_fd(),
                child.stdout.as_raw_fd(),
                child.stderr.as_raw_fd(),
            ],
            &OwnedFd::from(cgroup_dir),
            |pid| guard.register(pid, init),
        )
    };
    drop(child);
    let state = launched.map_err(|e| e.to_string()).and_then(|launched| {
        let mut lc = LcContainer::new(
            id,
            ContainerStatus::Created,
            Some(launched.pid),
            bundle,
            &container_root,
        )
        .map_err(|e| chain(&e))?;
        lc.set_systemd(false)
            .set_annotations(spec.annotations().clone());
        lc.save().map_err(|e| chain(&e))?;
        YoukiConfig::from_spec(spec, id)
            .and_then(|c| c.save(&container_root))
            .map_err(|e| chain(&e))?;
        Ok((lc, launched.start))
    });
    state.map_err(|message| {
        let _ = fs::remove_dir_all(&container_root);
        let pid = init.pid();
        if pid > 0 && init.exit().is_none() {
            kill_cgroup_pid(pid.cast_unsigned(), Signal::SIGKILL);
        }
        ContainerError::Libcontainer {
            id: id.to_string(),
            what: "create",
            message,
            invalid_input: false,
        }
    })
}

/// A container and its processes.
pub struct Container {
    pub id: String,
    layout: Layout,
    pub cgroup: Cgroup,
    pub init: Arc<Process>,
    lc: Mutex<LcContainer>,
    /// A lean-launched init's starter (`crate::launcher`), until StartContainer.
    lean_start: Mutex<Option<crate::launcher::Starter>>,
    /// The spec's seccomp profile: exec'd processes are confined by it too.
    seccomp: Option<LinuxSeccomp>,
    /// When StartContainer released the init; None until then (signals to it may be held
    /// a while after: [`crate::held_signal`]).
    started_at: Mutex<Option<Instant>>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    exec_seq: AtomicU64,
}

impl Container {
    /// CreateContainer: writes the adapted bundle and creates the container; its init
    /// process waits for `start`. Its cgroup is `spare` (an empty cgroup made ahead of
    /// time, relative to the cgroup root, `crate::cgroup_pool`) or else
    /// `<cgroup parent>/<id>`, made by libcontainer.
    pub fn create(
        layout: &Layout,
        reaper: &Reaper,
        id: &str,
        spec_json: &[u8],
        rootfs: &str,
        spare: Option<String>,
        io: ProcessIo,
    ) -> Result<Arc<Self>, ContainerError> {
        validate_id(id)?;
        let mut spec: Spec =
            serde_json::from_slice(spec_json).map_err(|source| ContainerError::BadJson {
                what: "spec",
                source,
            })?;
        crate::pod_pid::resolve(&mut spec).map_err(|source| ContainerError::Io {
            id: id.to_string(),
            what: "making the pod's PID namespace",
            source,
        })?;
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        if seccomp
            .as_ref()
            .is_some_and(libcontainer::seccomp::is_notify)
        {
            return Err(ContainerError::Unsupported(
                "a seccomp profile with SCMP_ACT_NOTIFY (no seccomp agent runs in the pod's VM)",
            ));
        }
        let own_pid_namespace = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|nss| {
                nss.iter()
                    .any(|ns| ns.typ() == LinuxNamespaceType::Pid && ns.path().is_none())
            });
        let mut process = spec
            .process()
            .clone()
            .ok_or(ContainerError::MissingSpec("process"))?;
        let terminal = process.terminal().unwrap_or(false);
        io.check_terminal(terminal)?;
        let mut env = process.env().clone().unwrap_or_default();
        merge_env(&mut env, io.guest_env);
        process.set_env(Some(env));
        spec.set_process(Some(process));
        let mut root = spec
            .root()
            .clone()
            .ok_or(ContainerError::MissingSpec("root"))?;
        if !rootfs.is_empty() {
            root.set_path(PathBuf::from(rootfs));
        }
        spec.set_root(Some(root));
        let cgroup_path = match &spare {
            Some(relative) => PathBuf::from(format!("/{relative}")),
            None => PathBuf::from(format!("/{}/{id}", layout.cgroup_parent)),
        };
        let cgroup = Cgroup::new(&cgroup_path);
        let mut linux = spec
            .linux()
            .clone()
            .ok_or(ContainerError::MissingSpec("linux section"))?;
        linux.set_cgroups_path(Some(cgroup_path.clone()));
        spec.set_linux(Some(linux));

        let io_err = |what| {
            let id = id.to_string();
            move |source| ContainerError::Io { id, what, source }
        };
        let bundle = layout.bundle(id);
        fs::create_dir_all(&bundle).map_err(io_err("creating the bundle dir"))?;
        fs::create_dir_all(layout.lc_root()).map_err(io_err("creating the state dir"))?;
        let config =
            serde_json::to_vec(&spec).map_err(|e| io_err("encoding config.json")(e.into()))?;
        fs::write(bundle.join("config.json"), config).map_err(io_err("writing config.json"))?;

        let init = Process::new(id, "");
        let created = (|| {
            let child = wire_stdio(layout, &init, io)?;
            let meter = log::log_enabled!(log::Level::Debug).then(crate::cost::SpawnMeter::start);
            let (lc, start, how) = match lean_plan(layout, &spec, &child) {
                Some(plan) => {
                    let (lc, start) = launch_lean(
                        layout, reaper, id, &spec, &bundle, &cgroup, &plan, child, &init,
                    )?;
                    (lc, Some(start), " (lean)")
                }
                None => (
                    launch_libcontainer(layout, reaper, id, &bundle, child, &init)?,
                    None,
                    "",
                ),
            };
            let pid = init.pid();
            log::debug!(
                "container {id} created{how}, init pid {pid}, cgroup {}{}",
                cgroup.path().display(),
                meter
                    .map(|m| format!(": {}", m.finish(pid)))
                    .unwrap_or_default()
            );
            Ok((lc, start))
        })();
        let (lc, lean_start) = match created {
            Ok(created) => created,
            Err(err) => {
                let _ = fs::remove_dir_all(&bundle);
                // Empty after a failed create, whoever made it (a spare, the lean path or
                // libcontainer): nothing of the container stays.
                cgroup.remove();
                init.release_io();
                return Err(err);
            }
        };
        if !own_pid_namespace {
            // Its processes outlive its init (they are not in a PID namespace of their
            // own that ends with it): as containerd's runc shim does, they are killed when
            // the init exits, so none keeps running (or holds the container's output).
            let (cgroup, name) = (cgroup.clone(), id.to_string());
            init.set_on_exit(Box::new(move || {
                if !cgroup.kill_all() {
                    for pid in cgroup.pids().unwrap_or_default() {
                        kill_cgroup_pid(pid, Signal::SIGKILL);
                    }
                }
                log::debug!("container {name}: init exited, its other processes killed");
            }));
        }
        Ok(Arc::new(Self {
            id: id.to_string(),
            layout: layout.clone(),
            cgroup,
            init,
            lc: Mutex::new(lc),
            lean_start: Mutex::new(lean_start),
            started_at: Mutex::new(None),
            seccomp,
            execs: Mutex::new(HashMap::new()),
            exec_seq: AtomicU64::new(0),
        }))
    }

    fn lc(&self) -> MutexGuard<'_, LcContainer> {
        self.lc.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn execs(&self) -> MutexGuard<'_, HashMap<String, Arc<Process>>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When StartContainer released the init, if it has.
    fn started_at(&self) -> Option<Instant> {
        *self.started_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True once started and while the init process lives.
    pub fn is_running(&self) -> bool {
        self.started_at().is_some() && self.init.exit().is_none()
    }

    /// StartContainer.
    pub fn start(&self, reaper: &Reaper) -> Result<(), ContainerError> {
        if self.started_at().is_some() {
            return Err(ContainerError::AlreadyStarted(self.id.clone()));
        }
        if self.init.exit().is_some() {
            return Err(ContainerError::Stopped(self.id.clone()));
        }
        let guard = reaper.lock_spawn();
        let lean_start = self
            .lean_start
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let io_err = |what| {
            let id = self.id.clone();
            move |source| ContainerError::Io { id, what, source }
        };
        let execing = match lean_start {
            Some(starter) => {
                let execing = starter
                    .release()
                    .map_err(io_err("starting the init process"))?;
                let mut lc = self.lc();
                lc.set_status(ContainerStatus::Running);
                lc.save().map_err(lc_err(&self.id, "start"))?;
                Some(execing)
            }
            None => {
                self.lc().start().map_err(lc_err(&self.id, "start"))?;
                None
            }
        };
        *self.started_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        drop(guard);
        // Start answers once the container runs its program, as runc's does: a failed
        // execve is Start's error, not a silent exit 127.
        if let Some(execing) = execing {
            execing
                .wait(EXEC_WAIT)
                .map_err(|source| ContainerError::Launch {
                    id: self.id.clone(),
                    source,
                })?;
        }
        log::debug!("container {} started", self.id);
        Ok(())
    }

    /// The init process (empty exec id) or an exec process.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ProcessNotFound(format!("{}/{exec_id}", self.id)))
    }

    /// ExecProcess: runs `process_json` (an OCI Process) in the running container.
    pub fn exec(
        &self,
        reaper: &Reaper,
        exec_id: &str,
        process_json: &[u8],
        io: ProcessIo,
    ) -> Result<Arc<Process>, ContainerError> {
        validate_id(exec_id)?;
        if self.execs().contains_key(exec_id) {
            return Err(ContainerError::ExecExists {
                id: self.id.clone(),
                exec_id: exec_id.to_string(),
            });
        }
        if !self.is_running() {
            return Err(ContainerError::NotRunning(self.id.clone()));
        }
        let mut oci: OciProcess =
            serde_json::from_slice(process_json).map_err(|source| ContainerError::BadJson {
                what: "process",
                source,
            })?;
        io.check_terminal(oci.terminal().unwrap_or(false))?;
        let mut env = oci.env().clone().unwrap_or_default();
        merge_env(&mut env, io.guest_env);
        oci.set_env(Some(env));
        let io_err = |what| {
            let id = self.id.clone();
            move |source| ContainerError::Io { id, what, source }
        };
        let path = self.layout.bundle(&self.id).join(format!(
            "exec-{}.json",
            self.exec_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let json =
            serde_json::to_vec(&oci).map_err(|e| io_err("encoding the exec process")(e.into()))?;
        fs::write(&path, json).map_err(io_err("writing the exec process"))?;

        let process = Process::new(&self.id, exec_id);
        let result = (|| {
            let child = wire_stdio(&self.layout, &process, io)?;
            let (builder, console) = builder(&self.layout, &self.id, child, self.seccomp.clone())?;
            let guard = reaper.lock_spawn();
            let _watch = crate::stall::watch(format!("exec {}/{exec_id}", self.id));
            let pid = builder
                .as_tenant()
                .with_process(Some(&path))
                .with_detach(true)
                .build()
                .map_err(lc_err(&self.id, "exec"))?;
            guard.register(pid.as_raw(), &process);
            drop(guard);
            if let Some(console) = console {
                attach_console(&process, console)?;
            }
            Ok(())
        })();
        let _ = fs::remove_file(&path);
        if let Err(err) = result {
            process.release_io();
            return Err(err);
        }
        log::debug!("exec {} started, pid {}", process.name(), process.pid());
        self.execs().insert(exec_id.to_string(), process.clone());
        Ok(process)
    }

    /// SignalProcess. `all` signals every process of the container's cgroup.
    pub fn signal(
        &self,
        reaper: &Reaper,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let process = self.process(exec_id)?;
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or(ContainerError::BadSignal(signal))?;
        // Under the spawn lock nothing is reaped: a pid we signal is not recycled.
        let _guard = reaper.lock_spawn();
        if all && exec_id.is_empty() {
            for pid in self.cgroup.pids()? {
                kill_cgroup_pid(pid, sig);
            }
            return Ok(());
        }
        if process.exit().is_some() || process.pid() == 0 {
            return Err(ContainerError::ProcessFinished(process.name()));
        }
        let pid = process.pid();
        if exec_id.is_empty() && self.hold_signal(pid, sig) {
            return Ok(());
        }
        kill(Pid::from_raw(pid), sig).map_err(|source| ContainerError::Signal {
            name: process.name(),
            source,
        })
    }

    /// Holds `sig` for the init (`pid`, alive, under the reaper's lock) if it would be lost
    /// now ([`crate::held_signal`]); false if it is to be sent at once.
    fn hold_signal(&self, pid: i32, sig: Signal) -> bool {
        // Only a young init's status is read (each read is guest-kernel work).
        let Some(at) = self.started_at().filter(|&t| held_signal::young(t)) else {
            return false;
        };
        if !held_signal::must_hold(sig, held_signal::view(pid, sig)) {
            return false;
        }
        let held = held_signal::pidfd(pid)
            .and_then(|pidfd| held_signal::hold(self.init.name(), pid, pidfd, sig, at));
        match held {
            Ok(()) => {
                log::debug!("{sig} for {} held: its init has no handler yet", self.id);
                true
            }
            Err(e) => {
                log::warn!("cannot hold {sig} for {} ({e}): sending it now", self.id);
                false
            }
        }
    }

    /// Forgets an exec process (killing it if it still runs).
    pub fn remove_exec(&self, reaper: &Reaper, exec_id: &str) -> Result<(), ContainerError> {
        let process = self.process(exec_id)?;
        if process.exit().is_none() {
            let _guard = reaper.lock_spawn();
            if process.exit().is_none() {
                let _ = kill(Pid::from_raw(process.pid()), Signal::SIGKILL);
            }
        }
        process.release_io();
        self.execs().remove(exec_id);
        Ok(())
    }

    /// PauseContainer / ResumeContainer.
    pub fn set_paused(&self, paused: bool) -> Result<(), ContainerError> {
        if !self.is_running() {
            return Err(ContainerError::NotRunning(self.id.clone()));
        }
        self.cgroup.set_frozen(paused)?;
        log::info!(
            "container {} {}",
            self.id,
            if paused { "paused" } else { "resumed" }
        );
        Ok(())
    }

    /// UpdateResources.
    pub fn update(&self, resources_json: &[u8]) -> Result<(), ContainerError> {
        let resources: LinuxResources =
            serde_json::from_slice(resources_json).map_err(|source| ContainerError::BadJson {
                what: "resources",
                source,
            })?;
        self.cgroup.apply(&resources)?;
        Ok(())
    }

    /// RemoveContainer: kills every process, waits until they are reaped, deletes the
    /// libcontainer state and cgroup, removes the bundle.
    pub fn remove(&self, reaper: &Reaper) -> Result<(), ContainerError> {
        let mut processes: Vec<Arc<Process>> = self.execs().values().cloned().collect();
        processes.push(self.init.clone());
        {
            let _guard = reaper.lock_spawn();
            if !self.cgroup.kill_all() {
                for pid in self.cgroup.pids().unwrap_or_default() {
                    kill_cgroup_pid(pid, Signal::SIGKILL);
                }
            }
            for process in &processes {
                if process.exit().is_none() && process.pid() > 0 {
                    let _ = kill(Pid::from_raw(process.pid()), Signal::SIGKILL);
                }
            }
        }
        // SIGKILL reaches frozen processes too; thaw anyway so the cgroup can go away.
        if self.cgroup.is_frozen() {
            let _ = self.cgroup.set_frozen(false);
        }
        for process in &processes {
            if !process.wait_exit(KILL_TIMEOUT) {
                log::warn!(
                    "{}: pid {} not reaped {KILL_TIMEOUT:?} after SIGKILL",
                    process.name(),
                    process.pid()
                );
            }
            process.release_io();
        }
        let deleted = {
            let _guard = reaper.lock_spawn();
            self.lc().delete(true)
        };
        let _ = fs::remove_dir_all(self.layout.bundle(&self.id));
        self.cgroup.remove();
        deleted.map_err(lc_err(&self.id, "delete"))?;
        log::info!("container {} removed", self.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("abc-1.2_3").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(1025)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_merge_keeps_spec_values() {
        let mut env = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        merge_env(
            &mut env,
            &["A=2".to_string(), "GLIBC_TUNABLES=x=y".to_string()],
        );
        assert_eq!(env, ["PATH=/bin", "A=1", "GLIBC_TUNABLES=x=y"]);
    }

    #[test]
    fn rpc_codes() {
        let code = |e: ContainerError| RpcError::from(e).code();
        assert_eq!(
            code(ContainerError::AlreadyStarted("c".into())),
            ttrpc::Code::FAILED_PRECONDITION
        );
        assert_eq!(
            code(ContainerError::ProcessNotFound("c/e".into())),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            code(ContainerError::InvalidId(String::new())),
            ttrpc::Code::INVALID_ARGUMENT
        );
    }
}
