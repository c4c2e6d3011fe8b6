//! A host-side virtio driver for tests: it owns guest memory, lays out split queues in it
//! and drives a device only through its [`MmioTransport`]'s register window, in the order the
//! Linux virtio-mmio driver uses (reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK and
//! read-back, per-queue set-up, DRIVER_OK). Requests are descriptor chains written into
//! guest memory and kicked through `QueueNotify`; the device's subscriber runs on an
//! `event-manager` loop the driver owns, so a test sees exactly what a guest would.
//!
//! Built for tests of this crate and, with the `test-utils` feature, for other crates'
//! tests and benchmarks. Helpers panic with a message on failure (they are test code).
//!
//! Descriptors are written with virtio-queue's mock `DescriptorTable`; the rings are
//! handled here (the mock's `MockSplitQueue` zeroes ring indices whenever it is created,
//! so it cannot follow a queue across requests).
//!
//! Guest memory layout: queue rings from [`QUEUE_AREA`], buffers from [`BUFFER_AREA`]
//! (bump-allocated with [`MmioDriver::alloc`]).

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::DescriptorTable;
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::{regs, MmioTransport};
use super::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use super::{DeviceSubscriber, GuestMem, MmioPersist, PersistError, VirtioDevice};
use crate::bus::BusDevice;

/// The descriptor flags (virtio-bindings has them as `u32`s).
pub const DESC_NEXT: u16 = super::const_u16(VRING_DESC_F_NEXT);
pub const DESC_WRITE: u16 = super::const_u16(VRING_DESC_F_WRITE);
pub const DESC_INDIRECT: u16 = super::const_u16(VRING_DESC_F_INDIRECT);

/// A test's length as a descriptor's or a header's `u32` (past 4 GiB the test is broken).
pub fn len32(len: usize) -> u32 {
    u32::try_from(len).expect("a test length fits u32")
}

/// `size_of::<T>()` as a `u32` length.
pub fn size32<T>() -> u32 {
    len32(std::mem::size_of::<T>())
}

/// Where queue rings go.
pub const QUEUE_AREA: u64 = 0x1_0000;
/// Room per queue (enough for a 4096-entry queue).
const QUEUE_STRIDE: u64 = 0x1_8000;
/// Where buffers are allocated from.
pub const BUFFER_AREA: u64 = 0x20_0000;

/// A buffer in a descriptor chain: (guest address, length, device-writable).
pub type Buf = (GuestAddress, u32, bool);

