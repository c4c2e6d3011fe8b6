//! The file system behind a share: fuse-backend-rs' `PassthroughFs` rooted at the share's
//! host directory, wrapped in [`ShareFs`] (the share's policy), mounted at `/` of a `Vfs`,
//! served by a FUSE `Server`.
//!
//! Why a `Vfs` for a single directory: it owns FUSE_INIT option negotiation (writeback,
//! no-open, killpriv) for everything mounted under it, keeps inode numbers of several
//! back ends apart, and lets a later change mount more back ends (e.g. a container's rootfs)
//! under one tag without touching the device.
//!
//! What [`ShareFs`] adds to `PassthroughFs`:
//! * read-only shares: every call that would change something fails with `EROFS` (opening
//!   for writing or with `O_TRUNC` included, and `access(W_OK)`);
//! * no character or block device nodes unless the share allows them (`EPERM`): they would
//!   be usable by host processes;
//! * `getxattr`/`listxattr` sizes clamped to the kernel's 64 KiB limit: `PassthroughFs`
//!   allocates the guest's size up front, and a 4 GiB allocation that fails aborts the VMM.
//!
//! `PassthroughFs` itself opens every path component with `O_NOFOLLOW` relative to its
//! parent's `O_PATH` fd, refuses names with `/` (the `Vfs` does too), maps `..` of the root
//! to the root, and opens only regular files and directories; a guest cannot walk out of
//! the share through names or symlinks. It does not `pivot_root` like virtiofsd: a host
//! process that moves a directory out of the share while the guest holds it gives the guest
//! that directory's new surroundings.
//!
//! Process-wide side effects of fuse-backend-rs and how they are contained: `import()` calls
//! `umask(0)` (the umask is per process unless the thread unshared `CLONE_FS`), and requests
//! switch the thread's effective uid/gid with raw `setresuid`/`setresgid` system calls (per
//! thread). [`build_server`] must therefore run on the share's worker thread after
//! [`isolate_thread_fs_state`].

use std::any::Any;
use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{BackendFileSystem, Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{Config as PassthroughConfig, PassthroughFs};
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::config::ShareConfig;
use super::limits::{FsLimits, Live};
use std::sync::Mutex;

/// The kernel's `XATTR_SIZE_MAX` / `XATTR_LIST_MAX`: larger sizes are clamped by the
/// `getxattr(2)` family anyway.
pub const XATTR_MAX: u32 = 64 << 10;

/// The FUSE server of one share.
pub type FuseServer = Server<Vfs>;

/// Errors setting up a share's file system.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot give the virtio-fs worker its own umask (unshare CLONE_FS): {0}; the process may be in a restrictive seccomp profile")]
    Unshare(io::Error),
    #[error(
        "cannot open share directory {dir}: {source}; check that it exists and the VMM may read it"
    )]
    Open { dir: String, source: io::Error },
    #[error("cannot mount share directory {dir}: {reason}")]
    Mount { dir: String, reason: String },
    #[error("{0}")]
    Confine(String),
}

/// Gives the calling thread its own umask, cwd and root (`unshare(CLONE_FS)`) and sets its
/// umask to 0, so that fuse-backend-rs' `umask(0)` does not leak into the rest of the
/// process, and modes from the guest (already masked by the guest kernel) are used as is.
pub fn isolate_thread_fs_state() -> Result<(), BackendError> {
    // SAFETY: unshare(CLONE_FS) takes no pointers; it only affects this thread's fs_struct.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(BackendError::Unshare(io::Error::last_os_error()));
    }
    // SAFETY: umask cannot fail and takes no pointers; after unshare it is this thread's.
    unsafe { libc::umask(0) };
    Ok(())
}

