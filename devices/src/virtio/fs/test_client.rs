//! A small FUSE client for tests and benchmarks: it talks to a virtio-fs device through the
//! virtio-mmio transport with [`MmioDriver`], laying requests out as Linux's virtio-fs
//! driver does — device-readable descriptors for `fuse_in_header` and each argument,
//! device-writable ones for `fuse_out_header` and the reply (large data split in
//! [`DATA_SEGMENT`]-byte pieces) — and parses the replies. One request is in flight at a
//! time; request and reply buffers are allocated once and reused, so any number of requests
//! fit in the driver's guest memory.
//!
//! Helpers return `Err(errno)` (positive) for FUSE error replies and panic on protocol
//! breakage (they are test code).

use std::mem::size_of;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::*;
use vm_memory::{ByteValued, GuestAddress};

use super::{Fs, HIPRIO_QUEUE, REQUEST_QUEUE};
use crate::virtio::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::virtio::test_utils::{len32, size32, Buf, MmioDriver};

/// Guest memory for a client's driver.
pub const CLIENT_MEM: usize = 16 << 20;
/// Largest data descriptor (Linux uses one per page; fewer keep chains short).
pub const DATA_SEGMENT: u32 = 64 << 10;
/// Room for a request or a reply: 1 MiB of data and headers.
const AREA: u64 = (1 << 20) + 0x2000;
/// How long to wait for a reply before failing the test.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// FUSE protocol version the client speaks (what Linux 6.1 sends).
pub const CLIENT_MINOR: u32 = 36;

/// `FUSE_GETATTR_FH`, `FATTR_*` and friends the tests use.
pub mod flags {
    pub const FATTR_MODE: u32 = 1 << 0;
    pub const FATTR_UID: u32 = 1 << 1;
    pub const FATTR_GID: u32 = 1 << 2;
    pub const FATTR_SIZE: u32 = 1 << 3;
    /// What Linux 6.1 offers in FUSE_INIT (flags, flags2 below).
    pub const LINUX_INIT_FLAGS: u64 = 0x3fff_fffb;
}

/// A parsed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The used length the device reported.
    pub used: u32,
    pub header: OutHeader2,
    /// The bytes after the out header (`header.len - 16`, bounded by what was offered).
    pub body: Vec<u8>,
}

/// `fuse_out_header` with `PartialEq` (the ABI struct has none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutHeader2 {
    pub len: u32,
    pub error: i32,
    pub unique: u64,
}

impl Reply {
    /// The reply body as `T`, or the errno.
    pub fn into<T: ByteValued + Default>(self) -> Result<T, i32> {
        self.check()?;
        Ok(parse(&self.body))
    }

    /// `Ok(())` or the (positive) errno.
    pub fn check(&self) -> Result<(), i32> {
        if self.header.error != 0 {
            return Err(-self.header.error);
        }
        Ok(())
    }
}

/// Reads a `T` from the start of `bytes` (panics if too short).
pub fn parse<T: ByteValued + Default>(bytes: &[u8]) -> T {
    let mut t = T::default();
    let n = size_of::<T>();
    assert!(
        bytes.len() >= n,
        "reply body of {} bytes, want {n}",
        bytes.len()
    );
    t.as_mut_slice().copy_from_slice(&bytes[..n]);
    t
}

/// One directory entry of a READDIR(PLUS) reply.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub off: u64,
    pub type_: u32,
    /// READDIRPLUS only.
    pub entry: Option<EntryOut>,
}

/// A FUSE client over a virtio-fs device.
pub struct FuseClient {
    pub drv: MmioDriver,
    unique: u64,
    /// The uid/gid requests are sent as.
    pub uid: u32,
    pub gid: u32,
    in_area: GuestAddress,
    out_area: GuestAddress,
}

impl FuseClient {
    /// Wraps `fs` in a transport and activates it as Linux would (features, both queues).
    pub fn new(fs: Fs) -> FuseClient {
        let mut drv = MmioDriver::new(Box::new(fs), CLIENT_MEM);
        drv.activate(
            bit(VIRTIO_F_VERSION_1)
                | bit(VIRTIO_RING_F_INDIRECT_DESC)
                | bit(VIRTIO_RING_F_EVENT_IDX),
            64,
        );
        Self::with_driver(drv)
    }

    /// A client over an already active driver.
    pub fn with_driver(mut drv: MmioDriver) -> FuseClient {
        let in_area = drv.alloc(AREA);
        let out_area = drv.alloc(AREA);
        FuseClient {
            drv,
            unique: 0,
            uid: 0,
            gid: 0,
            in_area,
            out_area,
        }
    }

