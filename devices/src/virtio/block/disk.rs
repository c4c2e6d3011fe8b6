//! The disk back end: a raw image file or a host block device, and the I/O operations the
//! worker runs on it.
//!
//! Data moves straight between the file and guest memory: `preadv`/`pwritev` on iovecs
//! built from vm-memory volatile slices, no bounce buffer. Discard and write-zeroes use
//! `fallocate` (`PUNCH_HOLE` / `ZERO_RANGE`, keeping the size) on regular files; when the
//! host file system refuses, discard becomes a no-op (it is only a hint) and write-zeroes
//! falls back to writing zeros. Block devices do not offer discard/write-zeroes for now.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use log::{info, warn};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, VolatileSlice};

use super::request::{Segment, SECTOR_SHIFT, SECTOR_SIZE};
use crate::virtio::GuestMem;

/// Bytes of a virtio-blk device ID.
pub const ID_BYTES: usize = 20;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}; check the path and its permissions")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {path} is in use by another process (locked); stop it or give this VM its own copy")]
    Locked { path: PathBuf },
    #[error("cannot read the size of disk image {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("{path} is neither a regular file nor a block device: give a raw disk image")]
    NotADisk { path: PathBuf },
    #[error("disk ID {id:?} is {len} bytes; virtio-blk IDs have at most {ID_BYTES}")]
    IdTooLong { id: String, len: usize },
}

/// An open disk.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    capacity: u64,
    read_only: bool,
    regular: bool,
    id: [u8; ID_BYTES],
    /// `fallocate` modes the host file system refused: stop trying them.
    no_punch_hole: AtomicBool,
    no_zero_range: AtomicBool,
}

impl Disk {
    /// Opens `path` (read-only if `read_only`) and takes an advisory lock on it (shared for
    /// read-only, exclusive otherwise) so that two VMs do not write the same image. `id` is
    /// the device ID the guest sees (`/sys/block/vdX/serial`); by default one is derived
    /// from the file's device and inode numbers.
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Disk, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.into(),
                source,
            })?;
        let lock = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(DiskError::Locked { path: path.into() });
        }
        let size_err = |source| DiskError::Size {
            path: path.into(),
            source,
        };
        let meta = file.metadata().map_err(size_err)?;
        let regular = meta.file_type().is_file();
        let size = if regular {
            meta.len()
        } else if meta.file_type().is_block_device() {
            (&file).seek(SeekFrom::End(0)).map_err(size_err)?
        } else {
            return Err(DiskError::NotADisk { path: path.into() });
        };
        if size % SECTOR_SIZE != 0 {
            warn!(
                "disk {}: size {size} is not a multiple of 512; the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let id = match id {
            Some(id) if id.len() > ID_BYTES => {
                return Err(DiskError::IdTooLong {
                    id: id.into(),
                    len: id.len(),
                })
            }
            Some(id) => id.to_string(),
            None => format!("pv{:x}-{:x}", meta.dev(), meta.ino()),
        };
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        info!(
            "disk {}: {} sectors, {}, id {:?}",
            path.display(),
            size >> SECTOR_SHIFT,
            if read_only { "read-only" } else { "read-write" },
            &id[..n]
        );
        Ok(Disk {
            file,
            path: path.into(),
            capacity: size >> SECTOR_SHIFT,
            read_only,
            regular,
            id: id_bytes,
            no_punch_hole: AtomicBool::new(false),
            no_zero_range: AtomicBool::new(false),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The device ID (NUL-padded).
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether discard and write-zeroes can be offered.
    pub fn supports_discard(&self) -> bool {
        self.regular && !self.read_only
    }

    /// Reads from `sector` into the guest buffers `data`.
    pub fn read(&self, mem: &GuestMem, sector: u64, data: &[Segment]) -> io::Result<()> {
        let slices = guest_slices(mem, data)?;
        transfer(&self.file, &slices, sector << SECTOR_SHIFT, false)?;
        for s in &slices {
            s.bitmap().mark_dirty(0, s.len());
        }
        Ok(())
    }

    /// Writes the guest buffers `data` at `sector`.
    pub fn write(&self, mem: &GuestMem, sector: u64, data: &[Segment]) -> io::Result<()> {
        let slices = guest_slices(mem, data)?;
        transfer(&self.file, &slices, sector << SECTOR_SHIFT, true)
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Drops the contents of the range if the host can; a no-op otherwise (discard is a hint).
    pub fn discard(&self, sector: u64, sectors: u32) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            &self.no_punch_hole,
            sector,
            sectors,
        ) {
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes the range read back as zeros; with `unmap`, space may be deallocated.
    pub fn write_zeroes(&self, sector: u64, sectors: u32, unmap: bool) -> io::Result<()> {
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                &self.no_punch_hole,
                sector,
                sectors,
            ) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            &self.no_zero_range,
            sector,
            sectors,
        ) {
            Err(e) if unsupported(&e) => self.write_zeros_slowly(sector, sectors),
            other => other,
        }
    }

    fn fallocate(
        &self,
        mode: libc::c_int,
        refused: &AtomicBool,
        sector: u64,
        sectors: u32,
    ) -> io::Result<()> {
        if refused.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let offset = to_off(sector << SECTOR_SHIFT)?;
        let len = to_off(u64::from(sectors) << SECTOR_SHIFT)?;
        loop {
            // SAFETY: fallocate on an fd we own; no memory is involved.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                _ if unsupported(&err) => {
                    info!(
                        "disk {}: host file system refuses fallocate mode {mode:#x}; using the fallback",
                        self.path.display()
                    );
                    refused.store(true, Ordering::Relaxed);
                    return Err(err);
                }
                _ => return Err(err),
            }
        }
    }

    fn write_zeros_slowly(&self, sector: u64, sectors: u32) -> io::Result<()> {
        const CHUNK: usize = 64 << 10;
        let zeros = vec![0u8; CHUNK];
        let mut offset = sector << SECTOR_SHIFT;
        let mut left = u64::from(sectors) << SECTOR_SHIFT;
        while left > 0 {
            let n = usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK));
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
            left -= n as u64;
        }
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// The host views of guest buffers (a buffer may span memory regions).
fn guest_slices<'a>(mem: &'a GuestMem, data: &[Segment]) -> io::Result<Vec<VolatileSlice<'a, ()>>> {
    let mut slices = Vec::with_capacity(data.len());
    for seg in data {
        for slice in mem.get_slices(seg.addr, seg.len as usize) {
            slices.push(slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?);
        }
    }
    Ok(slices)
}

