//! `make bench-devices`: what podvisor's virtio devices cost on the host, next to a raw
//! baseline measured in the same run.
//!
//! ## Method
//! Each device is driven through its real virtio-mmio transport by the host-side test driver
//! (`devices::virtio::test_utils::MmioDriver`), which plays the guest's virtio driver on this
//! thread: it writes descriptor chains into guest memory, writes `QueueNotify` (the
//! transport signals the queue's kick eventfd, as a KVM ioeventfd would), runs the device's
//! event-loop subscriber (the VMM's event loop), and sleeps in `poll(2)` on the irqfd until
//! the device completes. Buffers are allocated in guest memory once and reused: the driver
//! never copies or zeroes request data.
//!
//! * virtio-blk: one request in flight, random aligned offsets (fixed-seed xorshift) in a
//!   [`FILE_SIZE`] temp file whose pages are cached; 1 MiB requests in 128 KiB segments
//!   (the device's `size_max`). Baseline: `pread`/`pwrite` of the same sizes and offset
//!   sequence on the same file, into a heap buffer.
//! * virtio-fs: FUSE READ/WRITE on a [`FILE_SIZE`] file of a temp dir, one request in flight,
//!   data in 64 KiB descriptors, same offsets. Baseline: `pread`/`pwrite` on that file.
//! * virtio-vsock: one stream opened from the host (`CONNECT` on the VM's Unix socket). A
//!   peer thread writes (read: host → guest) or reads (write: guest → host) `size`-byte
//!   chunks on its end; the driver plays Linux 6.1's vsock driver (4 KiB receive buffers, a
//!   full RX queue, 256 KiB of credit, packets of at most 64 KiB, one kick per chunk).
//!   Baseline: the same peer thread on a Unix socket pair, this thread on the other end.
//!
//! * virtio-net: see `net.rs` (a tap in a network namespace of the bench's own, frames of
//!   1514 and 64000 bytes, one in flight). Baseline: `writev`/`readv` on a second tap.
//!
//! "read" moves data into guest memory (or to this thread, for a baseline), "write" out of
//! it. A request is one `size`-byte I/O (for vsock: one chunk). For each cell the number of
//! requests per run is calibrated (doubling until a run takes [`Timing::run`] / 8), then
//! [`Timing::runs`] runs of about [`Timing::run`] each are timed, device and baseline
//! alternating so that both see the same load from the rest of the host; the table shows
//! the median rates and their spread.
//!
//! ## What the numbers mean
//! Driver, event loop, device workers and (for vsock) the peer all run on this host, on the
//! same cores: a device figure is the host CPU cost of the device path plus the driver's
//! small share (descriptor writes, one eventfd write per kick, one `poll` per completion)
//! and the thread hand-offs between them. It is not guest-visible throughput: a real guest
//! adds VM exits for notifications and interrupts and its own kernel work, and on the
//! nested-PVM hosts of this project guest kernel code is emulated (see NOTES.md).
//!
//! `cargo test --bench devices` (no `--bench` flag) runs every cell briefly as a smoke test;
//! an argument selects devices by name (`cargo bench ... --bench devices -- vsock`).

mod blk;
mod file;
mod fs;
mod net;
mod vsock;

use std::time::{Duration, Instant};

/// Size of the file behind virtio-blk and virtio-fs.
pub const FILE_SIZE: u64 = 64 << 20;
/// Request sizes measured.
const SIZES: [usize; 2] = [4 << 10, 1 << 20];
/// Seed of the offset sequence.
pub const SEED: u64 = 0x5eed_f00d_b10c;
/// How long to wait for one completion before giving up (a hang, not a measurement).
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Direction of data, seen from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Data into guest memory (device → driver).
    Read,
    /// Data out of guest memory (driver → device).
    Write,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Read => "read",
            Dir::Write => "write",
        }
    }
}

/// Something to measure: a device through its transport, or a baseline.
pub trait Subject {
    /// A run of `n` requests of `size` bytes in direction `dir`; the returned closure is
    /// called once per timed run (and starts its offset sequence from [`SEED`]).
    fn cell(&mut self, dir: Dir, size: usize) -> Box<dyn FnMut(u64) + '_>;
}

/// How long cells run.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Target duration of one timed run.
    pub run: Duration,
    /// Timed runs per cell (the median is kept).
    pub runs: usize,
}

/// Wall time of `op(n)` in seconds.
fn time(op: &mut dyn FnMut(u64), n: u64) -> f64 {
    let start = Instant::now();
    op(n);
    start.elapsed().as_secs_f64()
}

/// The number of requests that makes `op` run for about `t.run` (doubling from 1 until a run
/// takes an eighth of that, which also warms the path up).
fn calibrate(t: Timing, op: &mut dyn FnMut(u64)) -> u64 {
    let target = t.run.as_secs_f64();
    let mut n = 1;
    let mut took = time(op, n);
    while took < target / 8.0 {
        n *= 2;
        took = time(op, n);
    }
    ceil_count(n as f64 * target / took).max(1)
}

/// A run count from a float estimate, rounded up. Float-to-int `as` saturates (NaN gives
/// 0), which is what a count wants.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn ceil_count(x: f64) -> u64 {
    x.ceil() as u64
}

