//! Confinement of the threads that handle guest-driven data: a seccomp filter per kind of
//! thread, `no_new_privs`, and the capabilities each kind does not need dropped.
//!
//! The guest is hostile and controls every byte it hands a device. A bug in code that parses
//! those bytes must not give the guest the shim process, which runs as root and holds
//! containerd's socket. So each thread that runs such code confines itself before it reads
//! anything from the guest, the way Firecracker does (one filter per thread kind):
//!
//! | kind | runs | may (beyond the [`base`] set) |
//! | --- | --- | --- |
//! | vCPU (`vcpuN`, filter in `vmm`) | KVM_RUN, MMIO/PIO handlers | the KVM vCPU ioctls it uses |
//! | event loop (`vmm-events`) | serial, vsock, net, queue kicks | epoll, socket I/O, connect to the vsock UDS |
//! | block worker (`blk-io`) | virtio-blk requests | positional I/O, sync, fallocate |
//! | virtio-fs worker (`fs-<tag>`) | FUSE requests | the file operations of a passthrough file system |
//!
//! Rules:
//! - A filter only narrows: it is installed by the thread itself, and every thread it
//!   creates inherits it. So confined threads never create threads: a device activated from
//!   a vCPU thread starts its worker through [`spawn`], which hands the spawn to an
//!   unconfined thread the VMM started ([`start_spawner`]) before any guest code ran.
//! - Capabilities are per thread: vCPU, event-loop and block threads keep none; the
//!   virtio-fs worker keeps the ones a passthrough file system needs for the guest's file
//!   ownership and modes (CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, FSETID, MKNOD,
//!   SETUID, SETGID, SETFCAP).
//! - [`Mode::Enforce`] (the default): a syscall outside the filter raises SIGSYS; the
//!   process writes the thread and syscall number to stderr and dies of SIGSYS. `Log` lets
//!   it through and the kernel's audit log records it (for finding what a new code path
//!   needs); `Off` installs nothing. The mode is the VM's setting ([`set_mode`]).

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a thread's filter does with a syscall it does not allow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// SIGSYS: the process reports the syscall and dies.
    #[default]
    Enforce,
    /// Allowed and recorded by the kernel's audit log.
    Log,
    /// No filter (and no capability dropping).
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!("seccomp mode {other:?}: use enforce, log or off")),
        }
    }
}

/// Why a thread could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("building the {kind} seccomp filter: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind} seccomp filter: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("blocking the {kind} thread's signals: {source}")]
    Signals {
        kind: &'static str,
        source: std::io::Error,
    },
    #[error("dropping the {kind} thread's capabilities: {source}")]
    Caps {
        kind: &'static str,
        source: std::io::Error,
    },
}

static MODE: OnceLock<Mode> = OnceLock::new();

/// Sets the process's confinement mode (one VM per process: the first setting wins).
pub fn set_mode(mode: Mode) {
    if MODE.set(mode).is_err() && MODE.get() != Some(&mode) {
        log::warn!(
            "seccomp mode {mode:?} ignored: this process already runs in {:?}",
            MODE.get()
        );
    }
}

/// The process's confinement mode.
pub fn mode() -> Mode {
    MODE.get().copied().unwrap_or_default()
}

/// Syscall rules: number → conditions (an empty list allows it unconditionally).
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Allows each of `syscalls` unconditionally.
pub fn allow(rules: &mut Rules, syscalls: &[libc::c_long]) {
    for s in syscalls {
        rules.insert(*s, Vec::new());
    }
}

/// Allows `syscall` only when its argument `arg` is one of `values`.
pub fn allow_arg(rules: &mut Rules, syscall: libc::c_long, arg: u8, values: &[u64]) {
    let entry = rules.entry(syscall).or_default();
    for v in values {
        let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *v)
            .expect("a valid argument index");
        entry.push(SeccompRule::new(vec![cond]).expect("one condition"));
    }
}

/// What every confined thread needs: the Rust runtime (memory, futexes, thread exit,
/// signals), time, logging to an already open fd, and closing fds.
pub fn base() -> Rules {
    let mut r = Rules::new();
    // The SIGSYS report reads the thread's name.
    allow_arg(&mut r, libc::SYS_prctl, 0, &[libc::PR_GET_NAME as u64]);
    allow(
        &mut r,
        &[
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_tgkill,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_getrandom,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
        ],
    );
    r
}

/// Device code on the event loop: epoll, eventfds and timerfds, the tap, and the hybrid
/// vsock's Unix sockets (connects to `<uds>_<port>`, accepts on `<uds>`).
pub fn event_loop_rules() -> Rules {
    let mut r = base();
    allow(
        &mut r,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_shutdown,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_getsockopt,
            libc::SYS_fcntl,
            libc::SYS_dup,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
        ],
    );
    allow_arg(&mut r, libc::SYS_ioctl, 1, &tap_and_fd_ioctls());
    r
}

