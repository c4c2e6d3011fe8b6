//! virtio-fs driven end to end through the virtio-mmio transport by the host-side FUSE
//! client (`test_client`): the guest's view, without a VM, on temporary directories.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, EntryOut, FsOptions, GetattrIn, GetxattrIn, InHeader, Opcode, OutHeader, ReadIn,
    SetattrIn, WriteIn, WriteOut,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use super::test_client::{flags::*, parse_reply, FuseClient, REPLY_TIMEOUT};
use super::*;
use crate::bus::BusDevice;
use crate::virtio::features;
use crate::virtio::mmio::regs;
use crate::virtio::status::*;
use crate::virtio::test_utils::{len32, size32, Buf, DESC_INDIRECT, DESC_NEXT, DESC_WRITE};
use crate::virtio::INT_CONFIG_CHANGE;

const ROOT: u64 = 1;
const TAG: &str = "podvisor-test";

struct Fixture {
    dir: TempDir,
    c: FuseClient,
}

impl Fixture {
    fn host(&self, rel: &str) -> PathBuf {
        self.dir.as_path().join(rel)
    }
}

fn device(dir: &Path, tag: &str, options: ShareOptions) -> Fs {
    Fs::new(ShareConfig::new(tag, dir, options).unwrap()).unwrap()
}

/// An active, initialized share of a fresh temp dir.
fn share(options: ShareOptions) -> Fixture {
    let dir = TempDir::new().unwrap();
    let mut c = FuseClient::new(device(dir.as_path(), TAG, options));
    c.init();
    Fixture { dir, c }
}

fn rw() -> Fixture {
    share(ShareOptions::default())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed) ^ (i >> 12).to_le_bytes()[0]
        })
        .collect()
}

fn mode_of(e: &EntryOut) -> u32 {
    e.attr.mode
}

// ---- Identity and negotiation ---------------------------------------------------------

