//! What the agent does as PID 1 of the pod VM (guest mode), and the host-test mode's
//! private cgroup2 mount.
//!
//! Guest mode: leave the initial rootfs for a bind mount of it (pivot_root, which
//! libcontainer runs for every container, refuses the initial rootfs); mount proc, sys, dev
//! (+ pts, shm), cgroup2, run and tmp; make the console stdio if the kernel gave none; bring
//! up loopback; enable every cgroup v2 controller for the pod cgroup; mark the VMM's boot
//! timer once the listeners are up; on DestroySandbox kill everything, sync and `reboot(RB_AUTOBOOT)` (the
//! guest is booted with `reboot=k`, so the kernel resets through the i8042 and the VMM stops;
//! RB_POWER_OFF would need ACPI, which the VM has not). Reaping is in `reaper`.

use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::cgroup::{is_cgroup2, CGROUP_ROOT};

/// Errors of PID-1 setup.
#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    #[error("mounting {fstype} on {target}: {source}; the guest kernel needs this filesystem")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("bringing up loopback: {0}")]
    Loopback(#[source] nix::Error),
    #[error("moving / to a bind mount of the initramfs: {step}: {source}")]
    RootBind {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("unsharing the mount namespace for the private cgroup2 mount: {0}")]
    Unshare(#[source] nix::Error),
}

struct Mount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// The guest's base mounts, in order.
const MOUNTS: &[Mount] = &[
    Mount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    Mount {
        fstype: "cgroup2",
        target: CGROUP_ROOT,
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        fstype: "tmpfs",
        target: "/run",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
];

fn mount_one(m: &Mount) -> Result<(), Pid1Error> {
    let _ = fs::create_dir_all(m.target);
    match mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data) {
        // Already mounted (e.g. devtmpfs by CONFIG_DEVTMPFS_MOUNT).
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(source) => Err(Pid1Error::Mount {
            fstype: m.fstype,
            target: m.target,
            source,
        }),
    }
}

/// Opens /dev/console as stdin/stdout/stderr if the kernel left them closed (no
/// /dev/console in the initramfs when it started init).
fn console_stdio() {
    // SAFETY: F_GETFD only queries the descriptor flags of fd 2.
    if unsafe { libc::fcntl(2, libc::F_GETFD) } >= 0 {
        return;
    }
    let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors, which are closed; `console` stays
        // valid for the call.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

/// An `IFF_*` interface flag (a C `int` of a low bit) as `ifr_flags`' `short`.
fn short_flag(flag: libc::c_int) -> libc::c_short {
    libc::c_short::try_from(flag).expect("IFF_* flags used here are low bits")
}

/// Sets IFF_UP on `lo` (SIOCGIFFLAGS + SIOCSIFFLAGS).
pub fn loopback_up() -> Result<(), Pid1Error> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(Pid1Error::Loopback)?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: SIOCGIFFLAGS fills `req`, a valid ifreq naming "lo", for the call's duration.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(Pid1Error::Loopback(nix::Error::last()));
    }
    let up_running = short_flag(libc::IFF_UP | libc::IFF_RUNNING);
    // SAFETY: after SIOCGIFFLAGS the union holds the flags member.
    unsafe {
        req.ifr_ifru.ifru_flags |= up_running;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, valid for the call's duration.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(Pid1Error::Loopback(nix::Error::last()));
    }
    Ok(())
}

/// Enables every available controller for children of the cgroup root.
fn enable_controllers() {
    for (controller, err) in crate::cgroup::enable_controllers(Path::new(CGROUP_ROOT)) {
        log::warn!("cannot enable cgroup controller {controller}: {err}");
    }
}

/// Where the initramfs root is bound before it is moved onto `/` (removed afterwards).
const ROOT_BIND: &str = "/.podvisor-root";

