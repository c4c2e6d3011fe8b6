//! The balloon through its virtio-mmio transport, driven like the Linux driver drives it,
//! with hostile chains next to well-formed ones.

use std::time::Duration;

use vm_memory::GuestAddress;

use super::queue_handler::{MAX_CHAIN_DESCRIPTORS, MAX_PFN_BYTES};
use super::*;
use crate::virtio::features::{bit, VIRTIO_F_VERSION_1};
use crate::virtio::status::{DEVICE_NEEDS_RESET, DRIVER_OK};
use crate::virtio::test_utils::{len32, Buf, MmioDriver};
use crate::virtio::INT_CONFIG_CHANGE;

/// Guest memory of the tests.
const MEM: u64 = 16 << 20;
/// Where the tests' "guest pages" are (above the driver's buffers).
const PAGES: u64 = 8 << 20;
const WAIT: Duration = Duration::from_secs(5);
const FILL: u8 = 0xa5;

fn pfn(addr: u64) -> u32 {
    u32::try_from(addr >> PAGE_SHIFT).unwrap()
}

struct Guest {
    drv: MmioDriver,
    control: BalloonControl,
}

impl Guest {
    fn new() -> Guest {
        let balloon = Balloon::new().unwrap();
        let control = balloon.control();
        Guest {
            drv: MmioDriver::new(Box::new(balloon), usize::try_from(MEM).unwrap()),
            control,
        }
    }

    /// The Linux probe: features, the queues of those features, DRIVER_OK.
    fn running(reporting: bool) -> Guest {
        let mut g = Guest::new();
        let wanted = bit(VIRTIO_F_VERSION_1) | if reporting { bit(F_REPORTING) } else { 0 };
        g.drv.negotiate(wanted).unwrap();
        g.setup_queues(if reporting { 3 } else { 2 });
        g.drv.add_status(DRIVER_OK);
        assert_ne!(g.drv.status() & DRIVER_OK, 0, "the device did not start");
        g
    }

    fn setup_queues(&mut self, n: u32) {
        for i in 0..n {
            let q = self.drv.setup_queue(i, 128);
            self.drv.queues.push(q);
        }
    }

    fn needs_reset(&mut self) -> bool {
        self.drv.status() & DEVICE_NEEDS_RESET != 0
    }

    fn fill(&self, addr: u64, len: u64) {
        self.drv.write_mem(
            GuestAddress(addr),
            &vec![FILL; usize::try_from(len).unwrap()],
        );
    }

    /// Whether `len` bytes at `addr` are all `byte`.
    fn all(&self, addr: u64, len: u64, byte: u8) -> bool {
        self.drv
            .read_mem(GuestAddress(addr), usize::try_from(len).unwrap())
            .iter()
            .all(|b| *b == byte)
    }

    /// A device-readable buffer holding `pfns`.
    fn pfn_buf(&mut self, pfns: &[u32]) -> Buf {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        let addr = self.drv.alloc(bytes.len() as u64);
        self.drv.write_mem(addr, &bytes);
        (addr, len32(bytes.len()), false)
    }

    /// Submits a chain on `q` and waits for it to come back; returns its used length.
    fn serve(&mut self, q: usize, bufs: &[Buf]) -> u32 {
        let head = self.drv.submit(q, bufs);
        let used = self.drv.wait_used(q, 1, WAIT);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        used[0].1
    }
}

#[test]
fn the_target_is_in_the_config_space_and_a_new_one_is_announced() {
    let mut g = Guest::new();
    g.control.set_target_pages(100);
    assert_eq!(g.drv.take_irqs(), 0, "no interrupt before the driver runs");
    assert_eq!(g.drv.read_config(0, 4), 100u32.to_le_bytes());
    assert!(!g.control.driver_running());

    let mut g = Guest::running(true);
    assert!(g.control.driver_running());
    g.drv.take_irqs();
    g.control.set_target_mib(2);
    assert_eq!(g.drv.wait_irq(WAIT), 1);
    assert_ne!(g.drv.ack_interrupt() & INT_CONFIG_CHANGE, 0);
    assert_eq!(g.drv.read_config(0, 4), 512u32.to_le_bytes());

    // The driver writes `actual`; `num_pages` and partial writes are not its to change.
    g.drv.write_config(ACTUAL, &300u32.to_le_bytes());
    g.drv.write_config(0, &7u32.to_le_bytes());
    g.drv.write_config(ACTUAL, &[1, 2]);
    assert_eq!(g.control.actual_pages(), 300);
    assert_eq!(g.control.actual_mib(), 1, "whole MiB");
    assert_eq!(g.control.target_pages(), 512);
    assert_eq!(g.drv.read_config(4, 4), 300u32.to_le_bytes());

    // A reset empties the driver's balloon; the host's target stands.
    g.drv.write32(crate::virtio::mmio::regs::STATUS, 0);
    assert_eq!(g.control.actual_pages(), 0);
    assert_eq!(g.control.target_pages(), 512);
    assert!(!g.control.driver_running());
}

