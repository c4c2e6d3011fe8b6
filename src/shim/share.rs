//! The pod's share on the host: the tree the guest reaches through virtio-fs, laid out so
//! that the guest can steer none of the host path operations the shim performs in it.
//!
//! The guest is hostile: guest root can mount the pod's virtio-fs tag and send any FUSE
//! request for any path of the share, at any moment, including while the shim is mounting
//! or removing something there. The layout below `<pod>` (`<run_dir>/<pod id>`, 0700):
//!
//! ```text
//! skel/                      host only (0700): the directories and placeholder files the
//!                            shim creates; never exposed, never holds a mount
//! shared/                    a bind of skel/: read-only, nosuid, nodev, private;
//!                            the virtio-fs root
//! shared/<cid>/rootfs        the container's rootfs (containerd's overlay or bind)
//! shared/<cid>/mounts/<n>    the spec's host binds (volumes, /etc/hosts, ...)
//! ```
//!
//! Rules this module enforces:
//! 1. **The guest writes only inside the leaf mounts.** Every create, rename, unlink,
//!    symlink, link, chmod or xattr change it sends for the skeleton fails with EROFS in the
//!    host kernel (the `shared/` mount is read-only), so the skeleton never changes under
//!    the shim. Leaf mounts are `nosuid,nodev` on the host; read-only ones (`ro` binds,
//!    recursively for `rbind`; the rootfs when the spec's `root.readonly` is set) are
//!    read-only on the host too, so the guest's FUSE writes get EROFS as well.
//! 2. **The skeleton is made only through `skel/`**, fd-relative (`mkdirat`, `openat` with
//!    `O_EXCL`), beneath a directory fd the shim opened itself; names are single path
//!    components.
//! 3. **Mounts go onto a target opened beneath `shared/`** with `openat2(RESOLVE_BENEATH |
//!    RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`: binds as a detached tree (`open_tree`) whose
//!    attributes are set before it is attached (`mount_setattr`; a read-only volume is never
//!    writable, not even for a moment) and moved onto that fd (`move_mount`); filesystems
//!    with mount data (overlay) by `mount(2)` onto `/proc/self/fd/<target>`.
//! 4. **Removal never crosses a mount.** Mounts exist only on the `shared/` view; the shim
//!    removes through `skel/`, where no lookup enters them and `rmdir` of a dentry mounted
//!    anywhere fails with EBUSY. Every removal here also compares mount ids and stops at a
//!    mount point with [`ShareError::MountRemains`]: a mount that could not be detached
//!    leaves the tree (and the volume's data) in place, never a recursive delete inside it.
//! 5. **Unmounts by name** cover only paths in `shared/` (the skeleton, which the guest
//!    cannot rename), deepest first, with `UMOUNT_NOFOLLOW`.
//!
//! Why a read-only view of a host-only skeleton rather than fd-relative operations alone
//! in a guest-writable tree (both were considered): with the guest unable to change any
//! directory the shim walks, no check can be raced, and the same holds for code that is
//! not in this module (the virtio-fs server, `shim delete` in another process, an
//! operator's `rm -rf`). Kata runtime-rs makes the same split (a host-only `rw/` dir shown
//! to the guest through a read-only bind); here no mount propagation is involved: mounts
//! are attached to the read-only view directly, which is what keeps them out of `skel/`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxFlags, CWD};
use rustix::mount::{MoveMountFlags, OpenTreeFlags};
use thiserror::Error;

use super::mount::{mount_at, parse_options};

/// Depth at which a removal gives up: the skeleton is three levels deep, a pod dir four.
const MAX_DEPTH: usize = 16;

#[derive(Debug, Error)]
pub enum ShareError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("{0:?} is not a single path component: container ids and share names must be")]
    BadName(String),
    #[error(
        "{0} is still a mount point: it was left in place (with everything below it) rather \
         than deleting through a mount; unmount it (`umount -l`) and remove it by hand"
    )]
    MountRemains(String),
    #[error("{0}: deeper than {MAX_DEPTH} levels, which the shim never creates; left in place")]
    TooDeep(String),
    #[error(transparent)]
    Mount(#[from] super::mount::MountError),
    #[error("the pod is being torn down")]
    TornDown,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ShareError + 'a {
    move |source| ShareError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn errno<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(rustix::io::Errno) -> ShareError + 'a {
    move |e| io_err(what, path)(e.into())
}

