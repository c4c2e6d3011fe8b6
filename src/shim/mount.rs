//! `mount(2)` for the shim's mounts that carry filesystem data (containerd's overlay
//! rootfs), onto a target fd that `super::share` opened beneath the pod share, always
//! `nosuid,nodev`; and the parsing of containerd's fstab-style options. Binds go through
//! `super::share::bind_at` (a detached tree whose attributes are set before it is attached).
//!
//! The shim is multithreaded (vCPU threads run the guest), so it never forks to mount, unlike
//! containerd-shim's `mount_rootfs`: a long overlay `lowerdir` list (which must fit one page)
//! is shortened by mounting from a thread that unshared its working directory
//! (`unshare(CLONE_FS)`) and changed into the layers' common parent.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MountError {
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: String,
        target: String,
        source: std::io::Error,
    },
    #[error("overlay options are {0} bytes even relative to the layers' common parent: too many layers for one mount")]
    TooLong(usize),
    #[error("the mount thread panicked (see the shim log)")]
    ThreadPanicked,
    #[error("a path contains a NUL byte: {0:?}")]
    Nul(String),
    #[error("prepare {path}: {source}")]
    Prepare {
        path: String,
        source: std::io::Error,
    },
}

/// One mount(2) call's flags and data, from fstab-style options.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: libc::c_ulong,
    /// Propagation flags, applied by a second call.
    pub propagation: libc::c_ulong,
    pub data: Vec<String>,
}

/// Splits containerd mount options into flags and filesystem data (as mount(8) does).
pub fn parse_options(options: &[String]) -> MountOptions {
    let mut out = MountOptions::default();
    for o in options {
        let (set, clear, prop): (libc::c_ulong, libc::c_ulong, libc::c_ulong) = match o.as_str() {
            "ro" | "rdonly" => (libc::MS_RDONLY, 0, 0),
            "rw" => (0, libc::MS_RDONLY, 0),
            "bind" => (libc::MS_BIND, 0, 0),
            "rbind" => (libc::MS_BIND | libc::MS_REC, 0, 0),
            "nosuid" => (libc::MS_NOSUID, 0, 0),
            "suid" => (0, libc::MS_NOSUID, 0),
            "nodev" => (libc::MS_NODEV, 0, 0),
            "dev" => (0, libc::MS_NODEV, 0),
            "noexec" => (libc::MS_NOEXEC, 0, 0),
            "exec" => (0, libc::MS_NOEXEC, 0),
            "noatime" => (libc::MS_NOATIME, 0, 0),
            "atime" => (0, libc::MS_NOATIME, 0),
            "nodiratime" => (libc::MS_NODIRATIME, 0, 0),
            "relatime" => (libc::MS_RELATIME, 0, 0),
            "strictatime" => (libc::MS_STRICTATIME, 0, 0),
            "sync" => (libc::MS_SYNCHRONOUS, 0, 0),
            "async" => (0, libc::MS_SYNCHRONOUS, 0),
            "remount" => (libc::MS_REMOUNT, 0, 0),
            "private" => (0, 0, libc::MS_PRIVATE),
            "rprivate" => (0, 0, libc::MS_PRIVATE | libc::MS_REC),
            "slave" => (0, 0, libc::MS_SLAVE),
            "rslave" => (0, 0, libc::MS_SLAVE | libc::MS_REC),
            "shared" => (0, 0, libc::MS_SHARED),
            "rshared" => (0, 0, libc::MS_SHARED | libc::MS_REC),
            "unbindable" => (0, 0, libc::MS_UNBINDABLE),
            "runbindable" => (0, 0, libc::MS_UNBINDABLE | libc::MS_REC),
            "defaults" => (0, 0, 0),
            _ => {
                out.data.push(o.clone());
                continue;
            }
        };
        out.flags = (out.flags | set) & !clear;
        out.propagation |= prop;
    }
    out
}

fn cstr(s: &str) -> Result<CString, MountError> {
    CString::new(s).map_err(|_| MountError::Nul(s.to_string()))
}

