//! The console log file of a VM whose guest may be hostile: bounded in size and in rate.
//!
//! Every byte the guest writes to its UART ends up here, and the guest writes as much and
//! as fast as it likes. So the log
//! - never holds more than its cap on disk: when the next write would pass it, the newest
//!   half of the file is moved to its start and the rest cut off, so the newest output (a
//!   panic, the last agent lines) is always kept;
//! - takes at most [`ConsoleCap::bytes_per_sec`] (after a burst of [`ConsoleCap::burst`]):
//!   what is over is dropped and a line in the log says how much;
//! - is created owner-only (0600): guest output can hold secrets;
//! - never blocks or fails the guest's UART: errors and drops are the log's own;
//! - works on the file descriptor it opened, with positional reads and writes and a
//!   truncate, nothing by path: the vCPU threads that write it run under a seccomp filter
//!   (`crate::seccomp`) that allows no path operation.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The bounds of a console log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleCap {
    /// Bytes on disk at most.
    pub max_bytes: u64,
    /// Sustained rate, bytes per second.
    pub bytes_per_sec: u64,
    /// Bytes that may come at once before the rate applies.
    pub burst: u64,
}

impl Default for ConsoleCap {
    /// 1 MiB on disk; 64 KiB/s after a 256 KiB burst (a guest kernel's whole boot log is
    /// tens of KiB).
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            bytes_per_sec: 64 << 10,
            burst: 256 << 10,
        }
    }
}

/// A console log file with a [`ConsoleCap`].
pub struct CappedLog {
    file: File,
    /// Bytes in the file (where the next write goes).
    written: u64,
    cap: ConsoleCap,
    tokens: f64,
    refilled: Instant,
    /// Bytes dropped since the last marker line.
    dropped: u64,
}

impl CappedLog {
    /// Opens (appends to) `path`.
    pub fn open(path: &Path, cap: ConsoleCap) -> io::Result<CappedLog> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(CappedLog {
            file,
            written,
            cap,
            tokens: cap.burst as f64,
            refilled: Instant::now(),
            dropped: 0,
        })
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens =
            (self.tokens + secs * self.cap.bytes_per_sec as f64).min(self.cap.burst as f64);
    }

    /// Keeps the newest half of the file when `len` more bytes would pass the cap.
    fn make_room_for(&mut self, len: u64) -> io::Result<()> {
        if self.written + len <= self.cap.max_bytes {
            return Ok(());
        }
        let keep = (self.cap.max_bytes / 2).min(self.written);
        let mut tail = vec![0u8; keep as usize];
        self.file.read_exact_at(&mut tail, self.written - keep)?;
        self.file.write_all_at(&tail, 0)?;
        self.file.set_len(keep)?;
        self.written = keep;
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) {
        // Never more than half the cap at once, whatever one write brings.
        let bytes = &bytes[bytes.len() - bytes.len().min((self.cap.max_bytes / 2) as usize)..];
        let written = self
            .make_room_for(bytes.len() as u64)
            .and_then(|()| self.file.write_all_at(bytes, self.written));
        if written.is_ok() {
            self.written += bytes.len() as u64;
        }
    }

    /// Writes what the rate allows of `buf` at `now`; the rest is counted as dropped.
    pub fn write_at(&mut self, buf: &[u8], now: Instant) {
        self.refill(now);
        // Float-to-int `as` saturates: the whole tokens, 0 when there are none.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = (self.tokens.max(0.0) as usize).min(buf.len());
        if n > 0 && self.dropped > 0 {
            let marker = format!(
                "\n[podvisor: {} bytes of console output dropped: over {} bytes/s]\n",
                self.dropped, self.cap.bytes_per_sec
            );
            self.dropped = 0;
            self.append(marker.as_bytes());
        }
        if n > 0 {
            self.append(&buf[..n]);
            self.tokens -= n as f64;
        }
        self.dropped += (buf.len() - n) as u64;
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_at(buf, Instant::now());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    fn on_disk(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    #[test]
    fn a_flood_stays_within_the_cap_and_the_rate() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("console.log");
        let cap = ConsoleCap {
            max_bytes: 64 << 10,
            bytes_per_sec: 4 << 10,
            burst: 16 << 10,
        };
        let mut log = CappedLog::open(&path, cap).unwrap();
        let t0 = Instant::now();
        // 100 MiB over 10 simulated seconds, a byte at a time as the UART writes, then
        // in big writes.
        for i in 0..(1u64 << 20) {
            log.write_at(b"x", t0 + Duration::from_micros(i * 10));
        }
        let chunk = vec![b'y'; 1 << 20];
        for i in 0..99u64 {
            log.write_at(
                &chunk,
                t0 + Duration::from_secs(10) + Duration::from_millis(i),
            );
        }
        assert!(on_disk(&path) <= cap.max_bytes, "{} bytes", on_disk(&path));
        // Burst plus 10 s of rate, plus the marker lines.
        let kept = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&kept);
        assert!(text.contains("bytes of console output dropped"), "{text}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // The newest output is what is kept.
        log.write_at(b"the last line\n", t0 + Duration::from_secs(60));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("the last line\n"), "{text}");
    }

    #[test]
    fn below_the_rate_nothing_is_dropped() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("console.log");
        let mut log = CappedLog::open(&path, ConsoleCap::default()).unwrap();
        let t0 = Instant::now();
        for i in 0..1000u64 {
            log.write_at(b"boot line\n", t0 + Duration::from_millis(i));
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10_000);
    }
}