/// `name` as one path component (no `/`, not `.` or `..`, not empty, no NUL).
fn component(name: &str) -> Result<&str, ShareError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(ShareError::BadName(name.to_string()));
    }
    Ok(name)
}

/// Opens `rel` beneath `dir` without following any symlink or crossing any mount.
fn open_beneath(dir: BorrowedFd, rel: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat2(
        dir,
        rel,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
    )
}

/// The id of the mount `name` (relative to `dir`, or `dir` itself when empty) is on.
fn mount_id(dir: BorrowedFd, name: &str) -> rustix::io::Result<u64> {
    let flags = if name.is_empty() {
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW
    } else {
        AtFlags::SYMLINK_NOFOLLOW
    };
    Ok(rustix::fs::statx(dir, name, flags, StatxFlags::MNT_ID | StatxFlags::TYPE)?.stx_mnt_id)
}

/// One of containerd's rootfs mounts.
#[derive(Debug, Clone)]
pub struct RootfsMount {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The pod's share: the host-only skeleton and the guest's read-only view of it.
#[derive(Debug)]
pub struct PodShare {
    /// `<pod>`.
    root: PathBuf,
    /// `<pod>/skel`, opened by the shim.
    skel: OwnedFd,
    /// The root of the `<pod>/shared` mount (O_PATH).
    view: OwnedFd,
}

impl PodShare {
    /// `<pod>/skel`.
    pub fn skel_dir(root: &Path) -> PathBuf {
        root.join("skel")
    }

    /// `<pod>/shared`: the virtio-fs root.
    pub fn view_dir(root: &Path) -> PathBuf {
        root.join("shared")
    }

    /// Creates the share under the pod dir `root` (which must exist, owned by the shim):
    /// `skel/` and the read-only view `shared/` of it.
    pub fn create(root: &Path) -> Result<PodShare, ShareError> {
        let skel_path = Self::skel_dir(root);
        let view_path = Self::view_dir(root);
        for dir in [&skel_path, &view_path] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io_err("create", dir))?;
        }
        let root_fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(errno("open", root))?;
        let skel = open_beneath(root_fd.as_fd(), "skel", OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(errno("open", &skel_path))?;
        let target = open_beneath(root_fd.as_fd(), "shared", OFlags::PATH | OFlags::DIRECTORY)
            .map_err(errno("open", &view_path))?;
        // The view: a detached copy of skel/, read-only before anyone can see it.
        let tree = rustix::mount::open_tree(
            skel.as_fd(),
            "",
            OpenTreeFlags::OPEN_TREE_CLONE
                | OpenTreeFlags::OPEN_TREE_CLOEXEC
                | OpenTreeFlags::AT_EMPTY_PATH,
        )
        .map_err(errno("open_tree", &skel_path))?;
        set_attrs(tree.as_fd(), true, false, false).map_err(io_err("mount_setattr", &view_path))?;
        rustix::mount::move_mount(
            tree.as_fd(),
            "",
            target.as_fd(),
            "",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )
        .map_err(errno("move_mount onto", &view_path))?;
        // Attached under a shared parent, the view joined a peer group: make it private, so
        // the mounts below it stay in this mount namespace.
        // (The pod dir is host-only: this lookup crosses into the new mount on purpose.)
        let view = rustix::fs::openat(
            root_fd.as_fd(),
            "shared",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno("open", &view_path))?;
        set_attrs(view.as_fd(), false, false, false)
            .map_err(io_err("mount_setattr", &view_path))?;
        if mount_id(view.as_fd(), "").ok() == mount_id(root_fd.as_fd(), "").ok() {
            return Err(ShareError::MountRemains(format!(
                "{} did not become a mount",
                view_path.display()
            )));
        }
        Ok(PodShare {
            root: root.to_path_buf(),
            skel,
            view,
        })
    }

    /// `<pod>/shared/<cid>` as the host names it.
    pub fn container_view(&self, cid: &str) -> PathBuf {
        Self::view_dir(&self.root).join(cid)
    }