const ACTUAL: u64 = 4;

#[test]
fn inflated_pages_are_discarded_and_deflated_ones_counted() {
    let mut g = Guest::running(true);
    g.fill(PAGES, 16 * PAGE_SIZE);
    let first = pfn(PAGES);
    // Four consecutive pages, one on its own, one named twice.
    let pfns = [first, first + 1, first + 2, first + 3, first + 8, first + 8];
    let buf = g.pfn_buf(&pfns);
    assert_eq!(g.serve(INFLATEQ, &[buf]), 0);
    assert!(
        g.all(PAGES, 4 * PAGE_SIZE, 0),
        "inflated pages read as zeros"
    );
    assert!(
        g.all(PAGES + 4 * PAGE_SIZE, 4 * PAGE_SIZE, FILL),
        "pages around them stay"
    );
    assert!(g.all(PAGES + 8 * PAGE_SIZE, PAGE_SIZE, 0));
    assert!(g.all(PAGES + 9 * PAGE_SIZE, 7 * PAGE_SIZE, FILL));
    let stats = g.control.stats();
    assert_eq!(stats.inflated_pages, 6);
    assert_eq!(stats.rejected, 0);

    // Deflating gives the pages back for the guest to touch again; nothing is discarded.
    g.fill(PAGES + 9 * PAGE_SIZE, PAGE_SIZE);
    let buf = g.pfn_buf(&[first + 9]);
    assert_eq!(g.serve(DEFLATEQ, &[buf]), 0);
    assert!(g.all(PAGES + 9 * PAGE_SIZE, PAGE_SIZE, FILL));
    assert_eq!(g.control.stats().deflated_pages, 1);
}

#[test]
fn reported_free_ranges_are_discarded() {
    let mut g = Guest::running(true);
    g.fill(PAGES, 4 << 20);
    let two_mib = 2u32 << 20;
    assert_eq!(
        g.serve(REPORTINGQ, &[(GuestAddress(PAGES), two_mib, true)]),
        0
    );
    assert!(g.all(PAGES, 2 << 20, 0));
    assert!(g.all(PAGES + (2 << 20), 2 << 20, FILL));
    let stats = g.control.stats();
    assert_eq!(stats.reported_bytes, 2 << 20);
    assert_eq!(stats.rejected, 0);
}

#[test]
fn hostile_frames_and_ranges_are_refused_and_touch_nothing() {
    let mut g = Guest::running(true);
    g.fill(PAGES, MEM - PAGES);
    let last = pfn(MEM) - 1;
    let readable = g.pfn_buf(&[pfn(MEM), u32::MAX, last, last + 1]);
    let writable = {
        let (addr, len, _) = g.pfn_buf(&[pfn(PAGES)]);
        (addr, len, true)
    };
    let (big_addr, _, _) = g.pfn_buf(&[pfn(PAGES) + 1]);
    let oversized = (big_addr, MAX_PFN_BYTES + 4, false);
    let outside = (GuestAddress(MEM - 2), 8, false);
    // One frame number and two stray bytes: the frame counts, the bytes do not.
    let (odd_addr, _, _) = g.pfn_buf(&[pfn(PAGES) + 2, 0xffff]);
    let odd = (odd_addr, 6, false);
    assert_eq!(
        g.serve(INFLATEQ, &[readable, writable, oversized, outside, odd]),
        0
    );
    let stats = g.control.stats();
    // pfn(MEM) and u32::MAX are outside RAM; last..=last+1 is one run crossing its end
    // (two pages); three descriptors are refused whole.
    assert_eq!(stats.rejected, 4 + 3, "{stats:?}");
    assert_eq!(stats.inflated_pages, 1);
    assert!(g.all(PAGES, 2 * PAGE_SIZE, FILL));
    assert!(g.all(PAGES + 2 * PAGE_SIZE, PAGE_SIZE, 0));
    assert!(g.all(PAGES + 3 * PAGE_SIZE, MEM - PAGES - 3 * PAGE_SIZE, FILL));

    let before = g.control.stats().rejected;
    let bad_ranges: [Buf; 6] = [
        (GuestAddress(PAGES + 0x800), 2 << 20, true), // unaligned start
        (GuestAddress(PAGES), 0x1800, true),          // unaligned length
        (GuestAddress(MEM - 0x1000), 0x2000, true),   // past the end of RAM
        (GuestAddress(u64::MAX - 0xfff), 0x2000, true), // wraps around
        (GuestAddress(1 << 40), 0x1000, true),        // no RAM there
        (GuestAddress(PAGES), 0x1000, false),         // device-readable
    ];
    assert_eq!(g.serve(REPORTINGQ, &bad_ranges), 0);
    let stats = g.control.stats();
    assert_eq!(stats.rejected - before, 6, "{stats:?}");
    assert_eq!(stats.reported_bytes, 0);
    assert!(g.all(PAGES, 2 * PAGE_SIZE, FILL));
    assert!(g.all(PAGES + 3 * PAGE_SIZE, MEM - PAGES - 3 * PAGE_SIZE, FILL));
    assert!(
        !g.needs_reset(),
        "bad frames are the guest's loss, not a broken device"
    );
}