/// `preadv`/`pwritev` of all of `slices` at `offset`, resuming after short transfers.
fn transfer(
    file: &File,
    slices: &[VolatileSlice<'_, ()>],
    offset: u64,
    write: bool,
) -> io::Result<()> {
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iovs: Vec<libc::iovec> = guards
        .iter()
        .zip(slices)
        .map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect();
    let mut first = 0;
    let mut offset = to_off(offset)?;
    while first < iovs.len() {
        if iovs[first].iov_len == 0 {
            first += 1;
            continue;
        }
        // At most IOV_MAX (1024) iovecs a call.
        let count = libc::c_int::try_from(iovs.len() - first).map_or(1024, |n| n.min(1024));
        let ptr = iovs[first..].as_ptr();
        // SAFETY: each iovec points into a guest memory mapping that `slices` (borrowing the
        // guest memory) keeps alive for this call, with the slice's own length; `count`
        // iovecs are in bounds of `iovs`. The kernel reads or writes only those ranges.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), ptr, count, offset)
            } else {
                libc::preadv(file.as_raw_fd(), ptr, count, offset)
            }
        };
        let Ok(mut done) = usize::try_from(n) else {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        };
        if done == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the disk image ended early (was it truncated?)",
            ));
        }
        offset += n as libc::off_t;
        while done > 0 {
            let iov = &mut iovs[first];
            if done >= iov.iov_len {
                done -= iov.iov_len;
                iov.iov_len = 0;
                first += 1;
            } else {
                // SAFETY: advancing within the same iovec's buffer (done < iov_len).
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
                iov.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    fn image(bytes: usize) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().set_len(bytes as u64).unwrap();
        f
    }

    #[test]
    fn reads_and_writes_across_regions() {
        // Two adjacent regions: a buffer at their boundary is two slices.
        let mem =
            GuestMem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
                .unwrap();
        let img = image(8192);
        let disk = Disk::open(img.as_path(), false, Some("x")).unwrap();
        let pattern: Vec<u8> = (0..1024).map(|i| u8::try_from(i % 251).unwrap()).collect();
        mem.write_slice(&pattern, GuestAddress(0xe00)).unwrap();
        let seg = [Segment {
            addr: GuestAddress(0xe00),
            len: 1024,
        }];
        disk.write(&mem, 3, &seg).unwrap();
        let mut on_disk = vec![0u8; 1024];
        img.as_file().read_exact_at(&mut on_disk, 3 * 512).unwrap();
        assert_eq!(on_disk, pattern);

        mem.write_slice(&[0u8; 1024], GuestAddress(0xe00)).unwrap();
        disk.read(&mem, 3, &seg).unwrap();
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0xe00)).unwrap();
        assert_eq!(back, pattern);

        // Past the end of the file: an error, not a hang.
        assert!(disk.read(&mem, 16, &seg).is_err());
    }

    #[test]
    fn zero_fallback_and_discard() {
        let img = image(1 << 20);
        img.as_file().write_all_at(&[0xaa; 4096], 4096).unwrap();
        let disk = Disk::open(img.as_path(), false, None).unwrap();
        assert!(disk.supports_discard());
        assert!(disk.id().starts_with(b"pv"));
        disk.write_zeros_slowly(8, 4).unwrap();
        let mut buf = [0u8; 4096];
        img.as_file().read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf[..2048], &[0u8; 2048][..]);
        assert_eq!(&buf[2048..], &[0xaa; 2048][..]);
        disk.discard(0, 2048).unwrap();
        disk.write_zeroes(8, 8, false).unwrap();
        img.as_file().read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0u8; 4096]);
    }

    #[test]
    fn locks_read_write_images_and_checks_ids() {
        let img = image(4096);
        let _rw = Disk::open(img.as_path(), false, None).unwrap();
        assert!(matches!(
            Disk::open(img.as_path(), false, None),
            Err(DiskError::Locked { .. })
        ));
        assert!(matches!(
            Disk::open(img.as_path(), true, None),
            Err(DiskError::Locked { .. })
        ));
        let other = image(4096);
        assert!(matches!(
            Disk::open(other.as_path(), true, Some("123456789012345678901")),
            Err(DiskError::IdTooLong { len: 21, .. })
        ));
        let ro = Disk::open(other.as_path(), true, Some("serial-1")).unwrap();
        assert!(!ro.supports_discard());
        assert_eq!(&ro.id()[..9], b"serial-1\0");
        assert!(matches!(
            Disk::open(Path::new("/dev/null"), true, None),
            Err(DiskError::NotADisk { .. })
        ));
    }
}