/// The driver's view of one split queue.
#[derive(Debug, Clone)]
pub struct DriverQueue {
    pub index: u32,
    pub size: u16,
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// Writes a chain of `bufs` (linked with NEXT) at the next free descriptors and makes it
    /// available. Returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMem, bufs: &[Buf]) -> u16 {
        assert!(
            !bufs.is_empty() && bufs.len() <= self.size as usize,
            "chain length"
        );
        let head = self.next_desc;
        let table = DescriptorTable::new(mem, self.desc_table, self.size);
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = u16::try_from((usize::from(head) + i) % usize::from(self.size)).unwrap();
            let last = i + 1 == bufs.len();
            let mut flags = if writable { DESC_WRITE } else { 0 };
            if !last {
                flags |= DESC_NEXT;
            }
            let next = (idx + 1) % self.size;
            let desc = Descriptor::new(addr.0, len, flags, next);
            table
                .store(idx, RawDescriptor::from(desc))
                .expect("descriptor store");
        }
        self.next_desc =
            u16::try_from((usize::from(head) + bufs.len()) % usize::from(self.size)).unwrap();
        self.make_available(mem, head);
        head
    }

    /// Stores raw descriptors at table indices `[first, first + descs.len())` without any
    /// fix-up (for hostile chains: loops, bad links, bad flags).
    pub fn store_raw(&self, mem: &GuestMem, first: u16, descs: &[Descriptor]) {
        let table = DescriptorTable::new(mem, self.desc_table, self.size);
        for (i, d) in descs.iter().enumerate() {
            table
                .store(first + u16::try_from(i).unwrap(), RawDescriptor::from(*d))
                .expect("descriptor store");
        }
    }

    /// Puts `head` on the available ring and publishes the new index.
    pub fn make_available(&mut self, mem: &GuestMem, head: u16) {
        let slot = self.avail_ring.0 + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Writes the available ring's `idx` as is (hostile tests can lie with it).
    pub fn set_avail_idx(&self, mem: &GuestMem, idx: u16) {
        fence(Ordering::SeqCst);
        mem.store(
            idx.to_le(),
            GuestAddress(self.avail_ring.0 + 2),
            Ordering::Release,
        )
        .unwrap();
    }

    /// Writes `used_event` (for `VIRTIO_RING_F_EVENT_IDX`).
    pub fn set_used_event(&self, mem: &GuestMem, idx: u16) {
        let addr = self.avail_ring.0 + 4 + 2 * u64::from(self.size);
        mem.write_obj(idx.to_le(), GuestAddress(addr)).unwrap();
        fence(Ordering::SeqCst);
    }

    /// The used ring's `idx`.
    pub fn used_idx(&self, mem: &GuestMem) -> u16 {
        u16::from_le(
            mem.load(GuestAddress(self.used_ring.0 + 2), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// Used entries (head id, length) the driver has not seen yet.
    pub fn take_used(&mut self, mem: &GuestMem) -> Vec<(u32, u32)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = self.used_ring.0 + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(slot)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(slot + 4)).unwrap();
            out.push((u32::from_le(id), u32::from_le(len)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// Drives one device through its virtio-mmio transport.
pub struct MmioDriver {
    pub mem: GuestMem,
    pub transport: MmioTransport,
    pub queues: Vec<DriverQueue>,
    irq: EventFd,
    events: EventManager<DeviceSubscriber>,
    mem_size: u64,
    next_buf: u64,
}

impl MmioDriver {
    /// Wraps `device` in a transport over `mem_size` bytes of guest memory (from 0) and puts
    /// its subscriber on a private event loop.
    pub fn new(device: Box<dyn VirtioDevice>, mem_size: usize) -> MmioDriver {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), mem_size)]).expect("guest memory");
        Self::over(mem, device)
    }

    fn over(mem: GuestMem, device: Box<dyn VirtioDevice>) -> MmioDriver {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let transport =
            MmioTransport::new(mem.clone(), device, irq.try_clone().unwrap()).expect("transport");
        let mut events = EventManager::new().expect("event manager");
        events.add_subscriber(transport.subscriber());
        MmioDriver {
            mem_size: mem.last_addr().0 + 1,
            mem,
            transport,
            queues: Vec::new(),
            irq,
            events,
            next_buf: BUFFER_AREA,
        }
    }

    /// What a restored VM's guest continues with: `device` (built anew) restored from
    /// `saved` over a copy of this driver's guest memory (the snapshot's memory), and this
    /// driver's view of the queues and buffers.
    pub fn restore(
        &self,
        device: Box<dyn VirtioDevice>,
        saved: &MmioPersist,
    ) -> Result<MmioDriver, PersistError> {
        let size = usize::try_from(self.mem_size).unwrap();
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory");
        let mut image = vec![0u8; size];
        self.mem.read_slice(&mut image, GuestAddress(0)).unwrap();
        mem.write_slice(&image, GuestAddress(0)).unwrap();
        let mut drv = Self::over(mem, device);
        drv.transport.restore(saved)?;
        drv.queues = self.queues.clone();
        drv.next_buf = self.next_buf;
        Ok(drv)
    }

    /// A 32-bit register read.
    pub fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// A 32-bit register write.
    pub fn write32(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// Reads `len` bytes of the device config space at `offset`.
    pub fn read_config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.transport.read(regs::CONFIG + offset, &mut b);
        b
    }

    /// Writes `data` to the device config space at `offset`.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.transport.write(regs::CONFIG + offset, data);
    }

    /// The `Status` register.
    pub fn status(&mut self) -> u32 {
        self.read32(regs::STATUS)
    }

    /// Adds `bit` to the status the way Linux does (read, OR, write).
    pub fn add_status(&mut self, bit: u32) {
        let s = self.status();
        self.write32(regs::STATUS, s | bit);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (`wanted` ∩ offered) and FEATURES_OK
    /// with read-back. Returns the negotiated features, or the status if FEATURES_OK was
    /// refused.
    pub fn negotiate(&mut self, wanted: u64) -> Result<u64, u32> {
        self.write32(regs::STATUS, 0);
        assert_eq!(self.read32(regs::MAGIC_VALUE), 0x7472_6976, "magic");
        assert_eq!(self.read32(regs::VERSION), 2, "version");
        self.add_status(ACKNOWLEDGE);
        self.add_status(DRIVER);
        let offered = self.device_features();
        let features = wanted & offered;
        self.write_driver_features(features);
        self.add_status(FEATURES_OK);
        let status = self.status();
        if status & FEATURES_OK == 0 {
            return Err(status);
        }
        Ok(features)
    }

    /// The device's offered features (both pages).
    pub fn device_features(&mut self) -> u64 {
        self.write32(regs::DEVICE_FEATURES_SEL, 0);
        let low = self.read32(regs::DEVICE_FEATURES);
        self.write32(regs::DEVICE_FEATURES_SEL, 1);
        let high = self.read32(regs::DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Writes both pages of the driver features.
    pub fn write_driver_features(&mut self, features: u64) {
        self.write32(regs::DRIVER_FEATURES_SEL, 0);
        self.write32(regs::DRIVER_FEATURES, (features & 0xffff_ffff) as u32);
        self.write32(regs::DRIVER_FEATURES_SEL, 1);
        self.write32(regs::DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// Sets up queue `index` with `size` entries (as Linux `vm_setup_vq`) at its slot in
    /// [`QUEUE_AREA`], without checking the size, and marks it ready.
    pub fn setup_queue(&mut self, index: u32, size: u16) -> DriverQueue {
        self.write32(regs::QUEUE_SEL, index);
        assert_eq!(
            self.read32(regs::QUEUE_READY),
            0,
            "queue {index} already ready"
        );
        let base = QUEUE_AREA + u64::from(index) * QUEUE_STRIDE;
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        let q = DriverQueue {
            index,
            size,
            desc_table: GuestAddress(desc),
            avail_ring: GuestAddress(avail),
            used_ring: GuestAddress(used),
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        // Clean rings, as a fresh allocation in the guest would be.
        let len = usize::try_from(used + 6 + 8 * n - desc).unwrap();
        self.mem
            .write_slice(&vec![0u8; len], GuestAddress(desc))
            .unwrap();
        self.write32(regs::QUEUE_NUM, u32::from(size));
        for (low, value) in [
            (regs::QUEUE_DESC_LOW, desc),
            (regs::QUEUE_DRIVER_LOW, avail),
            (regs::QUEUE_DEVICE_LOW, used),
        ] {
            self.write32(low, (value & 0xffff_ffff) as u32);
            self.write32(low + 4, (value >> 32) as u32);
        }
        self.write32(regs::QUEUE_READY, 1);
        q
    }

    /// Sets up every queue at `min(size, QueueNumMax)`.
    pub fn setup_queues(&mut self, size: u16) {
        let count = u32::try_from(self.transport.device().queue_max_sizes().len()).unwrap();
        self.queues.clear();
        for i in 0..count {
            self.write32(regs::QUEUE_SEL, i);
            let max = u16::try_from(self.read32(regs::QUEUE_NUM_MAX)).unwrap();
            let q = self.setup_queue(i, size.min(max));
            self.queues.push(q);
        }
    }

    /// The whole Linux probe sequence: negotiate, set up queues, DRIVER_OK. Panics if the
    /// device does not come up.
    pub fn activate(&mut self, wanted: u64, queue_size: u16) -> u64 {
        let features = self
            .negotiate(wanted)
            .unwrap_or_else(|s| panic!("FEATURES_OK refused, status {s:#x}"));
        self.setup_queues(queue_size);
        self.add_status(DRIVER_OK);
        let status = self.status();
        assert_eq!(
            status,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
            "device did not activate"
        );
        features
    }

    /// Bump-allocates `len` bytes of guest memory (4 KiB aligned) for buffers.
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let addr = self.next_buf;
        self.next_buf = (addr + len.max(1) + 0xfff) & !0xfff;
        assert!(
            self.next_buf <= self.mem_size,
            "test guest memory exhausted"
        );
        GuestAddress(addr)
    }

    /// Adds a chain to queue `q` and kicks it through `QueueNotify`.
    pub fn submit(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let head = self.queues[q].add_chain(&self.mem, bufs);
        self.kick_queue(q);
        head
    }

    /// Kicks queue `q` (an index into the device's queues).
    pub fn kick_queue(&mut self, q: usize) {
        self.kick(u32::try_from(q).expect("a queue index"));
    }

    /// Writes `QueueNotify`.
    pub fn kick(&mut self, q: u32) {
        self.write32(regs::QUEUE_NOTIFY, q);
    }

    /// Runs the device's subscriber for up to `ms` milliseconds of waiting; returns the
    /// number of events dispatched (0 if nothing happened: a device with nothing to do must
    /// not keep waking the loop).
    pub fn run_events(&mut self, ms: i32) -> usize {
        self.events.run_with_timeout(ms).expect("event loop")
    }

    /// Runs the event loop until queue `q` has `n` new used entries; panics after `timeout`.
    pub fn wait_used(&mut self, q: usize, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let start = Instant::now();
        let mut got = Vec::new();
        loop {
            got.extend(self.queues[q].take_used(&self.mem));
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < timeout,
                "queue {q}: {} of {n} used entries after {timeout:?}",
                got.len()
            );
            self.run_events(5);
        }
    }

    /// Waits until queue `q` has new used entries and returns them; panics after `timeout`.
    /// For devices that complete on worker threads: it runs the event loop without blocking
    /// (to pass kicks on) and sleeps in `poll` on the irqfd, so it returns as soon as the
    /// device signals (the driver must want interrupts for this queue).
    pub fn wait_used_irq(&mut self, q: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            self.run_events(0);
            let used = self.queues[q].take_used(&self.mem);
            if !used.is_empty() {
                return used;
            }
            let now = Instant::now();
            assert!(now < deadline, "queue {q}: no used entry after {timeout:?}");
            let ms = (deadline - now).as_millis().min(1000) as i32;
            let mut pfd = libc::pollfd {
                fd: self.irq.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid pollfd for the duration of the call; count is 1.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            self.take_irqs();
        }
    }

    /// Runs the event loop for `duration` and returns the used entries that appeared (to
    /// check that nothing was used).
    pub fn settle(&mut self, q: usize, duration: Duration) -> Vec<(u32, u32)> {
        let start = Instant::now();
        while start.elapsed() < duration {
            self.run_events(5);
        }
        self.queues[q].take_used(&self.mem)
    }

    /// The irqfd the device signals (to `poll` it instead of polling the used ring).
    pub fn irq_event(&self) -> &EventFd {
        &self.irq
    }

    /// Interrupts raised on the irqfd since the last call.
    pub fn take_irqs(&mut self) -> u64 {
        self.irq.read().unwrap_or(0)
    }

    /// Waits up to `timeout` for the irqfd to fire; returns the count (0 on timeout). The
    /// device raises the interrupt after publishing used entries, so wait for it before
    /// checking `InterruptStatus`.
    pub fn wait_irq(&mut self, timeout: Duration) -> u64 {
        let start = Instant::now();
        loop {
            let n = self.take_irqs();
            if n > 0 || start.elapsed() >= timeout {
                return n;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Reads `InterruptStatus` and acknowledges all of it; returns what was set.
    pub fn ack_interrupt(&mut self) -> u32 {
        let isr = self.read32(regs::INTERRUPT_STATUS);
        self.write32(regs::INTERRUPT_ACK, isr);
        isr
    }

    /// Guest memory at `addr`.
    pub fn read_mem(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, addr).unwrap();
        b
    }

    /// Writes guest memory at `addr`.
    pub fn write_mem(&self, addr: GuestAddress, data: &[u8]) {
        self.mem.write_slice(data, addr).unwrap();
    }
}
