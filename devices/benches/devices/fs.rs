//! virtio-fs on a temp dir: FUSE READ/WRITE as Linux's virtio-fs driver lays them out
//! (in header and arguments device-readable, out header and reply device-writable, data in
//! [`DATA_SEGMENT`] descriptors), one in flight on the request queue.

use std::fs::OpenOptions;
use std::mem::size_of;

use devices::virtio::const_u32;
use devices::virtio::fs::test_client::{FuseClient, DATA_SEGMENT};
use devices::virtio::fs::{Fs, ShareConfig, ShareOptions, REQUEST_QUEUE};
use devices::virtio::test_utils::{len32, size32, Buf};
use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader, ReadIn, WriteIn, WriteOut};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use super::file::{fill, pattern, FileIo, RawFile};
use super::{Dir, TIMEOUT};

const ROOT: u64 = 1;
const NAME: &str = "bench.dat";
const IN_HEADER: u32 = const_u32(size_of::<InHeader>() as u64);
const OUT_HEADER: u32 = const_u32(size_of::<OutHeader>() as u64);

/// The device, its FUSE client and the open file.
pub struct FsDevice {
    c: FuseClient,
    nodeid: u64,
    fh: u64,
    /// In header + arguments.
    req: GuestAddress,
    /// Out header + small reply.
    reply: GuestAddress,
    data: GuestAddress,
    /// The chain being built (reused).
    bufs: Vec<Buf>,
    _dir: TempDir,
}

/// The device sharing a temp dir with a filled file (looked up and opened through FUSE), and
/// the raw baseline on the same file.
pub fn setup() -> (FsDevice, RawFile) {
    let dir = TempDir::new().expect("temp dir");
    let path = dir.as_path().join(NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create the test file");
    fill(&file);
    let share = ShareConfig::new("bench", dir.as_path(), ShareOptions::default()).expect("share");
    let mut c = FuseClient::new(Fs::new(share).expect("virtio-fs device"));
    c.init();
    let nodeid = c.lookup(ROOT, NAME).expect("FUSE_LOOKUP").nodeid;
    let fh = c.open(nodeid, libc::O_RDWR as u32).expect("FUSE_OPEN").fh;
    let req = c.drv.alloc(4096);
    let reply = c.drv.alloc(4096);
    let data = c.drv.alloc(1 << 20);
    c.drv.write_mem(data, &pattern(1 << 20));
    let dev = FsDevice {
        c,
        nodeid,
        fh,
        req,
        reply,
        data,
        bufs: Vec::new(),
        _dir: dir,
    };
    (dev, RawFile::new(file))
}

impl FsDevice {
    /// Where a request's arguments go, after its in header.
    fn args_at(&self) -> GuestAddress {
        GuestAddress(self.req.0 + u64::from(IN_HEADER))
    }

    /// Writes a request's arguments; returns their length.
    fn put_args<T: ByteValued>(&self, args: T) -> usize {
        self.c.drv.write_mem(self.args_at(), args.as_slice());
        size_of::<T>()
    }
}

impl FileIo for FsDevice {
    /// One READ or WRITE of `size` bytes at `offset`, waited for and checked.
    fn io(&mut self, dir: Dir, offset: u64, size: usize) {
        let (fh, size_u32) = (self.fh, len32(size));
        let (opcode, args_len) = match dir {
            Dir::Read => (
                Opcode::Read,
                self.put_args(ReadIn {
                    fh,
                    offset,
                    size: size_u32,
                    ..Default::default()
                }),
            ),
            Dir::Write => (
                Opcode::Write,
                self.put_args(WriteIn {
                    fh,
                    offset,
                    size: size_u32,
                    ..Default::default()
                }),
            ),
        };
        // A WRITE's data follows its arguments.
        let data_in = if dir == Dir::Write { size } else { 0 };
        let h = self.c.header(opcode, self.nodeid, args_len + data_in);
        self.c.drv.write_mem(self.req, h.as_slice());
        let args_at = self.args_at();
        let bufs = &mut self.bufs;
        bufs.clear();
        bufs.push((self.req, IN_HEADER, false));
        bufs.push((args_at, len32(args_len), false));
        let data = (0..size_u32).step_by(DATA_SEGMENT as usize).map(|start| {
            let len = DATA_SEGMENT.min(size_u32 - start);
            (
                GuestAddress(self.data.0 + u64::from(start)),
                len,
                dir == Dir::Read,
            )
        });
        let reply_body = GuestAddress(self.reply.0 + u64::from(OUT_HEADER));
        match dir {
            Dir::Read => {
                bufs.push((self.reply, OUT_HEADER, true));
                bufs.extend(data);
            }
            Dir::Write => {
                bufs.extend(data);
                bufs.push((self.reply, OUT_HEADER, true));
                bufs.push((reply_body, size32::<WriteOut>(), true));
            }
        }
        self.c.submit(REQUEST_QUEUE, bufs);
        self.c.wait_used(REQUEST_QUEUE, TIMEOUT);
        let out: OutHeader = self.c.drv.mem.read_obj(self.reply).expect("out header");
        assert_eq!(out.error, 0, "FUSE {opcode:?} failed");
        let done = match dir {
            Dir::Read => out.len.saturating_sub(OUT_HEADER),
            Dir::Write => {
                let w: WriteOut = self.c.drv.mem.read_obj(reply_body).expect("write reply");
                w.size
            }
        };
        assert_eq!(done, size_u32, "short FUSE {opcode:?}");
    }
}