    /// The next request ID.
    pub fn next_unique(&mut self) -> u64 {
        self.unique += 2;
        self.unique
    }

    /// A `fuse_in_header` for `opcode` on `nodeid` with `arg_len` bytes of arguments.
    pub fn header(&mut self, opcode: Opcode, nodeid: u64, arg_len: usize) -> InHeader {
        InHeader {
            len: len32(size_of::<InHeader>() + arg_len),
            opcode: opcode as u32,
            unique: self.next_unique(),
            nodeid,
            uid: self.uid,
            gid: self.gid,
            pid: 1,
            padding: 0,
        }
    }

    /// Sends a chain on queue `q`: each of `readable` in its own device-readable descriptor,
    /// then device-writable descriptors of `writable` lengths (all zeroed first). Waits for
    /// the used entry; returns (used length, the writable bytes).
    pub fn send_raw(&mut self, q: usize, readable: &[&[u8]], writable: &[u32]) -> (u32, Vec<u8>) {
        let mut bufs: Vec<Buf> = Vec::new();
        let mut at = self.in_area.0;
        for piece in readable {
            assert!(
                at + piece.len() as u64 <= self.in_area.0 + AREA,
                "request too big"
            );
            self.drv.write_mem(GuestAddress(at), piece);
            bufs.push((GuestAddress(at), len32(piece.len()), false));
            at += piece.len() as u64;
        }
        let total: u64 = writable.iter().map(|&l| u64::from(l)).sum();
        assert!(total <= AREA, "reply area too small");
        self.drv
            .write_mem(self.out_area, &vec![0u8; usize::try_from(total).unwrap()]);
        let mut at = self.out_area.0;
        for &len in writable {
            bufs.push((GuestAddress(at), len, true));
            at += u64::from(len);
        }
        let head = self.submit(q, &bufs);
        let used = self.wait_used(q, REPLY_TIMEOUT);
        assert_eq!(used.len(), 1, "one request in flight");
        assert_eq!(used[0].0, u32::from(head), "used head");
        (
            used[0].1,
            self.drv
                .read_mem(self.out_area, usize::try_from(total).unwrap()),
        )
    }

    /// Adds a chain to queue `q`, asks for an interrupt at its completion (`used_event`, as
    /// Linux does when it waits) and kicks the queue. Returns the head index.
    pub fn submit(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let queue = &self.drv.queues[q];
        queue.set_used_event(&self.drv.mem, queue.used_idx(&self.drv.mem));
        self.drv.submit(q, bufs)
    }

    /// Waits until queue `q` has new used entries and returns them; panics after `timeout`
    /// (see [`MmioDriver::wait_used_irq`]).
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Vec<(u32, u32)> {
        self.drv.wait_used_irq(q, timeout)
    }

    /// Sends `opcode` on `nodeid` with `args` (each its own descriptor) and room for a reply
    /// of `reply_len` bytes after the out header; parses the reply.
    pub fn call(&mut self, opcode: Opcode, nodeid: u64, args: &[&[u8]], reply_len: u32) -> Reply {
        let arg_len = args.iter().map(|a| a.len()).sum();
        let h = self.header(opcode, nodeid, arg_len);
        let mut readable: Vec<&[u8]> = vec![h.as_slice()];
        readable.extend_from_slice(args);
        let mut writable = vec![size32::<OutHeader>()];
        let mut left = reply_len;
        while left > 0 {
            let n = left.min(DATA_SEGMENT);
            writable.push(n);
            left -= n;
        }
        let (used, out) = self.send_raw(REQUEST_QUEUE, &readable, &writable);
        let reply = parse_reply(used, &out);
        assert_eq!(reply.header.unique, h.unique, "reply to another request");
        reply
    }