    /// Creates `<cid>/rootfs` and `<cid>/mounts/` in the skeleton.
    pub fn add_container(&self, cid: &str) -> Result<(), ShareError> {
        let cid = component(cid)?;
        let path = Self::skel_dir(&self.root).join(cid);
        for rel in [
            cid.to_string(),
            format!("{cid}/rootfs"),
            format!("{cid}/mounts"),
        ] {
            let parent = match rel.rsplit_once('/') {
                Some((p, _)) => {
                    open_beneath(self.skel.as_fd(), p, OFlags::RDONLY | OFlags::DIRECTORY)
                        .map_err(errno("open", &path))?
                }
                None => self.skel.try_clone().map_err(io_err("dup", &path))?,
            };
            let name = rel.rsplit('/').next().unwrap_or(&rel);
            rustix::fs::mkdirat(parent.as_fd(), name, Mode::from_raw_mode(0o755))
                .map_err(errno("create", &Self::skel_dir(&self.root).join(&rel)))?;
        }
        Ok(())
    }

    /// Mounts containerd's rootfs `mounts` (in order) at `<cid>/rootfs`, or binds
    /// `bundle_rootfs` when there are none. A `readonly` rootfs becomes read-only on the
    /// host once the `mountpoints` (container paths; `true` for a directory) the guest will
    /// mount on exist in it: the guest cannot make them in a read-only tree. Until then the
    /// guest could write this container's own rootfs, as it can any writable one.
    pub fn mount_rootfs(
        &self,
        cid: &str,
        mounts: &[RootfsMount],
        bundle_rootfs: &Path,
        readonly: bool,
        mountpoints: &[(String, bool)],
    ) -> Result<(), ShareError> {
        let rel = format!("{}/rootfs", component(cid)?);
        let name = self.container_view(cid).join("rootfs");
        let target = self.target(&rel, &name)?;
        if mounts.is_empty() {
            bind_at(bundle_rootfs, true, false, false, target.as_fd(), &name)?;
        }
        for m in mounts {
            let opts = parse_options(&m.options);
            if opts.flags & libc::MS_BIND != 0 {
                bind_at(
                    Path::new(&m.source),
                    opts.flags & libc::MS_REC != 0,
                    opts.flags & libc::MS_RDONLY != 0,
                    false,
                    target.as_fd(),
                    &name,
                )?;
            } else {
                mount_at(&m.fstype, &m.source, &m.options, 0, target.as_fd(), &name)?;
            }
        }
        if readonly {
            // The mounted rootfs (the skeleton above it is host-only: crossing is intended).
            let root = rustix::fs::openat(
                self.view.as_fd(),
                rel.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno("open", &name))?;
            make_mountpoints(root.as_fd(), mountpoints, &name);
            set_attrs(root.as_fd(), true, true, false).map_err(io_err("mount_setattr", &name))?;
        }
        Ok(())
    }

    /// Binds host `source` (recursively for `rbind`) at `<cid>/mounts/<n>`, read-only on the
    /// host when `readonly`, receiving the host's later mounts below `source` when
    /// `follow_host` (HostToContainer propagation); a placeholder of the source's kind is
    /// made in the skeleton first.
    pub fn bind(
        &self,
        cid: &str,
        n: usize,
        source: &Path,
        recursive: bool,
        readonly: bool,
        follow_host: bool,
    ) -> Result<(), ShareError> {
        let cid = component(cid)?;
        let rel = format!("{cid}/mounts/{n}");
        let name = self.container_view(cid).join("mounts").join(n.to_string());
        let meta = std::fs::metadata(source).map_err(io_err("bind source", source))?;
        let mounts = open_beneath(
            self.skel.as_fd(),
            &format!("{cid}/mounts"),
            OFlags::RDONLY | OFlags::DIRECTORY,
        )
        .map_err(errno("open", &name))?;
        let leaf = n.to_string();
        if meta.is_dir() {
            rustix::fs::mkdirat(mounts.as_fd(), leaf.as_str(), Mode::from_raw_mode(0o755))
                .map_err(errno("create", &name))?;
        } else {
            rustix::fs::openat(
                mounts.as_fd(),
                leaf.as_str(),
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::from_raw_mode(0o644),
            )
            .map_err(errno("create", &name))?;
        }
        let target = self.target(&rel, &name)?;
        bind_at(
            source,
            recursive,
            readonly,
            follow_host,
            target.as_fd(),
            &name,
        )
    }