#[test]
fn a_chain_carries_at_most_64_kib_of_frame_numbers() {
    let mut g = Guest::running(true);
    // Two descriptors of 48 KiB each naming the same page: only the first fits.
    let per_desc = (MAX_PFN_BYTES as usize * 3 / 4) / 4;
    let buf = g.pfn_buf(&vec![pfn(PAGES); per_desc]);
    assert_eq!(g.serve(INFLATEQ, &[buf, buf]), 0);
    let stats = g.control.stats();
    assert_eq!(stats.inflated_pages, per_desc as u64, "{stats:?}");
    assert_eq!(stats.rejected, 1, "{stats:?}");
}

#[test]
fn a_chain_is_read_up_to_its_descriptor_limit() {
    let mut g = Guest::running(true);
    let n = MAX_CHAIN_DESCRIPTORS + 6;
    let one = g.pfn_buf(&[pfn(PAGES)]);
    assert_eq!(g.serve(INFLATEQ, &vec![one; n]), 0);
    let stats = g.control.stats();
    assert_eq!(
        stats.inflated_pages, MAX_CHAIN_DESCRIPTORS as u64,
        "{stats:?}"
    );
    assert_eq!(stats.rejected, 1, "{stats:?}");

    let page: Buf = (GuestAddress(PAGES), u32::try_from(PAGE_SIZE).unwrap(), true);
    assert_eq!(g.serve(REPORTINGQ, &vec![page; n]), 0);
    let stats = g.control.stats();
    assert_eq!(
        stats.reported_bytes,
        MAX_CHAIN_DESCRIPTORS as u64 * PAGE_SIZE,
        "{stats:?}"
    );
    assert_eq!(stats.rejected, 2, "{stats:?}");
}

#[test]
fn a_broken_available_ring_needs_a_reset() {
    let mut g = Guest::running(true);
    let q = g.drv.queues[INFLATEQ].clone();
    q.set_avail_idx(&g.drv.mem, 1000);
    g.drv.kick_queue(INFLATEQ);
    g.drv.settle(INFLATEQ, Duration::from_millis(50));
    assert!(g.needs_reset());
}

#[test]
fn without_reporting_the_driver_sets_up_two_queues() {
    let mut g = Guest::running(false);
    // A kick of the queue that is not in use is ignored.
    g.drv.kick(u32::try_from(REPORTINGQ).unwrap());
    g.drv.run_events(10);
    g.fill(PAGES, PAGE_SIZE);
    let buf = g.pfn_buf(&[pfn(PAGES)]);
    g.serve(INFLATEQ, &[buf]);
    assert!(g.all(PAGES, PAGE_SIZE, 0));
    assert!(!g.needs_reset());
}

#[test]
fn a_driver_that_took_reporting_must_set_up_its_queue() {
    let mut g = Guest::new();
    g.drv
        .negotiate(bit(VIRTIO_F_VERSION_1) | bit(F_REPORTING))
        .unwrap();
    g.setup_queues(2);
    g.drv.add_status(DRIVER_OK);
    assert_eq!(g.drv.status() & DRIVER_OK, 0);
    assert!(g.needs_reset());
}

#[test]
fn target_actual_and_queues_survive_a_snapshot() {
    let mut g = Guest::running(true);
    g.control.set_target_pages(300);
    g.drv.write_config(ACTUAL, &200u32.to_le_bytes());
    let buf = g.pfn_buf(&[pfn(PAGES)]);
    g.serve(INFLATEQ, &[buf]);
    let saved = g.drv.transport.save();

    let balloon = Balloon::new().unwrap();
    let control = balloon.control();
    let drv = g.drv.restore(Box::new(balloon), &saved).expect("restore");
    let mut g = Guest { drv, control };
    assert_eq!(g.control.target_pages(), 300);
    assert_eq!(g.control.actual_pages(), 200);
    assert!(g.control.driver_running());
    // The queue goes on where it was.
    g.fill(PAGES + PAGE_SIZE, PAGE_SIZE);
    let buf = g.pfn_buf(&[pfn(PAGES) + 1]);
    g.serve(INFLATEQ, &[buf]);
    assert!(g.all(PAGES + PAGE_SIZE, PAGE_SIZE, 0));
    assert_eq!(g.control.stats().inflated_pages, 1);

    // A snapshot of another device kind is refused.
    let other = crate::virtio::DeviceState::Generic {
        device_type: 5,
        avail_features: 0,
        acked_features: 0,
        queues: None,
    };
    let mut wrong = saved.clone();
    wrong.device = other;
    assert!(g
        .drv
        .restore(Box::new(Balloon::new().unwrap()), &wrong)
        .is_err());
}