/// Rates (requests/s) of timed runs: median and spread ((max - min) / median).
struct Rates(Vec<f64>);

impl Rates {
    fn median(&self) -> f64 {
        let mut r = self.0.clone();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    }

    fn spread(&self) -> f64 {
        let max = self.0.iter().copied().fold(f64::MIN, f64::max);
        let min = self.0.iter().copied().fold(f64::MAX, f64::min);
        (max - min) / self.median()
    }
}

/// Times `dev` and `base` in alternating runs, so that both see the same load from other
/// processes on the host.
fn measure(t: Timing, dev: &mut dyn FnMut(u64), base: &mut dyn FnMut(u64)) -> (Rates, Rates) {
    let (n_dev, n_base) = (calibrate(t, dev), calibrate(t, base));
    let (mut d, mut b) = (Vec::new(), Vec::new());
    for _ in 0..t.runs {
        d.push(n_dev as f64 / time(dev, n_dev));
        b.push(n_base as f64 / time(base, n_base));
    }
    (Rates(d), Rates(b))
}

/// Measures every cell of `device` and its `baseline`, printing a row per cell.
fn bench(
    t: Timing,
    name: &str,
    sizes: &[usize],
    device: &mut dyn Subject,
    baseline: &mut dyn Subject,
) {
    for dir in [Dir::Read, Dir::Write] {
        for &size in sizes {
            let (dev, base) = measure(
                t,
                &mut *device.cell(dir, size),
                &mut *baseline.cell(dir, size),
            );
            let mib = |rate: f64| rate * size as f64 / f64::from(1 << 20);
            let (d, b) = (dev.median(), base.median());
            println!(
                "{name:<13} {:<5} {:>5}  {:>9.1} {:>9.0} {:>5.0}%  {:>9.1} {:>9.0} {:>5.0}%  {:>6.3}",
                dir.name(),
                size_name(size),
                mib(d),
                d,
                dev.spread() * 100.0,
                mib(b),
                b,
                base.spread() * 100.0,
                d / b,
            );
        }
    }
}

fn size_name(size: usize) -> String {
    if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{}M", size >> 20)
    } else if size.is_multiple_of(1024) {
        format!("{}K", size >> 10)
    } else {
        format!("{size}")
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: a quick smoke run.
    // Another argument selects devices by name (`-- vsock`).
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--bench");
    let filter = args.iter().find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.is_none_or(|f| name.contains(f.as_str()));
    let t = if full {
        Timing {
            run: Duration::from_millis(150),
            runs: 5,
        }
    } else {
        Timing {
            run: Duration::from_millis(5),
            runs: 1,
        }
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split(' ').next().unwrap_or("?");
    println!("virtio device throughput, host-side driver through the virtio-mmio transport");
    println!(
        "({cpus} CPUs, load {load}; median of {} runs of ~{:?} per cell; blk/fs: one request in flight)",
        t.runs, t.run
    );
    println!("The driver plays the guest on this thread. Its share per request: descriptor and");
    println!("ring stores, an eventfd write per kick (as an ioeventfd), a poll(2) wake-up on the");
    println!("irqfd per completion; data stays in guest memory, never copied by the driver.");
    println!("Driver, event loop, device threads and peers share this host's CPUs: device");
    println!("figures are the device path's host CPU cost plus thread hand-offs, not");
    println!("guest-visible throughput (no VM exits, no guest kernel). Method: the module doc");
    println!("of devices/benches/devices/main.rs.");
    println!();
    println!(
        "{:<13} {:<5} {:>5}  {:>9} {:>9} {:>6}  {:>9} {:>9} {:>6}  {:>6}",
        "device",
        "dir",
        "size",
        "dev MiB/s",
        "dev req/s",
        "spread",
        "raw MiB/s",
        "raw req/s",
        "spread",
        "ratio"
    );
    let started = Instant::now();

    if wanted("virtio-blk") {
        let (mut dev, mut raw) = blk::setup();
        bench(t, "virtio-blk", &SIZES, &mut dev, &mut raw);
    }
    if wanted("virtio-fs") {
        let (mut dev, mut raw) = fs::setup();
        bench(t, "virtio-fs", &SIZES, &mut dev, &mut raw);
    }
    if wanted("virtio-vsock") {
        let (mut dev, mut raw) = vsock::setup();
        bench(t, "virtio-vsock", &SIZES, &mut dev, &mut raw);
    }

    if wanted("virtio-net") {
        if devices::virtio::net::test_net::can_make_taps() {
            devices::virtio::net::test_net::in_new_netns(move || {
                let (mut dev, mut raw) = net::setup();
                bench(t, "virtio-net", &net::SIZES, &mut dev, &mut raw);
            });
        } else {
            println!("virtio-net    SKIPPED: needs root and /dev/net/tun for a tap");
        }
    }

    println!();
    println!("raw: blk, fs = pread/pwrite on the same file; vsock = a Unix socket pair;");
    println!("net = writev/readv on a second tap (frames of 1514 and 64000 bytes).");
    println!("ratio = device req/s / raw req/s (medians); spread = (max - min) / median of");
    println!("the runs. Took {:.1?}.", started.elapsed());
}
