//! virtio-blk driven end to end through the virtio-mmio transport by the host-side test
//! driver: the guest's view, without a VM.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::bus::BusDevice;
use crate::virtio::block::request::{STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};
use crate::virtio::features::{bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::virtio::mmio::regs;
use crate::virtio::status::*;
use crate::virtio::test_utils::{Buf, MmioDriver, DESC_INDIRECT, DESC_NEXT, DESC_WRITE};
use crate::virtio::{DeviceState, MmioPersist, INT_CONFIG_CHANGE, INT_USED_RING};

const WAIT: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_millis(50);
const MEM: usize = 64 << 20;
const OK: u8 = STATUS_OK;
const IOERR: u8 = STATUS_IOERR;
const UNSUPP: u8 = STATUS_UNSUPP;

/// What Linux asks for.
fn linux_features() -> u64 {
    bit(VIRTIO_F_VERSION_1)
        | bit(crate::virtio::features::VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_RO)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES)
}

struct Fixture {
    img: TempFile,
    drv: MmioDriver,
}

fn device(bytes: u64, read_only: bool, id: Option<&str>) -> Fixture {
    let img = TempFile::new().unwrap();
    img.as_file().set_len(bytes).unwrap();
    let block = Block::new(&BlockConfig {
        path: img.as_path().into(),
        read_only,
        id: id.map(str::to_string),
    })
    .unwrap();
    Fixture {
        img,
        drv: MmioDriver::new(Box::new(block), MEM),
    }
}

/// An active device on a `bytes`-byte image.
fn active(bytes: u64, read_only: bool) -> Fixture {
    let mut f = device(bytes, read_only, Some("podvisor-disk-0"));
    f.drv.activate(linux_features(), QUEUE_SIZE);
    f
}

impl Fixture {
    /// A header buffer for `req_type` at `sector`.
    fn header(&mut self, req_type: u32, sector: u64) -> Buf {
        let addr = self.drv.alloc(16);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.drv.write_mem(addr, &h);
        (addr, 16, false)
    }

    /// A status buffer, pre-set to 0xff to see whether the device wrote it.
    fn status_buf(&mut self) -> Buf {
        let addr = self.drv.alloc(1);
        self.drv.write_mem(addr, &[0xff]);
        (addr, 1, true)
    }

    /// Submits `bufs`, waits for completion; returns (status byte, used length).
    fn run(&mut self, bufs: &[Buf]) -> (u8, u32) {
        let head = self.drv.submit(0, bufs);
        let used = self.drv.wait_used(0, 1, WAIT);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        let status = bufs.last().unwrap();
        (self.drv.read_mem(status.0, 1)[0], used[0].1)
    }