/// ioctls device code issues on fds it owns: non-blocking mode and the tap's offloads.
pub fn tap_and_fd_ioctls() -> Vec<u64> {
    [
        libc::FIONBIO,
        libc::FIOCLEX,
        libc::TUNSETOFFLOAD,
        libc::TUNSETVNETHDRSZ,
    ]
    .to_vec()
}

/// Reading, writing and syncing a file the thread already holds open.
const FILE_IO: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
];

/// The block worker: positional I/O on the open disk file.
pub fn block_rules() -> Rules {
    let mut r = base();
    allow(&mut r, FILE_IO);
    r
}

/// The virtio-fs worker: what a passthrough file system does for FUSE requests, relative
/// to the fds it holds (never a path from the root of the host).
pub fn fs_rules() -> Rules {
    let mut r = base();
    allow(&mut r, FILE_IO);
    allow(
        &mut r,
        &[
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_open_by_handle_at,
            libc::SYS_name_to_handle_at,
            libc::SYS_dup,
            libc::SYS_dup3,
            libc::SYS_fcntl,
            libc::SYS_flock,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_fstatfs,
            libc::SYS_statfs,
            libc::SYS_getdents64,
            libc::SYS_mkdirat,
            libc::SYS_mknodat,
            libc::SYS_symlinkat,
            libc::SYS_linkat,
            libc::SYS_unlinkat,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_readlinkat,
            libc::SYS_fchmod,
            libc::SYS_fchmodat,
            libc::SYS_fchown,
            libc::SYS_fchownat,
            libc::SYS_utimensat,
            libc::SYS_ftruncate,
            libc::SYS_copy_file_range,
            libc::SYS_getxattr,
            libc::SYS_lgetxattr,
            libc::SYS_fgetxattr,
            libc::SYS_setxattr,
            libc::SYS_lsetxattr,
            libc::SYS_fsetxattr,
            libc::SYS_listxattr,
            libc::SYS_llistxattr,
            libc::SYS_flistxattr,
            libc::SYS_removexattr,
            libc::SYS_lremovexattr,
            libc::SYS_fremovexattr,
            libc::SYS_umask,
            libc::SYS_setresuid,
            libc::SYS_setresgid,
            libc::SYS_getuid,
            libc::SYS_getgid,
            libc::SYS_geteuid,
            libc::SYS_getegid,
            libc::SYS_capget,
            libc::SYS_capset,
        ],
    );
    allow_arg(&mut r, libc::SYS_ioctl, 1, &[libc::FIONBIO, libc::FIOCLEX]);
    r
}

/// The capabilities the virtio-fs worker keeps.
const FS_CAPS: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    2,  // CAP_DAC_READ_SEARCH
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    27, // CAP_MKNOD
    31, // CAP_SETFCAP
];

/// The kinds of confined thread whose filters this crate defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    EventLoop,
    Block,
    Fs,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::EventLoop => "event loop",
            Kind::Block => "block worker",
            Kind::Fs => "virtio-fs worker",
        }
    }
}

/// Confines the calling thread as `kind` (in the process's [`mode`]).
pub fn confine(kind: Kind) -> Result<(), ConfineError> {
    let (rules, caps) = match kind {
        Kind::EventLoop => (event_loop_rules(), &[][..]),
        Kind::Block => (block_rules(), &[][..]),
        Kind::Fs => (fs_rules(), FS_CAPS),
    };
    confine_with(kind.name(), rules, caps, &[])
}

/// Confines the calling thread: blocks every signal but faults, SIGSYS and `signals`, keeps
/// only `caps`, then installs `rules` as its filter. The thread should be named already
/// (the SIGSYS report names it).
///
/// Why the signals: the process's signal handlers (containerd-shim's, for one, which
/// writes each signal to a socket) would run on whichever thread the kernel picks, and a
/// handler's syscalls are not a confined thread's; blocked here, process-directed signals
/// go to the unconfined threads, and a write to a closed pipe returns EPIPE instead.
pub fn confine_with(
    kind: &'static str,
    rules: Rules,
    caps: &[u32],
    signals: &[libc::c_int],
) -> Result<(), ConfineError> {
    let mode = mode();
    if mode == Mode::Off {
        return Ok(());
    }
    block_signals_but(signals).map_err(|source| ConfineError::Signals { kind, source })?;
    keep_caps(caps).map_err(|source| ConfineError::Caps { kind, source })?;
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => {
            install_sigsys_report();
            SeccompAction::Trap
        }
    };
    let prog: BpfProgram = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch())
        .and_then(TryInto::try_into)
        .map_err(|source| ConfineError::Build { kind, source })?;
    seccompiler::apply_filter(&prog).map_err(|source| ConfineError::Install { kind, source })
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
}