    /// FUSE_INIT as Linux 6.1 sends it.
    pub fn init(&mut self) -> InitOut {
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: CLIENT_MINOR,
            max_readahead: 128 << 10,
            // The low halves (INIT_EXT is bit 30); flags2 has the high one.
            flags: ((flags::LINUX_INIT_FLAGS | FsOptions::INIT_EXT.bits()) & 0xffff_ffff) as u32,
        };
        let init2 = InitIn2 {
            flags2: (flags::LINUX_INIT_FLAGS >> 32) as u32,
            unused: [0; 11],
        };
        self.call(
            Opcode::Init,
            0,
            &[init.as_slice(), init2.as_slice()],
            size32::<InitOut>(),
        )
        .into()
        .expect("FUSE_INIT failed")
    }

    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let name = cstr(name);
        self.call(Opcode::Lookup, parent, &[&name], entry_len())
            .into()
    }

    pub fn forget(&mut self, nodeid: u64, nlookup: u64) {
        let h = self.header(Opcode::Forget, nodeid, size_of::<ForgetIn>());
        let f = ForgetIn { nlookup };
        // Linux: one device-readable buffer with header and argument, on hiprio.
        let mut msg = h.as_slice().to_vec();
        msg.extend_from_slice(f.as_slice());
        let (used, _) = self.send_raw(HIPRIO_QUEUE, &[&msg], &[]);
        assert_eq!(used, 0, "FORGET has no reply");
    }

    pub fn getattr(&mut self, nodeid: u64) -> Result<AttrOut, i32> {
        let a = GetattrIn::default();
        self.call(Opcode::Getattr, nodeid, &[a.as_slice()], attr_len())
            .into()
    }

    pub fn setattr(&mut self, nodeid: u64, attr: SetattrIn) -> Result<AttrOut, i32> {
        self.call(Opcode::Setattr, nodeid, &[attr.as_slice()], attr_len())
            .into()
    }

    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, i32> {
        let a = MkdirIn { mode, umask: 0o022 };
        let name = cstr(name);
        self.call(Opcode::Mkdir, parent, &[a.as_slice(), &name], entry_len())
            .into()
    }

    pub fn mknod(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        rdev: u32,
    ) -> Result<EntryOut, i32> {
        let a = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        let name = cstr(name);
        self.call(Opcode::Mknod, parent, &[a.as_slice(), &name], entry_len())
            .into()
    }

    /// FUSE_CREATE: (entry, open reply).
    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        flags: u32,
        mode: u32,
    ) -> Result<(EntryOut, OpenOut), i32> {
        let a = CreateIn {
            flags,
            mode,
            umask: 0o022,
            fuse_flags: 0,
        };
        let name = cstr(name);
        let r = self.call(
            Opcode::Create,
            parent,
            &[a.as_slice(), &name],
            size32::<EntryOut>() + size32::<OpenOut>(),
        );
        r.check()?;
        Ok((parse(&r.body), parse(&r.body[size_of::<EntryOut>()..])))
    }

    pub fn open(&mut self, nodeid: u64, flags: u32) -> Result<OpenOut, i32> {
        let a = OpenIn {
            flags,
            fuse_flags: 0,
        };
        self.call(Opcode::Open, nodeid, &[a.as_slice()], size32::<OpenOut>())
            .into()
    }

    pub fn opendir(&mut self, nodeid: u64) -> Result<OpenOut, i32> {
        let a = OpenIn {
            flags: libc::O_RDONLY as u32 | libc::O_DIRECTORY as u32,
            fuse_flags: 0,
        };
        self.call(
            Opcode::Opendir,
            nodeid,
            &[a.as_slice()],
            size32::<OpenOut>(),
        )
        .into()
    }

    pub fn release(&mut self, nodeid: u64, fh: u64, dir: bool) -> Result<(), i32> {
        let a = ReleaseIn {
            fh,
            ..Default::default()
        };
        let op = if dir {
            Opcode::Releasedir
        } else {
            Opcode::Release
        };
        self.call(op, nodeid, &[a.as_slice()], 0).check()
    }

    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let a = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let r = self.call(Opcode::Read, nodeid, &[a.as_slice()], size);
        r.check()?;
        Ok(r.body)
    }

    /// FUSE_WRITE with the data in [`DATA_SEGMENT`]-byte descriptors; returns the count.
    pub fn write(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let a = WriteIn {
            fh,
            offset,
            size: len32(data.len()),
            ..Default::default()
        };
        let mut args: Vec<&[u8]> = vec![a.as_slice()];
        args.extend(data.chunks(DATA_SEGMENT as usize));
        let out: WriteOut = self
            .call(Opcode::Write, nodeid, &args, size32::<WriteOut>())
            .into()?;
        Ok(out.size)
    }

    pub fn fsync(&mut self, nodeid: u64, fh: u64) -> Result<(), i32> {
        let a = FsyncIn {
            fh,
            ..Default::default()
        };
        self.call(Opcode::Fsync, nodeid, &[a.as_slice()], 0).check()
    }

    /// READDIR or READDIRPLUS of up to `size` bytes from `offset`, parsed.
    pub fn readdir(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    ) -> Result<Vec<DirEntry>, i32> {
        let a = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let op = if plus {
            Opcode::Readdirplus
        } else {
            Opcode::Readdir
        };
        let r = self.call(op, nodeid, &[a.as_slice()], size);
        r.check()?;
        Ok(parse_dirents(&r.body, plus))
    }

    pub fn rename(
        &mut self,
        olddir: u64,
        oldname: &str,
        newdir: u64,
        newname: &str,
    ) -> Result<(), i32> {
        let a = RenameIn { newdir };
        let (o, n) = (cstr(oldname), cstr(newname));
        self.call(Opcode::Rename, olddir, &[a.as_slice(), &o, &n], 0)
            .check()
    }

    pub fn unlink(&mut self, parent: u64, name: &str) -> Result<(), i32> {
        let name = cstr(name);
        self.call(Opcode::Unlink, parent, &[&name], 0).check()
    }

    pub fn rmdir(&mut self, parent: u64, name: &str) -> Result<(), i32> {
        let name = cstr(name);
        self.call(Opcode::Rmdir, parent, &[&name], 0).check()
    }

    pub fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Result<EntryOut, i32> {
        let (n, t) = (cstr(name), cstr(target));
        self.call(Opcode::Symlink, parent, &[&n, &t], entry_len())
            .into()
    }

    pub fn readlink(&mut self, nodeid: u64) -> Result<Vec<u8>, i32> {
        let r = self.call(Opcode::Readlink, nodeid, &[], 4096);
        r.check()?;
        Ok(r.body)
    }

    pub fn link(&mut self, oldnodeid: u64, newparent: u64, newname: &str) -> Result<EntryOut, i32> {
        let a = LinkIn { oldnodeid };
        let n = cstr(newname);
        self.call(Opcode::Link, newparent, &[a.as_slice(), &n], entry_len())
            .into()
    }

    pub fn setxattr(
        &mut self,
        nodeid: u64,
        name: &str,
        value: &[u8],
        flags: u32,
    ) -> Result<(), i32> {
        let a = SetxattrIn {
            size: len32(value.len()),
            flags,
        };
        let n = cstr(name);
        self.call(Opcode::Setxattr, nodeid, &[a.as_slice(), &n, value], 0)
            .check()
    }

    /// GETXATTR with a `size`-byte buffer: the value (or, for size 0, its length as LE u32).
    pub fn getxattr(&mut self, nodeid: u64, name: &str, size: u32) -> Result<Vec<u8>, i32> {
        let a = GetxattrIn { size, padding: 0 };
        let n = cstr(name);
        let reply_len = if size == 0 {
            size32::<GetxattrOut>()
        } else {
            size
        };
        let r = self.call(Opcode::Getxattr, nodeid, &[a.as_slice(), &n], reply_len);
        r.check()?;
        Ok(r.body)
    }

    pub fn listxattr(&mut self, nodeid: u64, size: u32) -> Result<Vec<u8>, i32> {
        let a = GetxattrIn { size, padding: 0 };
        let r = self.call(Opcode::Listxattr, nodeid, &[a.as_slice()], size.max(8));
        r.check()?;
        Ok(r.body)
    }

    pub fn statfs(&mut self) -> Result<Kstatfs, i32> {
        self.call(Opcode::Statfs, 1, &[], size32::<Kstatfs>())
            .into()
    }

    pub fn access(&mut self, nodeid: u64, mask: u32) -> Result<(), i32> {
        let a = AccessIn { mask, padding: 0 };
        self.call(Opcode::Access, nodeid, &[a.as_slice()], 0)
            .check()
    }
}