    /// A request of `req_type` with data buffers of `lens` bytes.
    fn request(
        &mut self,
        req_type: u32,
        sector: u64,
        lens: &[u32],
        writable: bool,
    ) -> (Vec<Buf>, (u8, u32)) {
        let mut bufs = vec![self.header(req_type, sector)];
        for &len in lens {
            bufs.push((self.drv.alloc(len.into()), len, writable));
        }
        bufs.push(self.status_buf());
        let r = self.run(&bufs);
        (bufs, r)
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.img.as_file().read_exact_at(&mut b, offset).unwrap();
        b
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Write `len` bytes at `sector` in `seg`-byte segments, check the file, read them back
/// into fresh buffers, check guest memory, interrupt status and irqfd.
fn round_trip(len: usize, seg: u32, sector: u64) {
    let mut f = active(4 << 20, false);
    let data = pattern(len, 7);
    let lens = vec![seg; len / seg as usize];

    let mut bufs = vec![f.header(VIRTIO_BLK_T_OUT, sector)];
    for (i, &l) in lens.iter().enumerate() {
        let addr = f.drv.alloc(l.into());
        f.drv
            .write_mem(addr, &data[i * seg as usize..(i + 1) * seg as usize]);
        bufs.push((addr, l, false));
    }
    bufs.push(f.status_buf());
    assert_eq!(f.run(&bufs), (OK, 1));
    assert_eq!(f.file_bytes(sector * 512, len), data);
    assert!(f.drv.wait_irq(WAIT) >= 1, "no interrupt on the irqfd");
    assert_eq!(f.drv.ack_interrupt() & INT_USED_RING, INT_USED_RING);
    assert_eq!(
        f.drv.read32(regs::INTERRUPT_STATUS),
        0,
        "ACK clears the status"
    );

    let (bufs, r) = f.request(VIRTIO_BLK_T_IN, sector, &lens, true);
    assert_eq!(r, (OK, u32::try_from(len).unwrap() + 1));
    let mut back = Vec::with_capacity(len);
    for b in &bufs[1..bufs.len() - 1] {
        back.extend(f.drv.read_mem(b.0, b.1 as usize));
    }
    assert_eq!(back, data);
    assert!(f.drv.wait_irq(WAIT) >= 1);
}

#[test]
fn read_write_4k() {
    round_trip(4096, 4096, 3);
}

#[test]
fn read_write_1m() {
    round_trip(1 << 20, SIZE_MAX, 2048);
}

#[test]
fn read_write_many_segments() {
    round_trip(64 << 10, 512, 0);
}

#[test]
fn flush_and_get_id() {
    let mut f = active(1 << 20, false);
    let (_, r) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(r, (OK, 1));

    let (bufs, r) = f.request(VIRTIO_BLK_T_GET_ID, 0, &[20], true);
    assert_eq!(r, (OK, 21));
    let mut want = b"podvisor-disk-0".to_vec();
    want.resize(20, 0);
    assert_eq!(f.drv.read_mem(bufs[1].0, 20), want);

    // Unknown request types are unsupported, not errors.
    let (_, r) = f.request(0x1234, 0, &[], false);
    assert_eq!(r, (UNSUPP, 1));
}

#[test]
fn config_space_and_features() {
    let mut f = device(3 << 20, false, None);
    let feats = f.drv.device_features();
    for b in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_SEG_MAX,
    ] {
        assert_ne!(feats & bit(b), 0, "feature {b}");
    }
    assert_eq!(feats & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(f.drv.read32(regs::DEVICE_ID), 2);
    let cap = f.drv.read_config(0, 8);
    assert_eq!(u64::from_le_bytes(cap.try_into().unwrap()), 6144);
    // Linux reads the 64-bit capacity as two 32-bit halves too.
    assert_eq!(f.drv.read_config(0, 4), 6144u32.to_le_bytes());
    assert_eq!(f.drv.read_config(4, 4), [0; 4]);
    assert_eq!(f.drv.read_config(12, 4), SEG_MAX.to_le_bytes());
    assert_eq!(f.drv.read_config(20, 4), 512u32.to_le_bytes());
    // Past the config: zeros.
    assert_eq!(f.drv.read_config(0x200, 4), [0; 4]);
    // Config writes are ignored.
    f.drv.transport.write(regs::CONFIG, &[0xff; 8]);
    assert_eq!(f.drv.read_config(0, 4), 6144u32.to_le_bytes());

    let ro = device(1 << 20, true, None);
    let mut drv = ro.drv;
    let feats = drv.device_features();
    assert_ne!(feats & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(feats & bit(VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn read_only_rejects_writes() {
    let mut f = active(1 << 20, true);
    f.img.as_file().write_all_at(&[0x5a; 512], 0).unwrap();
    let (_, r) = f.request(VIRTIO_BLK_T_OUT, 0, &[512], false);
    assert_eq!(r, (IOERR, 1));
    assert_eq!(f.file_bytes(0, 512), vec![0x5a; 512]);
    let (bufs, r) = f.request(VIRTIO_BLK_T_IN, 0, &[512], true);
    assert_eq!(r, (OK, 513));
    assert_eq!(f.drv.read_mem(bufs[1].0, 512), vec![0x5a; 512]);
    let (_, r) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(r, (OK, 1));
    // Discard was not offered on a read-only disk.
    let (_, r) = f.range_request(VIRTIO_BLK_T_DISCARD, 0, 8, 0);
    assert_eq!(r, (UNSUPP, 1));
}

impl Fixture {
    fn range_request(
        &mut self,
        req_type: u32,
        sector: u64,
        sectors: u32,
        flags: u32,
    ) -> (Vec<Buf>, (u8, u32)) {
        let range = self.drv.alloc(16);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&sectors.to_le_bytes());
        raw[12..].copy_from_slice(&flags.to_le_bytes());
        self.drv.write_mem(range, &raw);
        let bufs = vec![
            self.header(req_type, 0),
            (range, 16, false),
            self.status_buf(),
        ];
        let r = self.run(&bufs);
        (bufs, r)
    }
}

#[test]
fn discard_and_write_zeroes_on_a_regular_file() {
    let mut f = active(1 << 20, false);
    f.img
        .as_file()
        .write_all_at(&vec![0xee; 64 << 10], 0)
        .unwrap();
    let (_, r) = f.range_request(VIRTIO_BLK_T_WRITE_ZEROES, 8, 16, 0);
    assert_eq!(r, (OK, 1));
    assert_eq!(f.file_bytes(4096, 8192), vec![0; 8192]);
    assert_eq!(f.file_bytes(0, 4096), vec![0xee; 4096]);
    assert_eq!(f.file_bytes(12288, 4096), vec![0xee; 4096]);

    let (_, r) = f.range_request(
        VIRTIO_BLK_T_WRITE_ZEROES,
        32,
        8,
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    );
    assert_eq!(r, (OK, 1));
    assert_eq!(f.file_bytes(32 * 512, 4096), vec![0; 4096]);

    let (_, r) = f.range_request(VIRTIO_BLK_T_DISCARD, 64, 64, 0);
    assert_eq!(r, (OK, 1));
    assert_eq!(
        f.img.as_file().metadata().unwrap().len(),
        1 << 20,
        "size kept"
    );

    // Bad ranges: beyond capacity, unmap on discard.
    let (_, r) = f.range_request(VIRTIO_BLK_T_DISCARD, 2040, 16, 0);
    assert_eq!(r, (IOERR, 1));
    let (_, r) = f.range_request(VIRTIO_BLK_T_DISCARD, 0, 8, 1);
    assert_eq!(r, (UNSUPP, 1));
}

#[test]
fn capacity_bounds() {
    let mut f = active(1 << 20, false); // 2048 sectors
    let (_, r) = f.request(VIRTIO_BLK_T_IN, 2047, &[512], true);
    assert_eq!(r, (OK, 513));
    let (_, r) = f.request(VIRTIO_BLK_T_IN, 2047, &[1024], true);
    assert_eq!(r, (IOERR, 1));
    let (_, r) = f.request(VIRTIO_BLK_T_OUT, 2048, &[512], false);
    assert_eq!(r, (IOERR, 1));
    let (_, r) = f.request(VIRTIO_BLK_T_IN, u64::MAX, &[512], true);
    assert_eq!(r, (IOERR, 1));
    let (_, r) = f.request(VIRTIO_BLK_T_IN, 0, &[100], true);
    assert_eq!(r, (IOERR, 1), "length not a multiple of 512");
    // The device still works.
    let (_, r) = f.request(VIRTIO_BLK_T_IN, 0, &[512], true);
    assert_eq!(r, (OK, 513));
}

#[test]
fn event_idx_suppresses_and_delivers_interrupts() {
    let mut f = device(1 << 20, false, None);
    let feats = f
        .drv
        .activate(linux_features() | bit(VIRTIO_RING_F_EVENT_IDX), 64);
    assert_ne!(feats & bit(VIRTIO_RING_F_EVENT_IDX), 0);
    // used_event = 0: interrupt after the first used entry.
    let (_, r) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(r, (OK, 1));
    assert_eq!(f.drv.wait_irq(WAIT), 1);
    // used_event still 0: no interrupt for the second.
    let (_, r) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(r, (OK, 1));
    assert_eq!(f.drv.wait_irq(SETTLE), 0);
    // Driver asks for one at the next entry.
    let q = f.drv.queues[0].clone();
    q.set_used_event(&f.drv.mem, q.used_idx(&f.drv.mem));
    let (_, r) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(r, (OK, 1));
    assert_eq!(f.drv.wait_irq(WAIT), 1);
}

#[test]
fn many_requests_wrap_the_rings() {
    let mut f = device(1 << 20, false, None);
    f.drv.activate(linux_features(), 8);
    for i in 0..40u64 {
        let data = pattern(512, u8::try_from(i).unwrap());
        let addr = f.drv.alloc(512);
        f.drv.write_mem(addr, &data);
        let bufs = vec![
            f.header(VIRTIO_BLK_T_OUT, i),
            (addr, 512, false),
            f.status_buf(),
        ];
        assert_eq!(f.run(&bufs), (OK, 1));
        assert_eq!(f.file_bytes(i * 512, 512), data);
    }
    // Several in flight at once.
    let mut heads = Vec::new();
    let mut statuses = Vec::new();
    for i in 0..2u64 {
        let bufs = vec![
            f.header(VIRTIO_BLK_T_IN, i),
            (f.drv.alloc(512), 512, true),
            f.status_buf(),
        ];
        statuses.push(bufs[2].0);
        heads.push(f.drv.queues[0].add_chain(&f.drv.mem, &bufs));
    }
    f.drv.kick(0);
    let used = f.drv.wait_used(0, 2, WAIT);
    assert_eq!(
        used.iter()
            .map(|u| u16::try_from(u.0).unwrap())
            .collect::<Vec<_>>(),
        heads
    );
    for s in statuses {
        assert_eq!(f.drv.read_mem(s, 1), [OK]);
    }
}

#[test]
fn state_reports_config_and_queue() {
    let mut f = active(1 << 20, false);
    let (_, r) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(r, (OK, 1));
    let mmio = f.drv.transport.state();
    assert_eq!(mmio.status, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(mmio.queues[0].size, QUEUE_SIZE);
    assert!(mmio.queues[0].ready);
    let dev = f.drv.transport.device();
    assert_eq!(
        dev.acked_features(),
        linux_features() & dev.avail_features()
    );
}

// ---- Hostile guest -------------------------------------------------------------------

/// Adds raw descriptors at table index 0.. and makes `head` available, kicks.
fn submit_raw(f: &mut Fixture, descs: &[Descriptor], head: u16) {
    let q = &mut f.drv.queues[0];
    q.store_raw(&f.drv.mem, 0, descs);
    q.make_available(&f.drv.mem, head);
    f.drv.kick(0);
}

const N: u16 = DESC_NEXT;
const W: u16 = DESC_WRITE;

#[test]
fn descriptor_loop_is_returned_unanswered() {
    let mut f = active(1 << 20, false);
    let h = f.header(VIRTIO_BLK_T_IN, 0);
    let data = f.drv.alloc(512);
    let st = f.status_buf();
    // 0 -> 1 -> 2 -> 0 ...
    submit_raw(
        &mut f,
        &[
            Descriptor::new(h.0 .0, 16, N, 1),
            Descriptor::new(data.0, 512, W | N, 2),
            Descriptor::new(st.0 .0, 1, W | N, 0),
        ],
        0,
    );
    let used = f.drv.wait_used(0, 1, WAIT);
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(f.drv.read_mem(st.0, 1), [0xff], "status untouched");
    // Still serving.
    let (_, r) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(r, (OK, 1));
}

#[test]
fn bad_next_and_bad_head_indices() {
    let mut f = active(1 << 20, false);
    let h = f.header(VIRTIO_BLK_T_FLUSH, 0);
    submit_raw(&mut f, &[Descriptor::new(h.0 .0, 16, N, 999)], 0);
    assert_eq!(f.drv.wait_used(0, 1, WAIT), vec![(0, 0)]);
    // Head index beyond the queue: the chain cannot even be returned.
    let q = &mut f.drv.queues[0];
    q.make_available(&f.drv.mem, 4000);
    f.drv.kick(0);
    assert_eq!(f.drv.settle(0, SETTLE), vec![]);
    let (_, r) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(r, (OK, 1));
}

#[test]
fn out_of_range_addresses_and_oversize_lengths() {
    let mut f = active(1 << 20, false);
    let beyond = GuestAddress(MEM as u64 - 256);
    let h = f.header(VIRTIO_BLK_T_IN, 0);
    let st = f.status_buf();
    assert_eq!(f.run(&[h, (beyond, 512, true), st]), (IOERR, 1));
    assert_eq!(
        f.run(&[h, (GuestAddress(u64::MAX - 100), 512, true), st]),
        (IOERR, 1)
    );
    // Header outside memory.
    let buf = f.drv.alloc(512);
    assert_eq!(
        f.run(&[(GuestAddress(1 << 40), 16, false), (buf, 512, true), st]),
        (IOERR, 1)
    );
    // Over the 16 MiB request limit (and over guest memory: checked first by size).
    assert_eq!(
        f.run(&[h, (GuestAddress(0x100_0000), 32 << 20, true), st]),
        (IOERR, 1)
    );
    // Lengths that overflow the chain's u32 total.
    f.drv.write_mem(st.0, &[0xff]);
    let head = f.drv.submit(
        0,
        &[
            h,
            (GuestAddress(0), u32::MAX, true),
            (GuestAddress(0), u32::MAX, true),
            st,
        ],
    );
    assert_eq!(f.drv.wait_used(0, 1, WAIT), vec![(u32::from(head), 0)]);
    assert_eq!(f.drv.read_mem(st.0, 1), [0xff]);
    // Status outside memory: returned unanswered.
    let buf = f.drv.alloc(512);
    let head = f.drv.submit(
        0,
        &[h, (buf, 512, true), (beyond.unchecked_add(1024), 1, true)],
    );
    assert_eq!(f.drv.wait_used(0, 1, WAIT), vec![(u32::from(head), 0)]);
}

#[test]
fn wrong_direction_flags() {
    let mut f = active(1 << 20, false);
    // Read into a device-readable buffer.
    let (_, r) = f.request(VIRTIO_BLK_T_IN, 0, &[512], false);
    assert_eq!(r, (IOERR, 1));
    // Write from a device-writable buffer.
    let (_, r) = f.request(VIRTIO_BLK_T_OUT, 0, &[512], true);
    assert_eq!(r, (IOERR, 1));
    // Writable header.
    let (addr, len, _) = f.header(VIRTIO_BLK_T_IN, 0);
    let st = f.status_buf();
    let buf = f.drv.alloc(512);
    assert_eq!(
        f.run(&[(addr, len, true), (buf, 512, true), st]),
        (IOERR, 1)
    );
}

#[test]
fn missing_or_bad_status_descriptor() {
    let mut f = active(1 << 20, false);
    // Last descriptor is data (device-readable): no status to write.
    let h = f.header(VIRTIO_BLK_T_OUT, 0);
    let data = f.drv.alloc(512);
    f.drv.write_mem(data, &[0xff; 512]);
    let head = f.drv.submit(0, &[h, (data, 512, false)]);
    assert_eq!(f.drv.wait_used(0, 1, WAIT), vec![(u32::from(head), 0)]);
    assert_eq!(f.file_bytes(0, 512), vec![0; 512], "nothing written");
    // Zero-length status.
    let st = f.drv.alloc(1);
    let buf = f.drv.alloc(512);
    let head = f.drv.submit(0, &[h, (buf, 512, true), (st, 0, true)]);
    assert_eq!(f.drv.wait_used(0, 1, WAIT), vec![(u32::from(head), 0)]);
    // Header only.
    let head = f.drv.submit(0, &[h]);
    assert_eq!(f.drv.wait_used(0, 1, WAIT), vec![(u32::from(head), 0)]);
}

#[test]
fn queue_size_not_a_power_of_two_needs_reset() {
    let mut f = device(1 << 20, false, None);
    f.drv.negotiate(linux_features()).unwrap();
    f.drv.setup_queue(0, 100);
    f.drv.take_irqs();
    f.drv.add_status(DRIVER_OK);
    let status = f.drv.status();
    assert_eq!(status & DRIVER_OK, 0);
    assert_ne!(status & DEVICE_NEEDS_RESET, 0);
    assert_eq!(
        f.drv.read32(regs::INTERRUPT_STATUS) & INT_CONFIG_CHANGE,
        INT_CONFIG_CHANGE
    );
    assert!(f.drv.take_irqs() >= 1);
    // The driver resets and tries again properly.
    f.drv.activate(linux_features(), 128);
    let (_, r) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(r, (OK, 1));
}

/// Negotiates, sets queue 0 up with `size`, lets `tweak` rewrite registers (with the queue
/// made not-ready around it), and checks that DRIVER_OK gives DEVICE_NEEDS_RESET.
fn refused_at_driver_ok(f: &mut Fixture, size: u16, tweak: &[(u64, u32)]) {
    f.drv.negotiate(linux_features()).unwrap();
    f.drv.setup_queue(0, size);
    f.drv.write32(regs::QUEUE_READY, 0);
    for &(reg, value) in tweak {
        f.drv.write32(reg, value);
    }
    f.drv.write32(regs::QUEUE_READY, 1);
    f.drv.add_status(DRIVER_OK);
    let status = f.drv.status();
    assert_ne!(status & DEVICE_NEEDS_RESET, 0, "tweak {tweak:x?}");
    assert_eq!(status & DRIVER_OK, 0);
}

#[test]
fn queue_bigger_than_max_or_outside_memory_needs_reset() {
    let mut f = device(1 << 20, false, None);
    refused_at_driver_ok(&mut f, 512, &[]);
    // Used ring beyond guest memory.
    refused_at_driver_ok(
        &mut f,
        16,
        &[(regs::QUEUE_DEVICE_LOW, 0), (regs::QUEUE_DEVICE_HIGH, 0x10)],
    );
    // Misaligned descriptor table.
    refused_at_driver_ok(&mut f, 16, &[(regs::QUEUE_DESC_LOW, 0x10008)]);
    // Size 0.
    refused_at_driver_ok(&mut f, 16, &[(regs::QUEUE_NUM, 0)]);
    // Size that does not fit 16 bits.
    refused_at_driver_ok(&mut f, 16, &[(regs::QUEUE_NUM, 0x1_0010)]);
}

#[test]
fn driver_ok_without_features_ok_is_ignored() {
    let mut f = device(1 << 20, false, None);
    f.drv.write32(regs::STATUS, 0);
    f.drv.add_status(ACKNOWLEDGE);
    f.drv.add_status(DRIVER);
    f.drv
        .write32(regs::STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(f.drv.status(), ACKNOWLEDGE | DRIVER);
    // Queue registers are not writable before FEATURES_OK either.
    f.drv.write32(regs::QUEUE_SEL, 0);
    f.drv.write32(regs::QUEUE_NUM, 16);
    f.drv.write32(regs::QUEUE_READY, 1);
    assert_eq!(f.drv.read32(regs::QUEUE_READY), 0);
    // Skipping DRIVER.
    f.drv.write32(regs::STATUS, 0);
    f.drv.write32(regs::STATUS, ACKNOWLEDGE | FEATURES_OK);
    assert_eq!(f.drv.status(), 0);
    f.drv.add_status(ACKNOWLEDGE);
    assert_eq!(f.drv.status(), ACKNOWLEDGE);
}

#[test]
fn features_ok_needs_version_1_and_offered_bits() {
    let mut f = device(1 << 20, false, None);
    let refused = f.drv.negotiate(linux_features() & !bit(VIRTIO_F_VERSION_1));
    assert_eq!(refused, Err(ACKNOWLEDGE | DRIVER));
    // A bit the device never offered.
    f.drv.write32(regs::STATUS, 0);
    f.drv.add_status(ACKNOWLEDGE);
    f.drv.add_status(DRIVER);
    f.drv
        .write_driver_features(bit(VIRTIO_F_VERSION_1) | bit(40));
    f.drv.add_status(FEATURES_OK);
    assert_eq!(f.drv.status() & FEATURES_OK, 0);
    // Feature pages beyond 1 read as 0.
    f.drv.write32(regs::DEVICE_FEATURES_SEL, 7);
    assert_eq!(f.drv.read32(regs::DEVICE_FEATURES), 0);
}

#[test]
fn notify_on_an_unready_queue_is_ignored() {
    let mut f = device(1 << 20, false, None);
    f.drv.negotiate(linux_features()).unwrap();
    let mut q = f.drv.setup_queue(0, 16);
    let h = f.header(VIRTIO_BLK_T_FLUSH, 0);
    let st = f.status_buf();
    let head = q.add_chain(&f.drv.mem, &[h, st]);
    f.drv.queues.push(q);
    // Before DRIVER_OK: the transport ignores it; a kick through the ioeventfd path (the fd
    // itself) is drained by the inactive device.
    f.drv.kick(0);
    f.drv.kick(5);
    f.drv.transport.queue_events()[0].write(1).unwrap();
    assert_eq!(f.drv.settle(0, SETTLE), vec![]);
    assert_eq!(f.drv.read_mem(st.0, 1), [0xff]);
    // DRIVER_OK serves what was queued before it.
    f.drv.add_status(DRIVER_OK);
    assert_eq!(f.drv.wait_used(0, 1, WAIT), vec![(u32::from(head), 1)]);
    // A queue that does not exist.
    f.drv.kick(1);
    f.drv.kick(u32::MAX);
    assert_eq!(f.drv.settle(0, SETTLE), vec![]);
}

#[test]
fn bogus_register_widths_and_offsets() {
    let mut f = active(1 << 20, false);
    let before = f.drv.transport.state();
    let t = &mut f.drv.transport;
    for (offset, len) in [
        (regs::STATUS, 1),
        (regs::STATUS, 2),
        (regs::STATUS, 8),
        (regs::STATUS + 1, 4),
        (regs::QUEUE_NOTIFY, 2),
    ] {
        t.write(offset, &vec![0u8; len]);
        let mut b = vec![0xaau8; len];
        t.read(offset, &mut b);
        assert_eq!(b, vec![0; len], "{len}-byte read at {offset:#x}");
    }
    for offset in [0x18, 0x28, 0x3c, 0x40, 0x48, 0xc0, 0xf8] {
        t.write(offset, &[0xff; 4]);
        let mut b = [0xaa; 4];
        t.read(offset, &mut b);
        assert_eq!(b, [0; 4]);
    }
    // Read-only registers ignore writes.
    t.write(regs::MAGIC_VALUE, &[0; 4]);
    t.write(regs::INTERRUPT_STATUS, &[0xff; 4]);
    assert_eq!(f.drv.read32(regs::MAGIC_VALUE), 0x7472_6976);
    // Queue registers cannot change after DRIVER_OK.
    f.drv.write32(regs::QUEUE_SEL, 0);
    f.drv.write32(regs::QUEUE_NUM, 2);
    f.drv.write32(regs::QUEUE_DESC_LOW, 0);
    f.drv.write32(regs::QUEUE_SEL, 9);
    assert_eq!(f.drv.read32(regs::QUEUE_NUM_MAX), 0);
    f.drv.write32(regs::QUEUE_SEL, 0);
    assert_eq!(f.drv.transport.state().queues, before.queues);
    assert_eq!(f.drv.status(), before.status);
    let (_, r) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(r, (OK, 1));
}

#[test]
fn lying_available_index_needs_reset() {
    let mut f = active(1 << 20, false);
    f.drv.take_irqs();
    f.drv.queues[0].set_avail_idx(&f.drv.mem, 5000);
    f.drv.kick(0);
    f.drv.settle(0, SETTLE);
    assert_ne!(f.drv.status() & DEVICE_NEEDS_RESET, 0);
    assert_ne!(f.drv.ack_interrupt() & INT_CONFIG_CHANGE, 0);
    assert!(f.drv.take_irqs() >= 1);
    // A reset brings it back.
    f.drv.activate(linux_features(), QUEUE_SIZE);
    assert_eq!(f.drv.status() & DEVICE_NEEDS_RESET, 0);
    let (_, r) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(r, (OK, 1));
}

#[test]
fn reset_stops_the_device_and_it_can_start_again() {
    let mut f = active(1 << 20, false);
    let (_, r) = f.request(VIRTIO_BLK_T_OUT, 0, &[4096], false);
    assert_eq!(r, (OK, 1));
    f.drv.write32(regs::STATUS, 0);
    assert_eq!(f.drv.status(), 0);
    let state = f.drv.transport.state();
    assert!(state
        .queues
        .iter()
        .all(|q| !q.ready && q.desc_table == 0 && q.size == QUEUE_SIZE));
    assert_eq!(state.driver_features, 0);
    assert_eq!(f.drv.transport.device().acked_features(), 0);
    // A kick after reset does nothing.
    f.drv.transport.queue_events()[0].write(1).unwrap();
    f.drv.settle(0, SETTLE);
    // Again, with a different queue size.
    f.drv.activate(linux_features(), 32);
    let (_, r) = f.request(VIRTIO_BLK_T_IN, 0, &[4096], true);
    assert_eq!(r, (OK, 4097));
}

#[test]
fn indirect_descriptors() {
    let mut f = active(1 << 20, false);
    f.img.as_file().write_all_at(&pattern(1024, 3), 0).unwrap();
    let h = f.header(VIRTIO_BLK_T_IN, 0);
    let d1 = f.drv.alloc(512);
    let d2 = f.drv.alloc(512);
    let st = f.status_buf();
    let table = f.drv.alloc(64);
    let descs = [
        Descriptor::new(h.0 .0, 16, N, 1),
        Descriptor::new(d1.0, 512, W | N, 2),
        Descriptor::new(d2.0, 512, W | N, 3),
        Descriptor::new(st.0 .0, 1, W, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        f.drv.write_mem(
            table.unchecked_add(16 * i as u64),
            vm_memory::ByteValued::as_slice(&virtio_queue::desc::RawDescriptor::from(*d)),
        );
    }
    let indirect = DESC_INDIRECT;
    submit_raw(&mut f, &[Descriptor::new(table.0, 64, indirect, 0)], 0);
    assert_eq!(f.drv.wait_used(0, 1, WAIT), vec![(0, 1025)]);
    let mut got = f.drv.read_mem(d1, 512);
    got.extend(f.drv.read_mem(d2, 512));
    assert_eq!(got, pattern(1024, 3));
}

#[test]
fn snapshot_restore_continues_the_queue_and_checks_the_disk() {
    let mut f = active(1 << 20, false);
    f.img.as_file().write_all_at(&pattern(512, 1), 0).unwrap();
    let (bufs, r) = f.request(VIRTIO_BLK_T_IN, 0, &[512], true);
    assert_eq!(r, (OK, 513));
    assert_eq!(f.drv.read_mem(bufs[1].0, 512), pattern(512, 1));

    // save -> JSON -> load -> restore -> save: unchanged.
    let saved = f.drv.transport.save();
    assert_eq!(saved.in_flight(), None, "quiescent");
    let q = saved.device.queues().unwrap()[0];
    assert_eq!((q.next_avail, q.next_used), (1, 1));
    let json = serde_json::to_string(&saved).unwrap();
    let loaded: MmioPersist = serde_json::from_str(&json).unwrap();
    assert_eq!(loaded, saved);
    // The clone gets its own copy of the disk (the source still holds its lock).
    let copy = TempFile::new().unwrap();
    std::fs::copy(f.img.as_path(), copy.as_path()).unwrap();
    let again = |read_only| {
        Block::new(&BlockConfig {
            path: copy.as_path().into(),
            read_only,
            id: Some("podvisor-disk-0".into()),
        })
        .unwrap()
    };
    let mut restored = f.drv.restore(Box::new(again(false)), &loaded).unwrap();
    let mut expected = saved.clone();
    let DeviceState::Block(b) = &mut expected.device else {
        unreachable!()
    };
    b.path = copy.as_path().into();
    assert_eq!(restored.transport.save(), expected);
    // The pending interrupt of the last request is raised again.
    assert!(restored.take_irqs() >= 1);
    // The guest goes on with the next ring entries.
    copy.as_file().write_all_at(&pattern(512, 2), 0).unwrap();
    f.drv = restored;
    let (bufs, r) = f.request(VIRTIO_BLK_T_IN, 0, &[512], true);
    assert_eq!(r, (OK, 513));
    assert_eq!(f.drv.read_mem(bufs[1].0, 512), pattern(512, 2));
    drop(f);

    // A disk the guest does not know is refused, saying why.
    let other = device(1 << 20, false, None);
    let refused = |read_only| {
        other
            .drv
            .restore(Box::new(again(read_only)), &loaded)
            .err()
            .unwrap()
            .to_string()
    };
    let err = refused(true);
    assert!(err.contains("read-only flag"), "{err}");
    copy.as_file().set_len(2 << 20).unwrap();
    let err = refused(false);
    assert!(err.contains("capacity (sectors)"), "{err}");
}