/// Blocks every signal in the calling thread but the synchronous fault signals, SIGSYS and
/// `keep`.
fn block_signals_but(keep: &[libc::c_int]) -> std::io::Result<()> {
    const FAULTS: [libc::c_int; 6] = [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGTRAP,
        libc::SIGSYS,
    ];
    // SAFETY: sigset_t is plain data; the sigset functions only write the set we own, and
    // pthread_sigmask reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for s in FAULTS.iter().chain(keep) {
            libc::sigdelset(&mut set, *s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

/// Sets the calling thread's effective, permitted and inheritable capabilities to `caps`.
fn keep_caps(caps: &[u32]) -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut data = [Data::default(); 2];
    for c in caps {
        let (word, bit) = ((*c / 32) as usize, 1u32 << (c % 32));
        data[word].effective |= bit;
        data[word].permitted |= bit;
    }
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads a header and two data structs of the v3 layout, which these
    // are; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Installs (once) the SIGSYS handler that reports a forbidden syscall and ends the
/// process with SIGSYS.
fn install_sigsys_report() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is valid; the handler only makes async-signal-safe
        // calls; SA_RESETHAND restores the default action for the final re-raise.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = sigsys_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
        }
    });
}

/// Formats `n` in decimal into `buf`, returning the digits.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // siginfo's SIGSYS fields: after signo, errno, code (3 ints + padding) come the call
    // address (a pointer) and then the syscall number (an int).
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let nr = unsafe {
        *(info as *const u8)
            .add(16 + std::mem::size_of::<usize>())
            .cast::<i32>()
    };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    let mut digits = [0u8; 20];
    let parts: [&[u8]; 5] = [
        b"podvisor: seccomp: thread '",
        &name[..name_len],
        b"' made forbidden syscall ",
        decimal(u64::try_from(nr).unwrap_or(0), &mut digits),
        b"; ending the process with SIGSYS\n",
    ];
    for p in parts {
        // SAFETY: write(2) of a valid buffer to stderr; async-signal-safe.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
    // SAFETY: the handler was reset to the default action (SA_RESETHAND) and SIGSYS is not
    // blocked (SA_NODEFER): this ends the process with SIGSYS.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        )
    };
}

/// A thread body handed to the spawner.
type Body = Box<dyn FnOnce() + Send>;
/// A spawn request: name, body, where to send the handle.
type Request = (String, Body, mpsc::Sender<std::io::Result<JoinHandle<()>>>);

static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();

/// Starts the unconfined thread that spawns device workers for confined threads. Call it
/// before any thread is confined (the VMM does, when it builds the VM); later calls do
/// nothing.
pub fn start_spawner() -> std::io::Result<()> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            for (name, body, reply) in rx {
                let _ = reply.send(std::thread::Builder::new().name(name).spawn(body));
            }
        })?;
    let _ = SPAWNER.set(Mutex::new(tx));
    Ok(())
}

