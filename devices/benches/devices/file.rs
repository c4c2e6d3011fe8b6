//! What virtio-blk and virtio-fs share: the test file, its offset sequence and the raw
//! `pread`/`pwrite` baseline.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{Dir, Subject, FILE_SIZE, SEED};

/// Random `size`-aligned offsets in [`FILE_SIZE`] bytes (xorshift64 from [`SEED`]).
pub struct Offsets {
    state: u64,
    slots: u64,
    size: u64,
}

impl Offsets {
    pub fn new(size: usize) -> Offsets {
        Offsets {
            state: SEED,
            slots: FILE_SIZE / size as u64,
            size: size as u64,
        }
    }
}

impl Iterator for Offsets {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        Some(self.state % self.slots * self.size)
    }
}

/// A test pattern of `len` bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31) ^ (i >> 12).to_le_bytes()[0])
        .collect()
}

/// Fills `file` with [`FILE_SIZE`] bytes of pattern, so reads hit cached pages.
pub fn fill(file: &File) {
    let chunk = pattern(1 << 20);
    for off in (0..FILE_SIZE).step_by(chunk.len()) {
        file.write_all_at(&chunk, off).expect("fill the test file");
    }
}

/// `pread`/`pwrite` on the file, into and out of a heap buffer.
pub struct RawFile {
    file: File,
    buf: Vec<u8>,
}

impl RawFile {
    pub fn new(file: File) -> RawFile {
        RawFile {
            file,
            buf: pattern(1 << 20),
        }
    }
}

/// One request on the test file at a time; measured over the [`Offsets`] sequence.
pub trait FileIo {
    /// A `size`-byte read or write at byte `offset`, completed.
    fn io(&mut self, dir: Dir, offset: u64, size: usize);
}

impl<T: FileIo> Subject for T {
    fn cell(&mut self, dir: Dir, size: usize) -> Box<dyn FnMut(u64) + '_> {
        Box::new(move |n| {
            for off in Offsets::new(size).take(usize::try_from(n).expect("a run count")) {
                self.io(dir, off, size);
            }
        })
    }
}

impl FileIo for RawFile {
    fn io(&mut self, dir: Dir, offset: u64, size: usize) {
        let buf = &mut self.buf[..size];
        match dir {
            Dir::Read => self.file.read_exact_at(buf, offset),
            Dir::Write => self.file.write_all_at(buf, offset),
        }
        .expect("raw file I/O");
    }
}