    /// An O_PATH fd of `rel` in the view, where a mount goes.
    fn target(&self, rel: &str, name: &Path) -> Result<OwnedFd, ShareError> {
        open_beneath(self.view.as_fd(), rel, OFlags::PATH).map_err(errno("open mount target", name))
    }

    /// Unmounts everything of container `cid` and removes its skeleton.
    pub fn remove_container(&self, cid: &str) -> Result<(), ShareError> {
        let cid = component(cid)?;
        unmount_below(&self.container_view(cid));
        remove_entry(
            self.skel.as_fd(),
            cid,
            &Self::skel_dir(&self.root).join(cid),
        )
    }
}

/// Creates each of `points` (absolute container paths; `true` for a directory) below the
/// rootfs `root` where it is missing, never through a symlink or into another mount. A
/// point that cannot be made (a symlink on its way, a file where a directory belongs) is
/// left to the guest, which resolves it inside the container.
fn make_mountpoints(root: BorrowedFd, points: &[(String, bool)], name: &Path) {
    for (dest, is_dir) in points {
        let parts: Vec<&str> = dest
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        if parts.is_empty() || parts.contains(&"..") {
            continue;
        }
        let mut dir = match rustix::fs::openat(
            root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(_) => return,
        };
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let made = if last && !is_dir {
                rustix::fs::openat(
                    dir.as_fd(),
                    *part,
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o644),
                )
                .map(drop)
            } else {
                rustix::fs::mkdirat(dir.as_fd(), *part, Mode::from_raw_mode(0o755))
            };
            if let Err(e) = made.or_else(|e| match e {
                rustix::io::Errno::EXIST => Ok(()),
                e => Err(e),
            }) {
                log::debug!("mount point {dest} in {}: {e}", name.display());
                break;
            }
            if last {
                break;
            }
            match open_beneath(dir.as_fd(), part, OFlags::RDONLY | OFlags::DIRECTORY) {
                Ok(next) => dir = next,
                Err(e) => {
                    log::debug!("mount point {dest} in {}: {part}: {e}", name.display());
                    break;
                }
            }
        }
    }
}

/// `mount_setattr` on the mount `fd` (recursively when `recursive`): nosuid, nodev, private
/// (or, when `follow_host`, a slave of the source's peer group: mounts the host makes below
/// the source appear in the share too), and read-only when `readonly`.
fn set_attrs(fd: BorrowedFd, readonly: bool, recursive: bool, follow_host: bool) -> io::Result<()> {
    /// `struct mount_attr` (linux/mount.h).
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | if readonly { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: if follow_host {
            libc::MS_SLAVE
        } else {
            libc::MS_PRIVATE
        },
        userns_fd: 0,
    };
    let flags = libc::AT_EMPTY_PATH | if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: `fd` is a live descriptor, the path is an empty C string, and `attr` is a
    // `struct mount_attr` of the size passed; the kernel only reads them during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Binds host `source` onto `target`: a detached copy (of the whole tree when `recursive`)
/// made nosuid, nodev, private (a slave of the source when `follow_host`) and, when
/// `readonly`, read-only before it is attached.
pub fn bind_at(
    source: &Path,
    recursive: bool,
    readonly: bool,
    follow_host: bool,
    target: BorrowedFd,
    name: &Path,
) -> Result<(), ShareError> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree =
        rustix::mount::open_tree(CWD, source, flags).map_err(errno("bind source", source))?;
    set_attrs(tree.as_fd(), readonly, recursive, follow_host)
        .map_err(io_err("mount_setattr", name))?;
    rustix::mount::move_mount(
        tree.as_fd(),
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(errno("bind onto", name))
}

/// The mount points at or below `dir` (`/proc/self/mountinfo`, unescaped), in mount order.
/// One scanner for the shim, its tests and the benches.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let prefix = dir.to_string_lossy().into_owned();
    mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|t| t == &prefix || t.starts_with(&format!("{prefix}/")))
        .collect()
}

