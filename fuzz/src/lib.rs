//! What the fuzz targets share: a device activated through the real virtio-mmio transport
//! (`devices::virtio::test_utils::MmioDriver`, the host-side driver of the host tier), and
//! the turning of fuzz input into what a hostile guest driver can put in guest memory: raw
//! descriptors (any address, length, flags and links), the available ring, and the bytes
//! the descriptors point at.

use std::time::Duration;

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::test_utils::{MmioDriver, BUFFER_AREA};
use devices::virtio::VirtioDevice;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory of the fuzzed devices.
pub const MEM: usize = 4 << 20;
/// Queue size the fuzzed driver sets up.
pub const QSIZE: u16 = 16;
/// Where descriptors of fuzz input point (most of the time): above the rings.
const DATA: u64 = BUFFER_AREA;
const DATA_LEN: u64 = MEM as u64 - BUFFER_AREA;

/// No seccomp filters in the fuzzer's process: its sanitizer runtime makes syscalls in
/// every thread that the device workers' filters do not allow.
pub fn no_filters() {
    devices::confine::set_mode(devices::confine::Mode::Off);
}

/// A virtio-blk device on a fresh 64 KiB disk file (kept while the `TempDir` lives).
pub fn block_device(read_only: bool) -> (vmm_sys_util::tempdir::TempDir, Block) {
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let disk = dir.as_path().join("disk");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let blk = Block::new(&BlockConfig {
        path: disk,
        read_only,
        id: None,
    })
    .unwrap();
    (dir, blk)
}

/// `device` activated with every feature it offers that `wanted` lets through.
pub fn activated(device: Box<dyn VirtioDevice>, wanted: u64) -> MmioDriver {
    let mut drv = MmioDriver::new(device, MEM);
    drv.activate(wanted, QSIZE);
    drv
}

/// A little-endian reader over fuzz input that yields zeros once it runs out.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    pub fn rest(&mut self) -> &[u8] {
        self.bytes(usize::MAX)
    }
}

/// Puts what `input` describes on queue `q` of `drv` and kicks it: up to 8 rounds of (a
/// descriptor count, that many raw descriptors, a head) followed by the data they point at,
/// then runs the device for up to `settle`.
pub fn drive_queue(drv: &mut MmioDriver, q: usize, input: &[u8], settle: Duration) {
    let mut inp = Input(input);
    let rounds = inp.u8() % 8 + 1;
    let mut first = 0u16;
    for _ in 0..rounds {
        let n = inp.u8() % 8 + 1;
        let mut descs = Vec::new();
        for _ in 0..n {
            let raw_addr = inp.u64();
            let len = inp.u32() % (DATA_LEN as u32 + 64);
            let flags = inp.u16();
            let next = inp.u16() % (QSIZE + 2);
            // Mostly inside the data area; the top flag bit keeps the raw address.
            let addr = if flags & 0x8000 != 0 {
                raw_addr
            } else {
                DATA + raw_addr % DATA_LEN
            };
            descs.push(Descriptor::new(addr, len, flags & 0x7, next));
        }
        let slot = first % QSIZE;
        let fit = descs.len().min(usize::from(QSIZE - slot));
        drv.queues[q].store_raw(&drv.mem, slot, &descs[..fit]);
        let head = inp.u16() % (QSIZE + 2);
        drv.queues[q].make_available(&drv.mem, head);
        first = first.wrapping_add(n.into());
    }
    let data = inp.rest();
    let data = &data[..data.len().min(DATA_LEN as usize)];
    drv.mem.write_slice(data, GuestAddress(DATA)).unwrap();
    drv.kick(q as u32);
    drv.settle(q, settle);
}