fn sys_mount(
    source: &str,
    target: &Path,
    name: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), MountError> {
    let err = |source| MountError::Mount {
        fstype: if fstype.is_empty() {
            "bind".into()
        } else {
            fstype.into()
        },
        target: name.display().to_string(),
        source,
    };
    let c_source = cstr(source)?;
    let c_target = cstr(&target.to_string_lossy())?;
    let c_fstype = cstr(fstype)?;
    let c_data = cstr(data)?;
    // SAFETY: every pointer is a valid NUL-terminated string (or null) that outlives the
    // call; mount(2) does not keep them.
    let rc = unsafe {
        libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                c_fstype.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                c_data.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The mount data of an overlay made relative to the layers' common parent directory, or
/// `None` when the paths share no parent worth changing into.
pub fn compact_overlay(data: &[String]) -> Option<(String, Vec<String>)> {
    let dirs: Vec<&str> = data
        .iter()
        .flat_map(|o| match o.split_once('=') {
            Some(("lowerdir", v)) => v.split(':').collect::<Vec<_>>(),
            Some(("upperdir" | "workdir", v)) => vec![v],
            _ => vec![],
        })
        .collect();
    let first = dirs.first()?;
    let mut prefix: &str = first;
    for d in &dirs[1..] {
        while !(d.starts_with(prefix)
            && (d.len() == prefix.len() || d.as_bytes()[prefix.len()] == b'/'))
        {
            prefix = &prefix[..prefix.rfind('/')?];
        }
    }
    // The prefix must be a parent of every dir, not one of them.
    if dirs.iter().any(|d| d.len() == prefix.len()) {
        prefix = &prefix[..prefix.rfind('/')?];
    }
    if prefix.len() <= 1 {
        return None;
    }
    let strip = |p: &str| p[prefix.len() + 1..].to_string();
    let rel = data
        .iter()
        .map(|o| match o.split_once('=') {
            Some(("lowerdir", v)) => {
                format!(
                    "lowerdir={}",
                    v.split(':').map(strip).collect::<Vec<_>>().join(":")
                )
            }
            Some((k @ ("upperdir" | "workdir"), v)) => format!("{k}={}", strip(v)),
            _ => o.clone(),
        })
        .collect();
    Some((prefix.to_string(), rel))
}

/// Page size minus a margin: the kernel copies at most one page of mount data.
const MAX_DATA: usize = 4096 - 512;

/// Mounts `fstype` from `source` with containerd-style `options` onto the directory `target`
/// (an O_PATH fd the caller opened without following symlinks; `name` is for errors),
/// always `nosuid,nodev`, plus `extra` flags (e.g. `MS_RDONLY`). Bind mounts go through
/// [`super::share::bind_at`] instead.
pub fn mount_at(
    fstype: &str,
    source: &str,
    options: &[String],
    extra: libc::c_ulong,
    target: BorrowedFd,
    name: &Path,
) -> Result<(), MountError> {
    let opts = parse_options(options);
    if opts.flags & libc::MS_BIND != 0 {
        return Err(MountError::Mount {
            fstype: fstype.into(),
            target: name.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a bind mount: use share::bind_at",
            ),
        });
    }
    // The kernel resolves this magic link to the very dentry the fd names.
    let proc_target = PathBuf::from(format!("/proc/self/fd/{}", target.as_raw_fd()));
    let flags = (opts.flags & !libc::MS_REMOUNT) | libc::MS_NOSUID | libc::MS_NODEV | extra;
    let data = opts.data.join(",");
    if fstype == "overlay" && data.len() >= MAX_DATA {
        let (dir, rel) = compact_overlay(&opts.data).ok_or(MountError::TooLong(data.len()))?;
        let rel = rel.join(",");
        if rel.len() >= MAX_DATA {
            return Err(MountError::TooLong(rel.len()));
        }
        let source = source.to_string();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare(CLONE_FS) only detaches this thread's cwd/root/umask from
                // the other threads; it takes no pointers.
                if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                    return Err(MountError::Prepare {
                        path: dir.clone(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                std::env::set_current_dir(&dir).map_err(|e| MountError::Prepare {
                    path: dir.clone(),
                    source: e,
                })?;
                sys_mount(&source, &proc_target, name, "overlay", flags, &rel)
            })
            .join()
            .unwrap_or(Err(MountError::ThreadPanicked))
        })?;
    } else {
        sys_mount(source, &proc_target, name, fstype, flags, &data)?;
    }
    if opts.propagation != 0 {
        sys_mount("", &proc_target, name, "", opts.propagation, "")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_flags_and_data() {
        let o = parse_options(&s(&[
            "rbind",
            "ro",
            "nosuid",
            "rprivate",
            "index=off",
            "rw",
        ]));
        assert_eq!(o.flags, libc::MS_BIND | libc::MS_REC | libc::MS_NOSUID);
        assert_eq!(o.propagation, libc::MS_PRIVATE | libc::MS_REC);
        assert_eq!(o.data, s(&["index=off"]));
    }

    #[test]
    fn compacts_overlay_paths_to_their_common_parent() {
        let data = s(&[
            "index=off",
            "workdir=/var/lib/c/snapshots/3/work",
            "upperdir=/var/lib/c/snapshots/3/fs",
            "lowerdir=/var/lib/c/snapshots/2/fs:/var/lib/c/snapshots/1/fs",
        ]);
        let (dir, rel) = compact_overlay(&data).unwrap();
        assert_eq!(dir, "/var/lib/c/snapshots");
        assert_eq!(
            rel,
            s(&[
                "index=off",
                "workdir=3/work",
                "upperdir=3/fs",
                "lowerdir=2/fs:1/fs"
            ])
        );
        // Only the root in common: nothing to gain.
        assert!(compact_overlay(&s(&["lowerdir=/a/x:/b/y"])).is_none());
        // One layer: its parent.
        let (dir, rel) = compact_overlay(&s(&["lowerdir=/a/b/fs"])).unwrap();
        assert_eq!((dir.as_str(), rel), ("/a/b", s(&["lowerdir=fs"])));
    }
}