/// Spawns a thread named `name` running `body` (which confines itself first), from the
/// spawner thread when there is one (the caller may be confined), else from here.
pub fn spawn(
    name: String,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let Some(spawner) = SPAWNER.get() else {
        return std::thread::Builder::new().name(name).spawn(body);
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((name, Box::new(body), reply_tx))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// For tests of a filter (here and in the VMM): opens the calling thread's status file (do
/// it before confining the thread).
#[doc(hidden)]
pub fn open_thread_status() -> std::fs::File {
    std::fs::File::open("/proc/thread-self/status").expect("open /proc/thread-self/status")
}

/// For tests of a filter: the `Seccomp:` and `NoNewPrivs:` values in `status` (from
/// [`open_thread_status`]), read with plain `read(2)`, which every filter allows.
#[doc(hidden)]
pub fn thread_status(status: &std::fs::File) -> (String, String) {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 8192];
    // SAFETY: read(2) into a buffer of the length given.
    let n = unsafe { libc::read(status.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(usize::try_from(n).unwrap_or(0));
    let status = String::from_utf8_lossy(&buf);
    (
        status_field(&status, "Seccomp:"),
        status_field(&status, "NoNewPrivs:"),
    )
}

/// For tests of a filter: the value of field `name` (with its colon) in a
/// `/proc/.../status` text, empty when absent.
#[doc(hidden)]
pub fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// For tests of a filter: re-runs the calling test binary's test `test` with `CHILD_ENV`
/// set to `kind`, and returns how the child ended and its stderr.
#[doc(hidden)]
pub fn run_child(test: &str, kind: &str) -> (std::process::ExitStatus, String) {
    let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, kind)
        .output()
        .expect("run the child test");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The variable [`run_child`] sets for the child.
#[doc(hidden)]
pub const CHILD_ENV: &str = "PODVISOR_CONFINE_CHILD";

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::mpsc;

    /// The child half: confine a named thread as `kind`, check its status, then make a
    /// syscall no filter allows.
    #[test]
    fn confined_child() {
        let Ok(kind) = std::env::var(CHILD_ENV) else {
            return;
        };
        let kind = match kind.as_str() {
            "event" => Kind::EventLoop,
            "block" => Kind::Block,
            _ => Kind::Fs,
        };
        std::thread::Builder::new()
            .name(format!("confined-{kind:?}"))
            .spawn(move || {
                let status = open_thread_status();
                confine(kind).unwrap();
                let (seccomp, nnp) = thread_status(&status);
                eprintln!("status: Seccomp {seccomp} NoNewPrivs {nnp}");
                // SAFETY: mount with null arguments; the filter stops it first.
                unsafe { libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0) };
                eprintln!("still alive after a forbidden syscall");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// A handler that makes a syscall no filter allows (as containerd-shim's handlers send
    /// on a socket).
    extern "C" fn forbidden_handler(_: libc::c_int) {
        // SAFETY: mount with null arguments: only its syscall number matters here.
        unsafe { libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0) };
    }

    /// The child half: a confined thread, a signal with that handler sent to it.
    #[test]
    fn signalled_child() {
        if std::env::var(CHILD_ENV).as_deref() != Ok("signal") {
            return;
        }
        // SAFETY: installing a handler for SIGUSR1 (not used otherwise here).
        unsafe { libc::signal(libc::SIGUSR1, forbidden_handler as *const () as usize) };
        let (tx, rx) = mpsc::channel();
        let confined = std::thread::Builder::new()
            .name("confined-sig".into())
            .spawn(move || {
                confine(Kind::Block).unwrap();
                let _ = rx.recv();
            })
            .unwrap();
        // Directed at the confined thread (as SIGPIPE is at the thread whose write hit a
        // closed pipe): blocked there, it stays pending instead of running the handler.
        std::thread::sleep(std::time::Duration::from_millis(100));
        // SAFETY: the thread is alive (it waits on the channel); pthread_kill only signals.
        unsafe {
            libc::pthread_kill(
                std::os::unix::thread::JoinHandleExt::as_pthread_t(&confined),
                libc::SIGUSR1,
            )
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        eprintln!("alive after the signal");
        let _ = tx.send(());
        confined.join().unwrap();
    }

    #[test]
    fn signal_handlers_never_run_on_a_confined_thread() {
        if std::env::var(CHILD_ENV).is_ok() {
            return;
        }
        let (status, stderr) = run_child("confine::tests::signalled_child", "signal");
        assert!(stderr.contains("alive after the signal"), "{stderr}");
        assert!(status.success(), "{status:?}: {stderr}");
    }

    #[test]
    fn a_forbidden_syscall_of_each_kind_of_thread_ends_in_sigsys() {
        if std::env::var(CHILD_ENV).is_ok() {
            return;
        }
        for kind in ["event", "block", "fs"] {
            let (status, stderr) = run_child("confine::tests::confined_child", kind);
            assert!(
                stderr.contains("status: Seccomp 2 NoNewPrivs 1"),
                "{kind}: {stderr}"
            );
            assert_eq!(status.signal(), Some(libc::SIGSYS), "{kind}: {stderr}");
            assert!(
                stderr.contains(&format!(
                    "made forbidden syscall {}; ending the process with SIGSYS",
                    libc::SYS_mount
                )),
                "{kind}: {stderr}"
            );
            assert!(!stderr.contains("still alive"), "{kind}: {stderr}");
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("enforce".parse::<Mode>().unwrap(), Mode::Enforce);
        assert_eq!("log".parse::<Mode>().unwrap(), Mode::Log);
        assert_eq!("off".parse::<Mode>().unwrap(), Mode::Off);
        assert!("on".parse::<Mode>().is_err());
    }

    #[test]
    fn decimal_formats() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(165, &mut b), b"165");
        assert_eq!(decimal(u64::MAX, &mut b), b"18446744073709551615");
    }

    #[test]
    fn every_filter_builds() {
        for rules in [event_loop_rules(), block_rules(), fs_rules()] {
            let prog: Result<BpfProgram, _> =
                SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch())
                    .and_then(TryInto::try_into);
            assert!(prog.is_ok());
        }
    }
}