/// Makes PID 1's root a bind mount of the initramfs instead of the initial rootfs itself
/// (what `switch_root` does, without copying anything): pivot_root(2) fails with EINVAL
/// when the caller's root is the initial rootfs, which has no parent mount, and every
/// container's init calls it (in its own mount namespace, a copy of this one). Must run
/// before anything else is mounted.
fn root_to_bind_mount() -> Result<(), Pid1Error> {
    let step = |step: &'static str| move |source| Pid1Error::RootBind { step, source };
    match nix::unistd::mkdir(ROOT_BIND, nix::sys::stat::Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::Error::EEXIST) => {}
        Err(err) => return Err(step("mkdir")(err)),
    }
    mount::<str, str, str, str>(Some("/"), ROOT_BIND, None, MsFlags::MS_BIND, None)
        .map_err(step("bind / there"))?;
    nix::unistd::chdir(ROOT_BIND).map_err(step("chdir"))?;
    mount::<str, str, str, str>(Some("."), "/", None, MsFlags::MS_MOVE, None)
        .map_err(step("move onto /"))?;
    nix::unistd::chroot(".").map_err(step("chroot"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    // The mount point is free again, and visible in the new root: drop it.
    let _ = fs::remove_dir(ROOT_BIND);
    Ok(())
}

/// Guest-mode setup. Failures are logged: PID 1 keeps going and serves what it can.
pub fn setup() {
    if let Err(err) = root_to_bind_mount() {
        log::error!("{err}; containers cannot pivot_root");
    }
    for m in MOUNTS {
        if let Err(err) = mount_one(m) {
            log::error!("{err}");
        }
    }
    console_stdio();
    if let Err(err) = loopback_up() {
        log::error!("{err}");
    }
    enable_controllers();
    log::info!("PID 1 setup done");
}

/// Host-test mode: gives the agent its own mount namespace with cgroup v2 on
/// /sys/fs/cgroup (libcontainer and libcgroups look there), when the host has cgroup v1
/// or hybrid there. Must run before any thread is started (unshare of the mount namespace
/// fails in a multi-threaded process).
pub fn private_cgroup2() -> Result<(), Pid1Error> {
    if is_cgroup2(Path::new(CGROUP_ROOT)) {
        return Ok(());
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(Pid1Error::Unshare)?;
    // Nothing mounted from here on propagates to the host.
    mount::<str, str, str, str>(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)
        .map_err(|source| Pid1Error::Mount {
            fstype: "(make-rprivate)",
            target: "/",
            source,
        })?;
    mount_one(&Mount {
        fstype: "cgroup2",
        target: CGROUP_ROOT,
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    })?;
    log::info!("host-test mode: private cgroup2 mounted on {CGROUP_ROOT}");
    Ok(())
}

/// The environment every process gets from the agent's own: GLIBC_TUNABLES (the kernel
/// passes unknown `KEY=VALUE` command-line words to PID 1's environment; PVM hosts need
/// it, see NOTES).
pub fn inherited_env() -> Vec<String> {
    let mut env = Vec::new();
    if let Ok(value) = std::env::var("GLIBC_TUNABLES") {
        log::info!("passing GLIBC_TUNABLES={value} to every process");
        env.push(format!("GLIBC_TUNABLES={value}"));
    }
    env
}

/// Physical address of the VMM's boot timer (Firecracker's convention).
const BOOT_TIMER_ADDR: libc::off_t = 0xc000_0000;
/// The byte a guest writes to the boot timer when its init is ready.
const BOOT_TIMER_READY: u8 = 123;

/// Tells the VMM that the agent is ready (its listeners are up): writes 123 to the boot
/// timer at physical 0xc0000000 through a /dev/mem mapping, as `devmem 0xc0000000 8 123`
/// does. The VMM times "guest time to init" to this write. Failures are logged only.
pub fn mark_boot_timer() {
    let mem = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open("/dev/mem")
    {
        Ok(mem) => mem,
        Err(err) => {
            log::warn!("boot timer: cannot open /dev/mem: {err}");
            return;
        }
    };
    // SAFETY: a new shared mapping of one page of /dev/mem at the boot timer's address;
    // nothing else refers to it, and it is unmapped below.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            BOOT_TIMER_ADDR,
        )
    };
    if page == libc::MAP_FAILED {
        log::warn!(
            "boot timer: cannot map /dev/mem at {BOOT_TIMER_ADDR:#x}: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: `page` is a valid writable mapping of at least one byte; the write is a
    // single-byte MMIO store (volatile, so it is neither elided nor merged).
    unsafe {
        std::ptr::write_volatile(page.cast::<u8>(), BOOT_TIMER_READY);
        libc::munmap(page, 4096);
    }
}

/// Kills every process, syncs, and resets the VM. Never returns.
pub fn reboot() -> ! {
    log::info!("killing all processes, syncing, rebooting (the VMM stops on the reset)");
    // SAFETY: kill(-1) signals every process but ourselves; no memory is involved.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    log::error!("reboot failed: {err:?}; halting here");
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lo_flags() -> libc::c_short {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
        let sock = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        // SAFETY: as in loopback_up: a zeroed ifreq naming "lo", valid for the call.
        unsafe {
            let mut req: libc::ifreq = std::mem::zeroed();
            req.ifr_name[0] = libc::c_char::from_ne_bytes([b'l']);
            req.ifr_name[1] = libc::c_char::from_ne_bytes([b'o']);
            assert!(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) >= 0);
            req.ifr_ifru.ifru_flags
        }
    }

    #[test]
    fn loopback_comes_up_in_a_new_network_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP loopback test: needs root for a new network namespace");
            return;
        }
        // The network namespace is per thread: this one's dies with it.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            assert_eq!(lo_flags() & short_flag(libc::IFF_UP), 0);
            loopback_up().unwrap();
            assert_ne!(lo_flags() & short_flag(libc::IFF_UP), 0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn guest_env_takes_glibc_tunables() {
        // The test runner's environment decides; only check the shape.
        for entry in inherited_env() {
            assert!(entry.starts_with("GLIBC_TUNABLES="));
        }
    }
}