fn entry_len() -> u32 {
    size32::<EntryOut>()
}

fn attr_len() -> u32 {
    size32::<AttrOut>()
}

/// `name` with its NUL.
pub fn cstr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

/// Parses the writable bytes of a reply (the device's used length is informational).
pub fn parse_reply(used: u32, out: &[u8]) -> Reply {
    let h: OutHeader = parse(out);
    let header = OutHeader2 {
        len: h.len,
        error: h.error,
        unique: h.unique,
    };
    assert!(
        h.len as usize >= size_of::<OutHeader>() && h.len as usize <= out.len(),
        "bad reply length {} (buffer {})",
        h.len,
        out.len()
    );
    assert_eq!(used, h.len, "used length differs from the reply's length");
    Reply {
        used,
        header,
        body: out[size_of::<OutHeader>()..h.len as usize].to_vec(),
    }
}

/// Parses READDIR(PLUS) data.
pub fn parse_dirents(mut buf: &[u8], plus: bool) -> Vec<DirEntry> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let entry = if plus {
            let e: EntryOut = parse(buf);
            buf = &buf[size_of::<EntryOut>()..];
            Some(e)
        } else {
            None
        };
        let d: Dirent = parse(buf);
        let start = size_of::<Dirent>();
        let name = buf[start..start + d.namelen as usize].to_vec();
        let rec = (start + d.namelen as usize + 7) & !7;
        buf = &buf[rec.min(buf.len())..];
        out.push(DirEntry {
            name,
            ino: d.ino,
            off: d.off,
            type_: d.type_,
            entry,
        });
    }
    out
}