/// Builds the FUSE server for `share`. Run it on the thread that will serve requests, after
/// [`isolate_thread_fs_state`].
pub fn build_server(share: &ShareConfig) -> Result<FuseServer, BackendError> {
    let opts = &share.options;
    let dir = share.dir.to_string_lossy().into_owned();
    let timeout = opts.cache.timeout();
    let writeback = opts.writeback && !opts.read_only;
    let cfg = PassthroughConfig {
        root_dir: dir.clone(),
        // Under a Vfs: the Vfs negotiates options and validates names.
        do_import: false,
        cache_policy: opts.cache.to_passthrough(),
        entry_timeout: timeout,
        attr_timeout: timeout,
        xattr: opts.xattr,
        writeback,
        // No DAX window.
        dax_file_size: None,
        ..Default::default()
    };
    let open_err = |source| BackendError::Open {
        dir: dir.clone(),
        source,
    };
    let passthrough = PassthroughFs::<()>::new(cfg).map_err(open_err)?;
    passthrough.import().map_err(open_err)?;

    let mut vfs_opts = VfsOptions {
        no_writeback: !writeback,
        // Keep OPEN/OPENDIR: the open reply carries the cache policy (DIRECT_IO/KEEP_CACHE).
        no_open: false,
        no_opendir: false,
        killpriv_v2: false,
        ..VfsOptions::default()
    };
    vfs_opts.out_opts.remove(FsOptions::PERFILE_DAX);
    let vfs = Vfs::new(vfs_opts);
    let fs = ShareFs::new(
        passthrough,
        opts.read_only,
        opts.allow_devices,
        share.tag.clone(),
    )
    .with_limits(opts.limits);
    vfs.mount(Box::new(fs), "/")
        .map_err(|e| BackendError::Mount {
            dir,
            reason: e.to_string(),
        })?;
    Ok(Server::new(vfs))
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// A share's policy around a back-end file system: see the module documentation.
pub struct ShareFs<F> {
    inner: F,
    read_only: bool,
    allow_devices: bool,
    tag: String,
    limits: FsLimits,
    live: Mutex<Live>,
}

fn enfile() -> io::Error {
    io::Error::from_raw_os_error(libc::ENFILE)
}

impl<F> ShareFs<F> {
    pub fn new(inner: F, read_only: bool, allow_devices: bool, tag: String) -> Self {
        Self {
            inner,
            read_only,
            allow_devices,
            tag,
            limits: FsLimits::default(),
            live: Mutex::new(Live::default()),
        }
    }

    /// With these caps on live inodes and handles.
    pub fn with_limits(mut self, limits: FsLimits) -> Self {
        self.limits = limits;
        self
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether one more reference to `inode` is admitted (logged once when refused).
    fn admit_inode(&self, inode: u64) -> bool {
        // Inode 0: a negative entry, no reference.
        inode == 0 || self.live().add_inode(inode, self.limits.max_inodes) || {
            log::warn!(
                "virtio-fs {}: the guest holds {} inodes, the cap: ENFILE",
                self.tag,
                self.limits.max_inodes
            );
            false
        }
    }

    fn admit_handle(&self, handle: Option<u64>) -> bool {
        handle.is_none_or(|h| self.live().add_handle(h, self.limits.max_handles)) || {
            log::warn!(
                "virtio-fs {}: the guest holds {} open files, the cap: ENFILE",
                self.tag,
                self.limits.max_handles
            );
            false
        }
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(erofs())
        } else {
            Ok(())
        }
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64>> ShareFs<F> {
    /// `r`, with its inode reference admitted; over the cap the back end's reference is
    /// given back and the guest gets `ENFILE`.
    fn entry(&self, ctx: &Context, r: io::Result<Entry>) -> io::Result<Entry> {
        let e = r?;
        if self.admit_inode(e.inode) {
            return Ok(e);
        }
        self.inner.forget(ctx, e.inode, 1);
        Err(enfile())
    }
}

/// The file flags of a READ or WRITE with the ones whose `F_SETFL` can fail cleared.
///
/// `PassthroughFs` applies a request's flags to the handle's host fd with `F_SETFL` when
/// they differ from the open flags; if that fails (`EINVAL` for `O_DIRECT` on a host file
/// system without direct I/O, `EPERM` for `O_NOATIME`), fuse-backend-rs 0.14 returns early
/// and drops the `File` it built around the borrowed fd: the handle's fd is closed, and
/// closed again when the handle is released, which may close whatever host file reused
/// the number (in this process: the ttrpc socket, a vsock stream, guest memory). Clearing
/// a flag never fails, so the guest gets buffered I/O on such a handle instead.
fn settable_flags(flags: u32) -> u32 {
    FLAGS_TO_KEEP & flags
}

/// Everything but `O_DIRECT` and `O_NOATIME` (see [`settable_flags`]).
const FLAGS_TO_KEEP: u32 = !((libc::O_DIRECT | libc::O_NOATIME) as u32);

/// Whether open `flags` (guest `O_*`, the same values on Linux) ask to modify the file.
fn opens_for_write(flags: u32) -> bool {
    // The guest's flags word is the C `int` of open(2), bit for bit.
    let flags = flags.cast_signed();
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

impl<F> BackendFileSystem for ShareFs<F>
where
    F: BackendFileSystem<Inode = u64, Handle = u64> + Send + Sync + 'static,
{
    fn mount(&self) -> io::Result<(Entry, u64)> {
        self.inner.mount()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64>> FileSystem for ShareFs<F> {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut capable = capable;
        if self.read_only {
            capable.remove(FsOptions::WRITEBACK_CACHE);
        }
        self.inner.init(capable)
    }

    fn destroy(&self) {
        log::info!("virtio-fs {}: the guest unmounted the share", self.tag);
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.entry(ctx, self.inner.lookup(ctx, parent, name))
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.live().forget(inode, count);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        {
            let mut live = self.live();
            for (inode, count) in &requests {
                live.forget(*inode, *count);
            }
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        self.entry(ctx, self.inner.symlink(ctx, linkname, parent, name))
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        let kind = mode & libc::S_IFMT;
        if !self.allow_devices && (kind == libc::S_IFCHR || kind == libc::S_IFBLK) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.entry(ctx, self.inner.mknod(ctx, inode, name, mode, rdev, umask))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        self.entry(ctx, self.inner.mkdir(ctx, parent, name, mode, umask))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        self.entry(ctx, self.inner.link(ctx, inode, newparent, newname))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if opens_for_write(flags) {
            self.writable()?;
        }
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        if !self.admit_handle(opened.0) {
            if let Some(h) = opened.0 {
                let _ = self.inner.release(ctx, inode, flags, h, false, false, None);
            }
            return Err(enfile());
        }
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        let flags = args.flags;
        let (entry, handle, opts, passthrough) = self.inner.create(ctx, parent, name, args)?;
        let inode_ok = self.admit_inode(entry.inode);
        if inode_ok && self.admit_handle(handle) {
            return Ok((entry, handle, opts, passthrough));
        }
        if let Some(h) = handle {
            let _ = self
                .inner
                .release(ctx, entry.inode, flags, h, false, false, None);
        }
        if inode_ok {
            self.live().forget(entry.inode, 1);
        }
        self.inner.forget(ctx, entry.inode, 1);
        Err(enfile())
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let flags = settable_flags(flags);
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            settable_flags(flags),
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.live().release(handle);
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.inner.statfs(ctx, inode)?;
        if self.read_only {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size.min(XATTR_MAX))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size.min(XATTR_MAX))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let opened = self.inner.opendir(ctx, inode, flags)?;
        if !self.admit_handle(opened.0) {
            if let Some(h) = opened.0 {
                let _ = self.inner.releasedir(ctx, inode, flags, h);
            }
            return Err(enfile());
        }
        Ok(opened)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // Each entry is a reference; the back end gives it back when an entry is not
        // taken (0), which is also how a listing stops at the inode cap.
        let (mut refused, mut added) = (false, 0usize);
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |dir_entry, entry| {
                let ino = entry.inode;
                if refused || !self.admit_inode(ino) {
                    refused = true;
                    return Ok(0);
                }
                let taken = add_entry(dir_entry, entry)?;
                if taken == 0 {
                    self.live().forget(ino, 1);
                } else {
                    added += 1;
                }
                Ok(taken)
            })?;
        if refused && added == 0 {
            return Err(enfile());
        }
        Ok(())
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.live().release(handle);
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn setupmapping(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _foffset: u64,
        _len: u64,
        _flags: u64,
        _moffset: u64,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        // No DAX window is offered.
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn removemapping(
        &self,
        _ctx: &Context,
        _inode: u64,
        _requests: Vec<RemovemappingOne>,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.writable()?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    fn ioctl(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        // PassthroughFs answers ENOTTY to every ioctl; a back end that implements the
        // modifying ones (FS_IOC_SETFLAGS, ...) must check `read_only` here.
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    fn bmap(&self, ctx: &Context, inode: u64, block: u64, blocksize: u32) -> io::Result<u64> {
        self.inner.bmap(ctx, inode, block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        khandle: u64,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(ctx, inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_intent_of_open_flags() {
        assert!(!opens_for_write(libc::O_RDONLY as u32));
        assert!(!opens_for_write((libc::O_RDONLY | libc::O_NOFOLLOW) as u32));
        assert!(opens_for_write(libc::O_WRONLY as u32));
        assert!(opens_for_write(libc::O_RDWR as u32));
        assert!(opens_for_write((libc::O_RDONLY | libc::O_TRUNC) as u32));
    }
}