/// Unmounts every mount at or below `dir` (deepest first; lazily when busy), by name with
/// `UMOUNT_NOFOLLOW`. Only for trees whose directories the guest cannot change (the share
/// view, the pod dir).
pub fn unmount_below(dir: &Path) {
    let mut targets = mounts_below(dir);
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let flags = rustix::mount::UnmountFlags::NOFOLLOW;
        if let Err(e) = rustix::mount::unmount(t.as_str(), flags) {
            log::warn!("umount {t}: {e}; detaching it");
            if let Err(e) =
                rustix::mount::unmount(t.as_str(), flags | rustix::mount::UnmountFlags::DETACH)
            {
                log::warn!("umount -l {t}: {e}");
            }
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a pod dir: unmounts what is mounted below it, then deletes it without ever
/// crossing a mount point (one that remains stops the removal with an error).
pub fn remove_pod_dir(dir: &Path) -> Result<(), ShareError> {
    let Some(parent) = dir.parent() else {
        return Err(ShareError::BadName(dir.display().to_string()));
    };
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ShareError::BadName(dir.display().to_string()))?;
    let parent_fd = match rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(errno("open", parent)(e)),
    };
    if rustix::fs::statx(
        parent_fd.as_fd(),
        name,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::TYPE,
    )
    .is_err()
    {
        return Ok(());
    }
    unmount_below(dir);
    remove_entry(parent_fd.as_fd(), name, dir)
}

/// Removes `name` in `dir` (recursively for a directory) without following symlinks or
/// crossing into another mount than `dir`'s.
pub fn remove_entry(dir: BorrowedFd, name: &str, path: &Path) -> Result<(), ShareError> {
    let mnt = mount_id(dir, "").map_err(errno("statx", path))?;
    remove_at(dir, name, path, mnt, 0)
}

fn remove_at(
    dir: BorrowedFd,
    name: &str,
    path: &Path,
    mnt: u64,
    depth: usize,
) -> Result<(), ShareError> {
    let st = match rustix::fs::statx(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::TYPE | StatxFlags::MNT_ID,
    ) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(errno("statx", path)(e)),
    };
    if st.stx_mnt_id != mnt {
        return Err(ShareError::MountRemains(path.display().to_string()));
    }
    if u32::from(st.stx_mode) & libc::S_IFMT != libc::S_IFDIR {
        return match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(rustix::io::Errno::BUSY) => {
                Err(ShareError::MountRemains(path.display().to_string()))
            }
            Err(e) => Err(errno("remove", path)(e)),
        };
    }
    if depth >= MAX_DEPTH {
        return Err(ShareError::TooDeep(path.display().to_string()));
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("open", path))?;
    // The directory opened is the one checked: not replaced by a mount meanwhile.
    if mount_id(sub.as_fd(), "").map_err(errno("statx", path))? != mnt {
        return Err(ShareError::MountRemains(path.display().to_string()));
    }
    let names: Vec<String> = rustix::fs::Dir::read_from(sub.as_fd())
        .map_err(errno("read", path))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    for n in names {
        remove_at(sub.as_fd(), &n, &path.join(&n), mnt, depth + 1)?;
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::BUSY) => Err(ShareError::MountRemains(path.display().to_string())),
        Err(e) => Err(errno("remove", path)(e)),
    }
}

/// Creates `dir` (and its parents) with `mode` on the last component, and sets `mode` on
/// it when it already exists.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), ShareError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io_err("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", dir))
}

/// Creates the pod dir `dir` (0700) below `run_dir` (0711); a stale one of an earlier pod
/// of the same id (its shim died) is removed first.
pub fn create_pod_dir(run_dir: &Path, dir: &Path) -> Result<(), ShareError> {
    ensure_dir(run_dir, 0o711)?;
    remove_pod_dir(dir)?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create", dir))?;
    // The umask may have taken bits away; nothing else may add any.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }

    #[test]
    fn names_are_single_components() {
        for bad in ["", ".", "..", "a/b", "/a", "a\0"] {
            assert!(component(bad).is_err(), "{bad:?}");
        }
        assert_eq!(component("c-1.x").unwrap(), "c-1.x");
    }
}