#[test]
fn config_space_holds_the_tag_and_one_request_queue() {
    let dir = TempDir::new().unwrap();
    let fs = device(dir.as_path(), "data", ShareOptions::default());
    let state = fs.state();
    assert_eq!(state.tag, "data");
    assert_eq!(state.dir, dir.as_path().canonicalize().unwrap());
    assert_eq!(state.queues, None);
    let mut drv = crate::virtio::test_utils::MmioDriver::new(Box::new(fs), 1 << 20);
    assert_eq!(drv.read32(regs::DEVICE_ID), 26);
    let mut tag = b"data".to_vec();
    tag.resize(TAG_LEN, 0);
    assert_eq!(drv.read_config(0, TAG_LEN), tag);
    assert_eq!(drv.read_config(36, 4), 1u32.to_le_bytes());
    // Linux reads the tag byte by byte.
    assert_eq!(drv.read_config(1, 1), b"a");
    assert_eq!(drv.read_config(40, 4), [0; 4]);
    drv.transport.write(regs::CONFIG, b"evil");
    assert_eq!(drv.read_config(0, 4), b"data");
    let feats = drv.device_features();
    assert_eq!(
        feats,
        features::bit(features::VIRTIO_F_VERSION_1)
            | features::bit(features::VIRTIO_RING_F_INDIRECT_DESC)
            | features::bit(features::VIRTIO_RING_F_EVENT_IDX)
    );
    drv.write32(regs::QUEUE_SEL, 1);
    assert_eq!(drv.read32(regs::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
    drv.write32(regs::QUEUE_SEL, 2);
    assert_eq!(drv.read32(regs::QUEUE_NUM_MAX), 0, "only two queues");
}

#[test]
fn init_negotiates_without_writeback_or_dax_by_default() {
    let dir = TempDir::new().unwrap();
    let mut c = FuseClient::new(device(dir.as_path(), TAG, ShareOptions::default()));
    let out = c.init();
    assert_eq!(out.major, 7);
    assert!(out.minor >= 31);
    let enabled = u64::from(out.flags) | (u64::from(out.flags2) << 32);
    let opts = FsOptions::from_bits_truncate(enabled);
    assert!(!opts.contains(FsOptions::WRITEBACK_CACHE));
    assert!(!opts.contains(FsOptions::PERFILE_DAX));
    assert!(opts.contains(FsOptions::MAX_PAGES));
    assert_eq!(out.max_write, 1 << 20);
    assert_eq!(out.max_pages, 256);
    // A second INIT in the same session is refused, not fatal.
    let again = c.call(
        Opcode::Init,
        0,
        &[fuse_backend_rs::abi::fuse_abi::InitIn {
            major: 7,
            minor: 36,
            max_readahead: 0,
            flags: 0,
        }
        .as_slice()],
        80,
    );
    assert_eq!(again.check(), Err(libc::EINVAL));

    let dir = TempDir::new().unwrap();
    let opts = ShareOptions {
        writeback: true,
        ..Default::default()
    };
    let mut c = FuseClient::new(device(dir.as_path(), TAG, opts));
    let out = c.init();
    assert_ne!(
        out.flags & (FsOptions::WRITEBACK_CACHE.bits() & 0xffff_ffff) as u32,
        0
    );
}

// ---- What containers do ---------------------------------------------------------------

#[test]
fn lookup_and_getattr() {
    let mut f = rw();
    fs::write(f.host("hello"), b"hi there").unwrap();
    fs::set_permissions(f.host("hello"), fs::Permissions::from_mode(0o640)).unwrap();
    let e = f.c.lookup(ROOT, "hello").unwrap();
    assert_ne!(e.nodeid, 0);
    assert_eq!(e.attr.size, 8);
    assert_eq!(mode_of(&e), libc::S_IFREG | 0o640);
    assert_eq!(e.entry_valid, 1, "cache=auto: 1 s");
    let a = f.c.getattr(e.nodeid).unwrap();
    assert_eq!(a.attr.size, 8);
    assert_eq!(a.attr.ino, e.attr.ino);
    let root = f.c.getattr(ROOT).unwrap();
    assert_eq!(root.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(f.c.lookup(ROOT, "missing").unwrap_err(), libc::ENOENT);
    let st = f.c.statfs().unwrap();
    assert!(st.blocks > 0 && st.namelen > 0);
}

#[test]
fn mkdir_create_write_read_small_and_large() {
    let mut f = rw();
    let d = f.c.mkdir(ROOT, "d", 0o755).unwrap();
    assert_eq!(mode_of(&d) & libc::S_IFMT, libc::S_IFDIR);
    assert!(f.host("d").is_dir());
    let (e, open) =
        f.c.create(d.nodeid, "f", libc::O_RDWR as u32, 0o644)
            .unwrap();
    assert_eq!(mode_of(&e), libc::S_IFREG | 0o644);

    let small = pattern(4096, 1);
    assert_eq!(f.c.write(e.nodeid, open.fh, 0, &small), Ok(4096));
    assert_eq!(fs::read(f.host("d/f")).unwrap(), small);
    assert_eq!(f.c.read(e.nodeid, open.fh, 0, 4096).unwrap(), small);

    // 1 MiB (the largest request Linux sends with max_pages 256) at an offset.
    let big = pattern(1 << 20, 7);
    assert_eq!(f.c.write(e.nodeid, open.fh, 8192, &big), Ok(1 << 20));
    assert_eq!(f.c.read(e.nodeid, open.fh, 8192, 1 << 20).unwrap(), big);
    let on_host = fs::read(f.host("d/f")).unwrap();
    assert_eq!(on_host.len(), 8192 + (1 << 20));
    assert_eq!(&on_host[8192..], &big[..]);
    assert_eq!(
        &on_host[4096..8192],
        &[0u8; 4096][..],
        "hole reads as zeros"
    );
    // Reading past the end returns what there is.
    let tail =
        f.c.read(e.nodeid, open.fh, on_host.len() as u64 - 10, 4096)
            .unwrap();
    assert_eq!(tail, &on_host[on_host.len() - 10..]);
    assert_eq!(
        f.c.getattr(e.nodeid).unwrap().attr.size,
        on_host.len() as u64
    );
    f.c.fsync(e.nodeid, open.fh).unwrap();
    f.c.release(e.nodeid, open.fh, false).unwrap();

    // Open again read-only: a write through that handle fails.
    let o = f.c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(f.c.read(e.nodeid, o.fh, 0, 16).unwrap(), &small[..16]);
    assert_eq!(f.c.write(e.nodeid, o.fh, 0, b"x"), Err(libc::EBADF));
    // Creating an existing name with O_EXCL fails.
    assert_eq!(
        f.c.create(
            d.nodeid,
            "f",
            (libc::O_RDWR | libc::O_CREAT | libc::O_EXCL) as u32,
            0o644
        )
        .unwrap_err(),
        libc::EEXIST
    );
}

#[test]
fn readdir_and_readdirplus() {
    let mut f = rw();
    for name in ["a", "bb", "ccc"] {
        fs::write(f.host(name), name).unwrap();
    }
    fs::create_dir(f.host("sub")).unwrap();
    let dir = f.c.opendir(ROOT).unwrap();
    let entries = f.c.readdir(ROOT, dir.fh, 0, 4096, false).unwrap();
    let mut names: Vec<_> = entries
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .collect();
    names.sort();
    // PassthroughFs leaves "." and ".." out (the guest kernel does not add them).
    assert_eq!(names, ["a", "bb", "ccc", "sub"]);
    let sub = entries.iter().find(|e| e.name == b"sub").unwrap();
    assert_eq!(sub.type_, u32::from(libc::DT_DIR));

    // Resuming from an offset gives the rest.
    let first = &entries[0];
    let rest = f.c.readdir(ROOT, dir.fh, first.off, 4096, false).unwrap();
    assert_eq!(rest.len(), entries.len() - 1);

    let plus = f.c.readdir(ROOT, dir.fh, 0, 4096, true).unwrap();
    assert_eq!(plus.len(), entries.len());
    let bb = plus.iter().find(|e| e.name == b"bb").unwrap();
    let entry = bb.entry.unwrap();
    assert_ne!(entry.nodeid, 0);
    assert_eq!(entry.attr.size, 2);
    // The node ID from READDIRPLUS is a real lookup.
    assert_eq!(f.c.getattr(entry.nodeid).unwrap().attr.size, 2);
    // A buffer too small for one entry gives nothing or EINVAL (from getdents64).
    match f.c.readdir(ROOT, dir.fh, 0, 8, false) {
        Ok(v) => assert!(v.is_empty()),
        Err(e) => assert_eq!(e, libc::EINVAL),
    }
    f.c.release(ROOT, dir.fh, true).unwrap();
}

#[test]
fn rename_unlink_rmdir() {
    let mut f = rw();
    let a = f.c.mkdir(ROOT, "a", 0o755).unwrap();
    let b = f.c.mkdir(ROOT, "b", 0o755).unwrap();
    let (e, o) =
        f.c.create(a.nodeid, "x", libc::O_WRONLY as u32, 0o600)
            .unwrap();
    f.c.write(e.nodeid, o.fh, 0, b"payload").unwrap();
    f.c.release(e.nodeid, o.fh, false).unwrap();

    f.c.rename(a.nodeid, "x", b.nodeid, "y").unwrap();
    assert!(!f.host("a/x").exists());
    assert_eq!(fs::read(f.host("b/y")).unwrap(), b"payload");
    // Rename over an existing file replaces it.
    fs::write(f.host("b/z"), b"old").unwrap();
    f.c.rename(b.nodeid, "y", b.nodeid, "z").unwrap();
    assert_eq!(fs::read(f.host("b/z")).unwrap(), b"payload");
    assert_eq!(
        f.c.rename(a.nodeid, "nope", b.nodeid, "q"),
        Err(libc::ENOENT)
    );

    assert_eq!(f.c.rmdir(ROOT, "b"), Err(libc::ENOTEMPTY));
    f.c.unlink(b.nodeid, "z").unwrap();
    assert!(!f.host("b/z").exists());
    assert_eq!(f.c.unlink(b.nodeid, "z"), Err(libc::ENOENT));
    f.c.rmdir(ROOT, "b").unwrap();
    assert!(!f.host("b").exists());
    // Directories rename too.
    f.c.rename(ROOT, "a", ROOT, "a2").unwrap();
    assert!(f.host("a2").is_dir());
}

#[test]
fn symlinks_and_hardlinks() {
    let mut f = rw();
    fs::write(f.host("target"), b"data").unwrap();
    let s = f.c.symlink(ROOT, "link", "target").unwrap();
    assert_eq!(mode_of(&s) & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(f.c.readlink(s.nodeid).unwrap(), b"target");
    assert_eq!(
        fs::read_link(f.host("link")).unwrap(),
        PathBuf::from("target")
    );
    // Symlinks are not opened (the guest resolves them itself).
    assert!(f.c.open(s.nodeid, libc::O_RDONLY as u32).is_err());

    let t = f.c.lookup(ROOT, "target").unwrap();
    let l = f.c.link(t.nodeid, ROOT, "hard").unwrap();
    assert_eq!(l.attr.nlink, 2);
    assert_eq!(l.nodeid, t.nodeid, "the same inode");
    let (m1, m2) = (
        fs::metadata(f.host("target")).unwrap(),
        fs::metadata(f.host("hard")).unwrap(),
    );
    assert_eq!(m1.ino(), m2.ino());
    assert_eq!(f.c.link(t.nodeid, ROOT, "hard").unwrap_err(), libc::EEXIST);
}

#[test]
fn extended_attributes() {
    let mut f = rw();
    fs::write(f.host("f"), b"").unwrap();
    let e = f.c.lookup(ROOT, "f").unwrap();
    f.c.setxattr(e.nodeid, "user.podvisor", b"value-1", 0)
        .unwrap();
    assert_eq!(
        f.c.getxattr(e.nodeid, "user.podvisor", 64).unwrap(),
        b"value-1"
    );
    // Size query.
    let size = f.c.getxattr(e.nodeid, "user.podvisor", 0).unwrap();
    assert_eq!(u32::from_le_bytes(size[..4].try_into().unwrap()), 7);
    // Too small a buffer.
    assert_eq!(
        f.c.getxattr(e.nodeid, "user.podvisor", 3).unwrap_err(),
        libc::ERANGE
    );
    let list = f.c.listxattr(e.nodeid, 256).unwrap();
    assert!(list.split(|&b| b == 0).any(|n| n == b"user.podvisor"));
    assert_eq!(
        f.c.getxattr(e.nodeid, "user.missing", 64).unwrap_err(),
        libc::ENODATA
    );
    // XATTR_CREATE on an existing name.
    assert_eq!(
        f.c.setxattr(e.nodeid, "user.podvisor", b"v2", libc::XATTR_CREATE as u32),
        Err(libc::EEXIST)
    );
    // On the host.
    let mut buf = [0u8; 16];
    let path = std::ffi::CString::new(f.host("f").to_str().unwrap()).unwrap();
    // SAFETY: valid C strings and a buffer of the given size.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.podvisor".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..usize::try_from(n).unwrap()], b"value-1");

    // A share without xattrs says so.
    let mut f = share(ShareOptions {
        xattr: false,
        ..Default::default()
    });
    fs::write(f.host("f"), b"").unwrap();
    let e = f.c.lookup(ROOT, "f").unwrap();
    assert_eq!(f.c.setxattr(e.nodeid, "user.x", b"1", 0), Err(libc::ENOSYS));
}

fn setattr_in(valid: u32) -> SetattrIn {
    SetattrIn {
        valid,
        ..Default::default()
    }
}

#[test]
fn chmod_chown_truncate_and_ownership_of_new_files() {
    let mut f = rw();
    fs::write(f.host("f"), pattern(1000, 3)).unwrap();
    let e = f.c.lookup(ROOT, "f").unwrap();

    let a =
        f.c.setattr(
            e.nodeid,
            SetattrIn {
                mode: 0o4711,
                ..setattr_in(FATTR_MODE)
            },
        )
        .unwrap();
    assert_eq!(a.attr.mode, libc::S_IFREG | 0o4711);
    assert_eq!(
        fs::metadata(f.host("f")).unwrap().mode(),
        libc::S_IFREG | 0o4711
    );

    let a =
        f.c.setattr(
            e.nodeid,
            SetattrIn {
                uid: 1234,
                gid: 5678,
                ..setattr_in(FATTR_UID | FATTR_GID)
            },
        )
        .unwrap();
    assert_eq!((a.attr.uid, a.attr.gid), (1234, 5678));
    let m = fs::metadata(f.host("f")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));

    let a =
        f.c.setattr(
            e.nodeid,
            SetattrIn {
                size: 10,
                ..setattr_in(FATTR_SIZE)
            },
        )
        .unwrap();
    assert_eq!(a.attr.size, 10);
    assert_eq!(fs::read(f.host("f")).unwrap(), &pattern(1000, 3)[..10]);

    // Files, directories and symlinks made by a guest user belong to that user on the host
    // (the VMM runs as root in this test suite, as in production). The host checks the
    // user's access to the parent too: open the root up, as a guest would have to.
    f.c.setattr(
        ROOT,
        SetattrIn {
            mode: 0o777,
            ..setattr_in(FATTR_MODE)
        },
    )
    .unwrap();
    // Then root again: the worker thread switched back.
    for (uid, gid) in [(1000, 1001), (0, 0)] {
        f.c.uid = uid;
        f.c.gid = gid;
        let file = format!("file-{uid}");
        let (n, o) =
            f.c.create(ROOT, &file, libc::O_WRONLY as u32, 0o600)
                .unwrap();
        f.c.release(n.nodeid, o.fh, false).unwrap();
        let d = f.c.mkdir(ROOT, &format!("dir-{uid}"), 0o700).unwrap();
        assert_eq!((d.attr.uid, d.attr.gid), (uid, gid));
        f.c.symlink(ROOT, &format!("link-{uid}"), &file).unwrap();
        for kind in ["file", "dir", "link"] {
            let m = fs::symlink_metadata(f.host(&format!("{kind}-{uid}"))).unwrap();
            assert_eq!((m.uid(), m.gid()), (uid, gid), "{kind} of {uid}");
        }
    }
    // Modes come from the guest as is: the worker's umask is 0, the process's is untouched.
    let x = f.c.mkdir(ROOT, "open", 0o777).unwrap();
    assert_eq!(
        mode_of(&x) & 0o7777,
        0o777 & !0o022,
        "guest umask applied, not the host's"
    );
}

#[test]
fn mknod_makes_fifos_but_no_device_nodes_unless_allowed() {
    let mut f = rw();
    let p = f.c.mknod(ROOT, "pipe", libc::S_IFIFO | 0o644, 0).unwrap();
    assert_eq!(mode_of(&p) & libc::S_IFMT, libc::S_IFIFO);
    for (name, mode, dev) in [
        ("null", libc::S_IFCHR | 0o666, libc::makedev(1, 3)),
        ("sda", libc::S_IFBLK | 0o600, libc::makedev(8, 0)),
    ] {
        let err =
            f.c.mknod(ROOT, name, mode, u32::try_from(dev).unwrap())
                .unwrap_err();
        assert_eq!(err, libc::EPERM, "{name}");
    }
    assert!(!f.host("null").exists());
    // Special files are never opened by the server.
    assert!(f.c.open(p.nodeid, libc::O_RDONLY as u32).is_err());

    let mut f = share(ShareOptions {
        allow_devices: true,
        ..Default::default()
    });
    let n =
        f.c.mknod(
            ROOT,
            "null",
            libc::S_IFCHR | 0o666,
            u32::try_from(libc::makedev(1, 3)).unwrap(),
        )
        .unwrap();
    assert_eq!(mode_of(&n) & libc::S_IFMT, libc::S_IFCHR);
}

#[test]
fn read_only_share_rejects_every_change() {
    let dir = TempDir::new().unwrap();
    fs::write(dir.as_path().join("f"), b"content").unwrap();
    fs::create_dir(dir.as_path().join("d")).unwrap();
    let mut c = FuseClient::new(device(
        dir.as_path(),
        TAG,
        ShareOptions {
            read_only: true,
            writeback: true, // ignored on read-only shares
            ..Default::default()
        },
    ));
    let out = c.init();
    assert_eq!(
        out.flags & (FsOptions::WRITEBACK_CACHE.bits() & 0xffff_ffff) as u32,
        0
    );
    let e = c.lookup(ROOT, "f").unwrap();
    let d = c.lookup(ROOT, "d").unwrap();
    let o = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(e.nodeid, o.fh, 0, 64).unwrap(), b"content");
    assert_eq!(c.write(e.nodeid, o.fh, 0, b"x"), Err(libc::EROFS));
    c.release(e.nodeid, o.fh, false).unwrap();
    let dh = c.opendir(ROOT).unwrap();
    assert_eq!(c.readdir(ROOT, dh.fh, 0, 4096, true).unwrap().len(), 2);

    let erofs = Err(libc::EROFS);
    assert_eq!(
        c.create(ROOT, "new", libc::O_RDWR as u32, 0o644)
            .map(|_| ()),
        erofs
    );
    assert_eq!(c.open(e.nodeid, libc::O_RDWR as u32).map(|_| ()), erofs);
    assert_eq!(c.open(e.nodeid, libc::O_WRONLY as u32).map(|_| ()), erofs);
    assert_eq!(
        c.open(e.nodeid, (libc::O_RDONLY | libc::O_TRUNC) as u32)
            .map(|_| ()),
        erofs
    );
    assert_eq!(c.mkdir(ROOT, "nd", 0o755).map(|_| ()), erofs);
    assert_eq!(
        c.mknod(ROOT, "p", libc::S_IFIFO | 0o644, 0).map(|_| ()),
        erofs
    );
    assert_eq!(c.symlink(ROOT, "s", "f").map(|_| ()), erofs);
    assert_eq!(c.link(e.nodeid, ROOT, "h").map(|_| ()), erofs);
    assert_eq!(c.unlink(ROOT, "f"), erofs);
    assert_eq!(c.rmdir(ROOT, "d"), erofs);
    assert_eq!(c.rename(ROOT, "f", d.nodeid, "f"), erofs);
    assert_eq!(
        c.setattr(
            e.nodeid,
            SetattrIn {
                mode: 0o777,
                ..setattr_in(FATTR_MODE)
            }
        )
        .map(|_| ()),
        erofs
    );
    assert_eq!(
        c.setattr(
            e.nodeid,
            SetattrIn {
                size: 0,
                ..setattr_in(FATTR_SIZE)
            }
        )
        .map(|_| ()),
        erofs
    );
    assert_eq!(c.setxattr(e.nodeid, "user.x", b"1", 0), erofs);
    assert_eq!(c.access(e.nodeid, libc::W_OK as u32), erofs);
    c.access(e.nodeid, libc::R_OK as u32).unwrap();
    let st = c.statfs().unwrap();
    assert!(st.blocks > 0);
    // Nothing changed on the host.
    let names: Vec<_> = fs::read_dir(dir.as_path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2);
    assert_eq!(fs::read(dir.as_path().join("f")).unwrap(), b"content");
}

#[test]
fn forget_on_the_hiprio_queue() {
    let mut f = rw();
    fs::write(f.host("f"), b"x").unwrap();
    let e = f.c.lookup(ROOT, "f").unwrap();
    f.c.forget(e.nodeid, 1);
    // Forgotten: the node ID is gone until looked up again.
    assert!(f.c.getattr(e.nodeid).is_err());
    let again = f.c.lookup(ROOT, "f").unwrap();
    assert_eq!(f.c.getattr(again.nodeid).unwrap().attr.size, 1);
    // Forgetting the root or unknown nodes is harmless.
    f.c.forget(ROOT, 100);
    f.c.forget(0xdead_beef, 1);
    f.c.getattr(ROOT).unwrap();
}

#[test]
fn several_shares_are_several_devices() {
    let (d1, d2) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    fs::write(d1.as_path().join("one"), b"1").unwrap();
    fs::write(d2.as_path().join("two"), b"22").unwrap();
    let shares = [
        ShareConfig::new("first", d1.as_path(), ShareOptions::default()).unwrap(),
        ShareConfig::new(
            "second",
            d2.as_path(),
            ShareOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap(),
    ];
    ShareConfig::check_unique_tags(&shares).unwrap();
    let mut c1 = FuseClient::new(Fs::new(shares[0].clone()).unwrap());
    let mut c2 = FuseClient::new(Fs::new(shares[1].clone()).unwrap());
    c1.init();
    c2.init();
    assert_eq!(c1.lookup(ROOT, "one").unwrap().attr.size, 1);
    assert_eq!(c1.lookup(ROOT, "two").unwrap_err(), libc::ENOENT);
    assert_eq!(c2.lookup(ROOT, "two").unwrap().attr.size, 2);
    assert_eq!(c2.mkdir(ROOT, "x", 0o755).unwrap_err(), libc::EROFS);
    c1.mkdir(ROOT, "x", 0o755).unwrap();
    assert!(d1.as_path().join("x").is_dir());
}

#[test]
fn reset_starts_a_fresh_session() {
    let mut f = rw();
    fs::write(f.host("f"), b"abc").unwrap();
    let e = f.c.lookup(ROOT, "f").unwrap();
    let state = f.c.drv.transport.state();
    assert_eq!(state.status, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    f.c.drv.write32(regs::STATUS, 0);
    assert_eq!(f.c.drv.status(), 0);
    // Reactivate; the old node ID is unknown to the new session.
    f.c.drv
        .activate(features::bit(features::VIRTIO_F_VERSION_1), 32);
    f.c.init();
    assert!(f.c.getattr(e.nodeid).is_err());
    assert_eq!(f.c.lookup(ROOT, "f").unwrap().attr.size, 3);
}

#[test]
fn activation_fails_cleanly_when_the_directory_is_gone() {
    let dir = TempDir::new().unwrap();
    let sub = dir.as_path().join("gone");
    fs::create_dir(&sub).unwrap();
    let fs_dev = device(&sub, TAG, ShareOptions::default());
    fs::remove_dir(&sub).unwrap();
    let mut drv = crate::virtio::test_utils::MmioDriver::new(Box::new(fs_dev), 1 << 20);
    drv.negotiate(features::bit(features::VIRTIO_F_VERSION_1))
        .unwrap();
    drv.setup_queues(16);
    drv.add_status(DRIVER_OK);
    let status = drv.status();
    assert_eq!(status & DRIVER_OK, 0);
    assert_ne!(status & DEVICE_NEEDS_RESET, 0);
}

// ---- Hostile guest: bad FUSE requests ------------------------------------------------

#[test]
fn unknown_opcodes_get_enosys() {
    let mut f = rw();
    for opcode in [0u32, 9999, 51, u32::MAX] {
        let h = InHeader {
            len: 40,
            opcode,
            unique: 9,
            nodeid: ROOT,
            ..Default::default()
        };
        let (used, out) = f.c.send_raw(REQUEST_QUEUE, &[h.as_slice()], &[16, 64]);
        let r = parse_reply(used, &out);
        assert_eq!(r.header.error, -libc::ENOSYS, "opcode {opcode}");
        assert_eq!(r.header.unique, 9);
    }
    f.c.getattr(ROOT).unwrap();
}

/// Sends raw readable bytes as one descriptor with a `reply`-byte reply descriptor.
fn raw(f: &mut Fixture, msg: &[u8], reply: u32) -> (u32, Vec<u8>) {
    f.c.send_raw(REQUEST_QUEUE, &[msg], &[reply])
}

fn header(opcode: Opcode, nodeid: u64, len: u32, unique: u64) -> InHeader {
    InHeader {
        len,
        opcode: opcode as u32,
        unique,
        nodeid,
        ..Default::default()
    }
}

fn error_of(used: u32, out: &[u8]) -> i32 {
    -parse_reply(used, out).header.error
}

/// A header followed by `tail`, as one buffer.
fn message(h: InHeader, tail: &[u8]) -> Vec<u8> {
    let mut msg = h.as_slice().to_vec();
    msg.extend_from_slice(tail);
    msg
}

#[test]
fn truncated_headers_and_lying_lengths() {
    let mut f = rw();
    let getattr = header(Opcode::Getattr, ROOT, 40, 5);
    let mut setxattr = Vec::new();
    setxattr.extend_from_slice(&100u32.to_le_bytes()); // size, but 3 bytes follow
    setxattr.extend_from_slice(&0u32.to_le_bytes());
    setxattr.extend_from_slice(b"user.x\0abc");
    // (what, request, the errno, or None for "some error")
    let cases: Vec<(&str, Vec<u8>, Option<i32>)> = vec![
        (
            "shorter than a fuse_in_header (answered by the device)",
            getattr.as_slice()[..20].to_vec(),
            Some(libc::EINVAL),
        ),
        (
            "GETATTR without its getattr_in",
            message(getattr, b""),
            None,
        ),
        (
            "LOOKUP whose len promises a longer name",
            message(header(Opcode::Lookup, ROOT, 4000, 7), b"f\0"),
            Some(libc::EINVAL),
        ),
        (
            "len smaller than the header itself",
            message(header(Opcode::Lookup, ROOT, 10, 8), b"f\0"),
            Some(libc::EINVAL),
        ),
        (
            "huge len: refused before anything is allocated",
            message(header(Opcode::Lookup, ROOT, u32::MAX, 9), b"f\0"),
            Some(libc::ENOMEM),
        ),
        (
            "a name without its NUL",
            message(header(Opcode::Lookup, ROOT, 43, 10), b"abc"),
            Some(libc::EINVAL),
        ),
        (
            "FUSE_INIT with a truncated init_in",
            message(header(Opcode::Init, 0, 48, 11), &[7, 0, 0, 0]),
            Some(libc::EINVAL),
        ),
        (
            "SETXATTR whose size does not match the value",
            message(header(Opcode::Setxattr, ROOT, 58, 12), &setxattr),
            None,
        ),
    ];
    for (what, msg, want) in cases {
        let (used, out) = raw(&mut f, &msg, 256);
        let err = error_of(used, &out);
        match want {
            Some(errno) => assert_eq!(err, errno, "{what}"),
            None => assert_ne!(err, 0, "{what}"),
        }
    }
    f.c.getattr(ROOT).unwrap();
}

#[test]
fn bad_node_ids_and_handles() {
    let mut f = rw();
    for node in [0u64, 2, 0xdead_beef, 1 << 56, (7 << 56) | 1, u64::MAX] {
        assert!(f.c.getattr(node).is_err(), "getattr {node:#x}");
        assert!(f.c.lookup(node, "x").is_err(), "lookup {node:#x}");
        assert!(f.c.mkdir(node, "x", 0o755).is_err(), "mkdir {node:#x}");
        assert!(
            f.c.readdir(node, 0, 0, 4096, true).is_err(),
            "readdir {node:#x}"
        );
    }
    fs::write(f.host("f"), b"x").unwrap();
    let e = f.c.lookup(ROOT, "f").unwrap();
    for fh in [0u64, 12345, u64::MAX] {
        assert!(f.c.read(e.nodeid, fh, 0, 16).is_err());
        assert!(f.c.write(e.nodeid, fh, 0, b"y").is_err());
        let _ = f.c.release(e.nodeid, fh, false);
    }
    assert_eq!(fs::read(f.host("f")).unwrap(), b"x");
    f.c.getattr(ROOT).unwrap();
}

#[test]
fn names_cannot_escape_the_share() {
    let outer = TempDir::new().unwrap();
    fs::write(outer.as_path().join("secret"), b"host only").unwrap();
    let inner = outer.as_path().join("share");
    fs::create_dir(&inner).unwrap();
    fs::write(inner.join("f"), b"shared").unwrap();
    let mut c = FuseClient::new(device(&inner, TAG, ShareOptions::default()));
    c.init();

    for name in ["../secret", "/etc/passwd", "a/b", "..//secret"] {
        assert_eq!(c.lookup(ROOT, name).unwrap_err(), libc::EINVAL, "{name}");
        assert_eq!(
            c.mkdir(ROOT, name, 0o755).unwrap_err(),
            libc::EINVAL,
            "{name}"
        );
        assert_eq!(
            c.create(ROOT, name, libc::O_RDWR as u32, 0o644)
                .unwrap_err(),
            libc::EINVAL,
            "{name}"
        );
        assert_eq!(c.symlink(ROOT, name, "x").unwrap_err(), libc::EINVAL);
    }
    for name in [".", ".."] {
        assert!(c.mkdir(ROOT, name, 0o755).is_err());
        assert!(c.unlink(ROOT, name).is_err());
        assert!(c.rename(ROOT, "f", ROOT, name).is_err());
    }
    // ".." of the root is the root.
    let up = c.lookup(ROOT, "..").unwrap();
    assert_eq!(c.lookup(up.nodeid, "secret").unwrap_err(), libc::ENOENT);
    assert_eq!(c.lookup(up.nodeid, "f").unwrap().attr.size, 6);
    let upup = c.lookup(up.nodeid, "..").unwrap();
    assert_eq!(c.lookup(upup.nodeid, "secret").unwrap_err(), libc::ENOENT);
    // A directory's ".." inside the share is its parent, still inside.
    let sub = c.mkdir(ROOT, "sub", 0o755).unwrap();
    let back = c.lookup(sub.nodeid, "..").unwrap();
    assert_eq!(c.lookup(back.nodeid, "f").unwrap().attr.size, 6);
    // Symlinks pointing out are just data: the server never follows them.
    c.symlink(ROOT, "esc", "..").unwrap();
    c.symlink(ROOT, "abs", "/etc").unwrap();
    let esc = c.lookup(ROOT, "esc").unwrap();
    let abs = c.lookup(ROOT, "abs").unwrap();
    assert_eq!(c.lookup(esc.nodeid, "secret").unwrap_err(), libc::ENOTDIR);
    assert_eq!(c.lookup(abs.nodeid, "passwd").unwrap_err(), libc::ENOTDIR);
    assert!(c.opendir(abs.nodeid).is_err());
    // A hard link to a file outside cannot be named: LINK takes node IDs we handed out.
    assert_eq!(
        fs::read(outer.as_path().join("secret")).unwrap(),
        b"host only"
    );
}

#[test]
fn huge_sizes_are_bounded_by_the_buffers() {
    let mut f = rw();
    fs::write(f.host("f"), pattern(8192, 9)).unwrap();
    let e = f.c.lookup(ROOT, "f").unwrap();
    let o = f.c.open(e.nodeid, libc::O_RDWR as u32).unwrap();
    // READ asking for more than the reply buffer holds: an error, no overflow.
    let a = ReadIn {
        fh: o.fh,
        size: u32::MAX,
        ..Default::default()
    };
    let h =
        f.c.header(Opcode::Read, e.nodeid, std::mem::size_of::<ReadIn>());
    let (used, out) =
        f.c.send_raw(REQUEST_QUEUE, &[h.as_slice(), a.as_slice()], &[16, 4096]);
    assert_ne!(error_of(used, &out), 0);
    // WRITE claiming more data than it carries: a short write of what is there.
    let w = WriteIn {
        fh: o.fh,
        offset: 100,
        size: 1 << 20,
        ..Default::default()
    };
    let h =
        f.c.header(Opcode::Write, e.nodeid, std::mem::size_of::<WriteIn>() + 10);
    let (used, out) = f.c.send_raw(
        REQUEST_QUEUE,
        &[h.as_slice(), w.as_slice(), &[1u8; 10]],
        &[16, 8],
    );
    let reply = parse_reply(used, &out);
    let written = match reply.check() {
        Ok(()) => test_client::parse::<WriteOut>(&reply.body).size as usize,
        Err(_) => 0,
    };
    assert!(written <= 10);
    let mut want = pattern(8192, 9);
    want[100..100 + written].fill(1);
    assert_eq!(fs::read(f.host("f")).unwrap(), want);
    // GETXATTR/LISTXATTR with a 4 GiB size: clamped, not allocated.
    f.c.setxattr(e.nodeid, "user.a", b"v", 0).unwrap();
    let g = GetxattrIn {
        size: u32::MAX,
        padding: 0,
    };
    let name = test_client::cstr("user.a");
    let h = f.c.header(Opcode::Getxattr, e.nodeid, 8 + name.len());
    let (used, out) = f.c.send_raw(
        REQUEST_QUEUE,
        &[h.as_slice(), g.as_slice(), &name],
        &[16, 4096],
    );
    let r = parse_reply(used, &out);
    assert_eq!((r.header.error, r.body.as_slice()), (0, &b"v"[..]));
    let h = f.c.header(Opcode::Listxattr, e.nodeid, 8);
    let (used, out) =
        f.c.send_raw(REQUEST_QUEUE, &[h.as_slice(), g.as_slice()], &[16, 4096]);
    let r = parse_reply(used, &out);
    assert_eq!(r.header.error, 0);
    assert!(r.body.split(|&b| b == 0).any(|n| n == b"user.a"));
    // READDIR asking for more than the buffer: refused.
    let d = f.c.opendir(ROOT).unwrap();
    let a = ReadIn {
        fh: d.fh,
        size: u32::MAX,
        ..Default::default()
    };
    let h =
        f.c.header(Opcode::Readdirplus, ROOT, std::mem::size_of::<ReadIn>());
    let (used, out) =
        f.c.send_raw(REQUEST_QUEUE, &[h.as_slice(), a.as_slice()], &[16, 4096]);
    assert_eq!(error_of(used, &out), libc::ENOMEM);
    // BATCH_FORGET claiming 2^32 entries: dropped without a reply, no allocation.
    let mut msg = header(Opcode::BatchForget, 0, 48, 3).as_slice().to_vec();
    msg.extend_from_slice(&u32::MAX.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    let (used, _) = f.c.send_raw(HIPRIO_QUEUE, &[&msg], &[]);
    assert_eq!(used, 0);
    f.c.getattr(ROOT).unwrap();
}

#[test]
fn replies_that_do_not_fit() {
    let mut f = rw();
    let g = GetattrIn::default();
    let h =
        f.c.header(Opcode::Getattr, ROOT, std::mem::size_of::<GetattrIn>());
    // Room for the header only: answered with EIO.
    let (used, out) =
        f.c.send_raw(REQUEST_QUEUE, &[h.as_slice(), g.as_slice()], &[16]);
    assert_eq!(used, 16);
    let r: OutHeader = test_client::parse(&out);
    assert_eq!((r.error, r.unique), (-libc::EIO, h.unique));
    // Room for less than a header: returned unanswered.
    let (used, _) =
        f.c.send_raw(REQUEST_QUEUE, &[h.as_slice(), g.as_slice()], &[8]);
    assert_eq!(used, 0);
    // No reply part at all.
    let (used, _) =
        f.c.send_raw(REQUEST_QUEUE, &[h.as_slice(), g.as_slice()], &[]);
    assert_eq!(used, 0);
    let a: AttrOut = f.c.getattr(ROOT).unwrap();
    assert_eq!(a.attr.mode & libc::S_IFMT, libc::S_IFDIR);
}

#[test]
fn fuzzed_requests_never_break_the_device() {
    let mut f = rw();
    fs::write(f.host("file"), b"data").unwrap();
    fs::create_dir(f.host("dir")).unwrap();
    let file = f.c.lookup(ROOT, "file").unwrap().nodeid;
    let dir = f.c.lookup(ROOT, "dir").unwrap().nodeid;
    let nodes = [0, ROOT, file, dir, file + 1, 1 << 56, u64::MAX];
    let names: [&[u8]; 6] = [b"file\0", b"dir\0", b"..\0", b"x/y\0", b"new\0", b""];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..1500u64 {
        // Opcodes 1..=52 and a few beyond, but no DESTROY (which ends the session).
        let mut opcode = (rand() % 56) as u32 + 1;
        if opcode == Opcode::Destroy as u32 {
            opcode = Opcode::Getattr as u32;
        }
        let mut args = vec![0u8; (rand() % 96) as usize];
        for b in args.iter_mut() {
            *b = rand().to_le_bytes()[0];
        }
        args.extend_from_slice(names[usize::try_from(rand()).unwrap() % names.len()]);
        let len = match rand() % 4 {
            0 => (rand() & 0xffff_ffff) as u32,
            _ => len32(40 + args.len()),
        };
        let h = InHeader {
            len,
            opcode,
            unique: i,
            nodeid: nodes[usize::try_from(rand()).unwrap() % nodes.len()],
            uid: [0, 1000, u32::MAX][(rand() % 3) as usize],
            gid: 0,
            pid: 1,
            padding: 0,
        };
        let reply = [0u32, 8, 16, 256, 4096][(rand() % 5) as usize];
        let q = if rand() % 8 == 0 {
            HIPRIO_QUEUE
        } else {
            REQUEST_QUEUE
        };
        let writable: Vec<u32> = if reply == 0 { vec![] } else { vec![reply] };
        f.c.send_raw(q, &[h.as_slice(), &args], &writable);
    }
    assert_eq!(f.c.drv.status() & DEVICE_NEEDS_RESET, 0);
    f.c.getattr(ROOT).unwrap();
    // Nothing outside the share was touched.
    assert!(f.dir.as_path().exists());
}

// ---- Hostile guest: bad descriptor chains and rings ----------------------------------

const N: u16 = DESC_NEXT;
const W: u16 = DESC_WRITE;

/// Stores raw descriptors at table index 0.., makes `head` available on the request queue
/// and kicks; then a good GETATTR proves the device still serves. Returns the used entries
/// seen before the good request's.
fn submit_raw(f: &mut Fixture, descs: &[Descriptor], head: u16) -> Vec<(u32, u32)> {
    let mem = f.c.drv.mem.clone();
    let q = &mut f.c.drv.queues[REQUEST_QUEUE];
    q.store_raw(&mem, 0, descs);
    q.set_used_event(&mem, q.used_idx(&mem));
    q.make_available(&mem, head);
    f.c.drv.kick_queue(REQUEST_QUEUE);
    let used = f.c.wait_used(REQUEST_QUEUE, REPLY_TIMEOUT);
    f.c.getattr(ROOT).unwrap();
    used
}

fn getattr_request(f: &mut Fixture) -> (GuestAddress, GuestAddress) {
    let g = GetattrIn::default();
    let h = header(Opcode::Getattr, ROOT, 56, 77);
    let req = f.c.drv.alloc(56);
    let mut msg = h.as_slice().to_vec();
    msg.extend_from_slice(g.as_slice());
    f.c.drv.write_mem(req, &msg);
    let reply = f.c.drv.alloc(256);
    f.c.drv.write_mem(reply, &[0xff; 256]);
    (req, reply)
}

#[test]
fn malformed_chains_are_dropped_or_answered() {
    let mut f = rw();
    // Make the table index space predictable: one chain at a time from index 0.
    let (req, reply) = getattr_request(&mut f);

    // A loop: 0 -> 1 -> 0.
    let used = submit_raw(
        &mut f,
        &[
            Descriptor::new(req.0, 56, N, 1),
            Descriptor::new(reply.0, 256, W | N, 0),
        ],
        0,
    );
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(f.c.drv.read_mem(reply, 4), [0xff; 4], "nothing written");

    // Next index past the table.
    let used = submit_raw(&mut f, &[Descriptor::new(req.0, 56, N, 999)], 0);
    assert_eq!(used, vec![(0, 0)]);

    // Readable after writable.
    let used = submit_raw(
        &mut f,
        &[
            Descriptor::new(req.0, 56, N, 1),
            Descriptor::new(reply.0, 128, W | N, 2),
            Descriptor::new(req.0, 8, 0, 0),
        ],
        0,
    );
    assert_eq!(used, vec![(0, 0)]);

    // Reply buffer outside guest memory.
    let used = submit_raw(
        &mut f,
        &[
            Descriptor::new(req.0, 56, N, 1),
            Descriptor::new(1 << 40, 256, W, 0),
        ],
        0,
    );
    assert_eq!(used, vec![(0, 0)]);

    // Request outside guest memory: answered with EINVAL.
    f.c.drv.write_mem(reply, &[0xff; 256]);
    let used = submit_raw(
        &mut f,
        &[
            Descriptor::new(u64::MAX - 16, 56, N, 1),
            Descriptor::new(reply.0, 256, W, 0),
        ],
        0,
    );
    assert_eq!(used, vec![(0, 16)]);
    let out: OutHeader = test_client::parse(&f.c.drv.read_mem(reply, 16));
    assert_eq!(out.error, -libc::EINVAL);

    // Overlapping descriptors adding up to gigabytes: dropped.
    let mut descs = vec![Descriptor::new(req.0, 56, N, 1)];
    for i in 1..40u16 {
        descs.push(Descriptor::new(0, 0x10_0000, W | N, i + 1));
    }
    descs.last_mut().unwrap().set_flags(W);
    let used = submit_raw(&mut f, &descs, 0);
    assert_eq!(used, vec![(0, 0)]);

    // A head index beyond the queue cannot even be returned.
    let q = &mut f.c.drv.queues[REQUEST_QUEUE];
    q.make_available(&f.c.drv.mem, 4000);
    let _ = f.c.drv.queues[REQUEST_QUEUE].take_used(&f.c.drv.mem);
    f.c.getattr(ROOT).unwrap();
    assert_eq!(f.c.drv.status() & DEVICE_NEEDS_RESET, 0);
}

#[test]
fn indirect_descriptors_work() {
    let mut f = rw();
    let (req, reply) = getattr_request(&mut f);
    let table = f.c.drv.alloc(32);
    for (i, d) in [
        Descriptor::new(req.0, 56, N, 1),
        Descriptor::new(reply.0, 256, W, 0),
    ]
    .iter()
    .enumerate()
    {
        f.c.drv.write_mem(
            GuestAddress(table.0 + 16 * i as u64),
            virtio_queue::desc::RawDescriptor::from(*d).as_slice(),
        );
    }
    let indirect = DESC_INDIRECT;
    let used = submit_raw(&mut f, &[Descriptor::new(table.0, 32, indirect, 0)], 0);
    let len = size32::<OutHeader>() + size32::<AttrOut>();
    assert_eq!(used, vec![(0, len)]);
    let out: OutHeader = test_client::parse(&f.c.drv.read_mem(reply, 16));
    assert_eq!((out.error, out.unique, out.len), (0, 77, len));
}

#[test]
fn lying_available_index_needs_reset() {
    let mut f = rw();
    f.c.drv.take_irqs();
    f.c.drv.queues[REQUEST_QUEUE].set_avail_idx(&f.c.drv.mem, 5000);
    f.c.drv.kick_queue(REQUEST_QUEUE);
    // The worker raises a config-change interrupt with NEEDS_RESET.
    let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
    while f.c.drv.status() & DEVICE_NEEDS_RESET == 0 {
        assert!(std::time::Instant::now() < deadline, "no NEEDS_RESET");
        f.c.drv.run_events(0);
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(f.c.drv.irq_event()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
    }
    assert_ne!(f.c.drv.ack_interrupt() & INT_CONFIG_CHANGE, 0);
    // Kicks are ignored until the reset; then it works again with a fresh session.
    f.c.drv.kick_queue(REQUEST_QUEUE);
    f.c.drv.run_events(0);
    f.c.drv
        .activate(features::bit(features::VIRTIO_F_VERSION_1), 32);
    assert_eq!(f.c.drv.status() & DEVICE_NEEDS_RESET, 0);
    f.c.init();
    f.c.getattr(ROOT).unwrap();
}

#[test]
fn requests_queued_before_driver_ok_are_served() {
    let dir = TempDir::new().unwrap();
    let dev = device(dir.as_path(), TAG, ShareOptions::default());
    let mut drv =
        crate::virtio::test_utils::MmioDriver::new(Box::new(dev), test_client::CLIENT_MEM);
    drv.negotiate(features::bit(features::VIRTIO_F_VERSION_1))
        .unwrap();
    drv.setup_queues(16);
    let mut c = FuseClient::with_driver(drv);
    // Queue a GETATTR and kick (ignored before DRIVER_OK), then DRIVER_OK.
    let g = GetattrIn::default();
    let h = c.header(Opcode::Getattr, ROOT, std::mem::size_of::<GetattrIn>());
    let req = c.drv.alloc(56);
    let mut msg = h.as_slice().to_vec();
    msg.extend_from_slice(g.as_slice());
    c.drv.write_mem(req, &msg);
    let reply = c.drv.alloc(256);
    let bufs: [Buf; 2] = [(req, 56, false), (reply, 256, true)];
    c.submit(REQUEST_QUEUE, &bufs);
    c.drv.add_status(DRIVER_OK);
    let used = c.wait_used(REQUEST_QUEUE, REPLY_TIMEOUT);
    assert_eq!(used.len(), 1);
    let out: OutHeader = test_client::parse(&c.drv.read_mem(reply, 16));
    assert_eq!((out.error, out.unique), (0, h.unique));
}

#[test]
fn state_reports_config_and_live_queues() {
    let dir = TempDir::new().unwrap();
    let fs_dev = device(
        dir.as_path(),
        "st",
        ShareOptions {
            cache: CachePolicy::Never,
            ..Default::default()
        },
    );
    let state = fs_dev.state();
    assert_eq!(state.options.cache, CachePolicy::Never);
    assert_eq!(state.acked_features, 0);
    assert_eq!(state.queues, None);
    // The cache policy reaches the guest: cache=never -> zero timeouts.
    let mut c = FuseClient::new(fs_dev);
    c.init();
    fs::write(dir.as_path().join("f"), b"1").unwrap();
    let e = c.lookup(ROOT, "f").unwrap();
    assert_eq!((e.entry_valid, e.attr_valid), (0, 0));
    let o = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_ne!(o.open_flags & 1, 0, "FOPEN_DIRECT_IO");
    let mmio = c.drv.transport.state();
    assert!(mmio.queues.iter().all(|q| q.ready));
}

#[test]
fn large_offsets_and_sparse_files() {
    let mut f = rw();
    let (e, o) = f.c.create(ROOT, "big", libc::O_RDWR as u32, 0o644).unwrap();
    let at = 5u64 << 30;
    let data = pattern(4096, 5);
    assert_eq!(f.c.write(e.nodeid, o.fh, at, &data), Ok(4096));
    assert_eq!(f.c.getattr(e.nodeid).unwrap().attr.size, at + 4096);
    assert_eq!(f.c.read(e.nodeid, o.fh, at, 4096).unwrap(), data);
    assert_eq!(
        f.c.read(e.nodeid, o.fh, at - 4096, 4096).unwrap(),
        vec![0; 4096]
    );
    let m = fs::metadata(f.host("big")).unwrap();
    assert_eq!(m.len(), at + 4096);
    assert!(m.blocks() * 512 < 1 << 20, "sparse on the host");
    // Truncate back down.
    let a =
        f.c.setattr(
            e.nodeid,
            SetattrIn {
                size: 1,
                ..setattr_in(FATTR_SIZE)
            },
        )
        .unwrap();
    assert_eq!(a.attr.size, 1);
}

#[test]
fn unmount_and_mount_again_without_a_reset() {
    let mut f = rw();
    fs::write(f.host("f"), b"abc").unwrap();
    f.c.lookup(ROOT, "f").unwrap();
    // FUSE_DESTROY (Linux sends it at umount), then a new FUSE_INIT.
    let r = f.c.call(Opcode::Destroy, 0, &[], 0);
    assert_eq!(r.check(), Ok(()));
    f.c.init();
    assert_eq!(f.c.lookup(ROOT, "f").unwrap().attr.size, 3);
}

/// The process's umask as the kernel reports it (`/proc/self/status`, Linux ≥ 4.7).
fn process_umask() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
}

#[test]
fn the_process_umask_is_left_alone() {
    let before = process_umask();
    let mut f = rw();
    f.c.mkdir(ROOT, "d", 0o777).unwrap();
    assert_eq!(process_umask(), before, "fuse-backend-rs' umask(0) leaked");
}

#[test]
fn restore_serves_this_vms_directory_with_the_saved_queues() {
    let mut f = rw();
    fs::write(f.host("f"), b"abc").unwrap();
    f.c.lookup(ROOT, "f").unwrap();
    let saved = f.c.drv.transport.save();
    assert_eq!(saved.in_flight(), None);
    let json = serde_json::to_string(&saved).unwrap();
    let loaded: crate::virtio::MmioPersist = serde_json::from_str(&json).unwrap();
    assert_eq!(loaded, saved);

    // The clone's share is another directory under the same tag.
    let clone_dir = TempDir::new().unwrap();
    fs::write(clone_dir.as_path().join("g"), b"clone").unwrap();
    let dev = device(clone_dir.as_path(), TAG, ShareOptions::default());
    let restored = f.c.drv.restore(Box::new(dev), &loaded).unwrap();
    let mut expected = saved.clone();
    let crate::virtio::DeviceState::Fs(s) = &mut expected.device else {
        unreachable!()
    };
    s.dir = clone_dir.as_path().into();
    assert_eq!(restored.transport.save(), expected);

    // The guest mounts again (a new FUSE session) and sees this VM's directory.
    f.c.drv = restored;
    f.c.init();
    assert_eq!(f.c.lookup(ROOT, "g").unwrap().attr.size, 5);
    assert!(f.c.lookup(ROOT, "f").is_err());

    let other = device(clone_dir.as_path(), "other-tag", ShareOptions::default());
    let err = f.c.drv.restore(Box::new(other), &loaded).err().unwrap();
    assert!(err.to_string().contains("tag"), "{err}");
}

/// A READ or WRITE carrying file flags the host fd refuses (`O_DIRECT` on a ramfs, which
/// has no direct I/O) must leave the handle's fd open: fuse-backend-rs closes it on that
/// error path, and the handle's release then closes whatever reused the number.
#[test]
fn flags_the_host_fd_refuses_leave_the_handle_open() {
    let dir = TempDir::new().unwrap();
    let mnt = dir.as_path().join("ramfs");
    fs::create_dir(&mnt).unwrap();
    let target = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated strings that outlive the call; no mount data.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"ramfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        eprintln!(
            "SKIPPED flags_the_host_fd_refuses_leave_the_handle_open: cannot mount a ramfs \
             ({}); run as root",
            std::io::Error::last_os_error()
        );
        return;
    }
    struct Unmount(std::ffi::CString);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // SAFETY: a NUL-terminated path; detaching needs nothing else.
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _unmount = Unmount(target);
    fs::write(mnt.join("f"), b"ramfs data").unwrap();
    let mut c = FuseClient::new(device(&mnt, TAG, ShareOptions::default()));
    c.init();
    let e = c.lookup(ROOT, "f").unwrap();
    let o = c.open(e.nodeid, libc::O_RDWR as u32).unwrap();
    let direct = (libc::O_RDWR | libc::O_DIRECT) as u32;
    for _ in 0..2 {
        let a = ReadIn {
            fh: o.fh,
            size: 64,
            flags: direct,
            ..Default::default()
        };
        let r = c.call(Opcode::Read, e.nodeid, &[a.as_slice()], 64);
        assert_eq!(r.check(), Ok(()), "READ with O_DIRECT");
        assert_eq!(r.body, b"ramfs data");
    }
    let w = WriteIn {
        fh: o.fh,
        size: 5,
        flags: direct | libc::O_NOATIME as u32,
        ..Default::default()
    };
    let r = c.call(Opcode::Write, e.nodeid, &[w.as_slice(), b"RAMFS"], 16);
    assert_eq!(r.check(), Ok(()), "WRITE with O_DIRECT | O_NOATIME");
    assert_eq!(c.read(e.nodeid, o.fh, 0, 64).unwrap(), b"RAMFS data");
    c.release(e.nodeid, o.fh, false).unwrap();
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"RAMFS data");
}

// ---- Bounds on what the guest holds open ------------------------------------------------

/// This process's descriptors of files at or below `dir` (other tests of the binary run
/// in parallel threads and open descriptors of their own meanwhile).
fn open_fds_under(dir: &Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| fs::read_link(e.path()).is_ok_and(|target| target.starts_with(dir)))
        .count()
}

#[test]
fn a_guest_holding_too_many_inodes_or_handles_gets_enfile_and_recovers() {
    let limits = limits::FsLimits {
        max_inodes: 500,
        max_handles: 50,
    };
    let mut f = share(ShareOptions {
        limits,
        ..Default::default()
    });
    let fds_before = open_fds_under(f.dir.as_path());
    // Create (and keep) far more files than the cap: the inode cap answers ENFILE, and the
    // file created on the host is not pinned.
    let mut kept = Vec::new();
    let mut refused = 0;
    for i in 0..2_000 {
        let name = format!("f{i}");
        match f.c.mknod(ROOT, &name, libc::S_IFREG | 0o644, 0) {
            Ok(e) => kept.push(e.nodeid),
            Err(e) => {
                assert_eq!(e, libc::ENFILE, "{name}");
                refused += 1;
            }
        }
    }
    assert!(kept.len() <= limits.max_inodes, "{} kept", kept.len());
    assert!(refused > 1_000, "{refused} refused");
    // Lookups of existing files are capped the same way.
    assert_eq!(f.c.lookup(ROOT, "f1999").unwrap_err(), libc::ENFILE);
    // The process's fds stayed bounded by the caps.
    let grown = open_fds_under(f.dir.as_path()).saturating_sub(fds_before);
    assert!(
        grown <= limits.max_inodes + limits.max_handles,
        "{grown} fds"
    );
    // READDIRPLUS at the cap: entries of inodes the guest holds still come; the listing
    // stops at the first new one (ENFILE when that is the first entry, rather than an
    // empty listing that would read as the end of the directory).
    let dir = f.c.opendir(ROOT).unwrap();
    let mut offset = 0;
    loop {
        match f.c.readdir(ROOT, dir.fh, offset, 64 << 10, true) {
            Ok(entries) => {
                assert!(
                    !entries.is_empty(),
                    "a listing cut short must not look like EOF"
                );
                for e in &entries {
                    let held = e.entry.is_some_and(|en| kept.contains(&en.nodeid))
                        || [&b"."[..], &b".."[..]].contains(&e.name.as_slice());
                    assert!(held, "a new inode was listed at the cap: {e:?}");
                }
                offset = entries.last().unwrap().off;
            }
            Err(e) => {
                assert_eq!(e, libc::ENFILE);
                break;
            }
        }
    }
    f.c.release(ROOT, dir.fh, true).unwrap();
    // Forgetting gives room back.
    for n in kept.drain(..) {
        f.c.forget(n, 1);
    }
    let e = f.c.lookup(ROOT, "f1999").unwrap();
    // Handles: open the same file more often than the cap.
    let mut handles = Vec::new();
    let mut refused = 0;
    for _ in 0..200 {
        match f.c.open(e.nodeid, libc::O_RDONLY as u32) {
            Ok(o) => handles.push(o.fh),
            Err(err) => {
                assert_eq!(err, libc::ENFILE);
                refused += 1;
            }
        }
    }
    assert_eq!(handles.len(), limits.max_handles);
    assert_eq!(refused, 200 - limits.max_handles);
    for h in handles {
        f.c.release(e.nodeid, h, false).unwrap();
    }
    let o = f.c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    f.c.release(e.nodeid, o.fh, false).unwrap();
}
