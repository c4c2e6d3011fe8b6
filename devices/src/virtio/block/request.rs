//! Parsing a virtio-blk descriptor chain into a [`Request`], with every check a hostile
//! guest could make fail.
//!
//! Layout (virtio 1.x §5.2.6), as Linux and every other driver lay it out:
//! one device-readable header descriptor (`type: le32, reserved: le32, sector: le64`),
//! zero or more data descriptors, and a device-writable status descriptor last (one byte is
//! written at its start). Data direction: device-writable for IN and GET_ID, device-readable
//! for OUT, DISCARD and WRITE_ZEROES; FLUSH has none.
//!
//! Parsing only reads guest memory (the header and the small discard payload); it never
//! writes. A chain that cannot be parsed gives a [`ParseFailure`] that says where the status
//! byte is, if the chain has a usable one, so that the caller can complete the request with
//! `IOERR`/`UNSUPP`; otherwise the caller returns the chain with length 0.
//!
//! Everything here is plain data and unit-testable without a VM.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{MAX_DISCARD_SECTORS, MAX_REQUEST_BYTES, MAX_WRITE_ZEROES_SECTORS, SEG_MAX};
use crate::virtio::const_u8;

/// Size of a disk sector as virtio-blk counts them.
pub const SECTOR_SIZE: u64 = 512;
/// The status bytes a request completes with.
pub const STATUS_OK: u8 = const_u8(VIRTIO_BLK_S_OK);
pub const STATUS_IOERR: u8 = const_u8(VIRTIO_BLK_S_IOERR);
pub const STATUS_UNSUPP: u8 = const_u8(VIRTIO_BLK_S_UNSUPP);
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of the request header.
const HEADER_LEN: u32 = 16;
/// Size of one discard / write-zeroes range.
const RANGE_LEN: u32 = 16;
/// The most descriptors a valid request has: header, data, status.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// A guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes from `sector` into `data`.
    In { sector: u64, data: Vec<Segment> },
    /// Write `data` at `sector`.
    Out { sector: u64, data: Vec<Segment> },
    /// Make completed writes durable.
    Flush,
    /// Write the device ID (up to 20 bytes) into `data`.
    GetId { data: Vec<Segment> },
    /// The range's contents may be dropped.
    Discard { sector: u64, sectors: u32 },
    /// The range must read back as zeros (`unmap`: may deallocate).
    WriteZeroes {
        sector: u64,
        sectors: u32,
        unmap: bool,
    },
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index (for the used ring).
    pub head: u16,
    pub kind: RequestKind,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total data bytes of a request with data segments.
    pub fn data_len(&self) -> u64 {
        match &self.kind {
            RequestKind::In { data, .. }
            | RequestKind::Out { data, .. }
            | RequestKind::GetId { data } => data.iter().map(|s| u64::from(s.len)).sum(),
            _ => 0,
        }
    }
}

/// What the disk and the negotiated features allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimits {
    /// Capacity in sectors.
    pub capacity: u64,
    pub read_only: bool,
    /// `VIRTIO_BLK_F_DISCARD` negotiated.
    pub discard: bool,
    /// `VIRTIO_BLK_F_WRITE_ZEROES` negotiated.
    pub write_zeroes: bool,
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain is empty (bad head index?)")]
    Empty,
    #[error("descriptor chain ends in a descriptor with NEXT set: a loop, a bad next index or a bad indirect table")]
    Truncated,
    #[error("descriptor chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    #[error("descriptor chain has {0} descriptors; a request needs a header and a status")]
    TooShort(usize),
    #[error("status descriptor is not device-writable")]
    StatusNotWritable,
    #[error("status descriptor has length 0")]
    StatusEmpty,
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusOutOfMemory(u64),
    #[error("header descriptor is device-writable")]
    HeaderWritable,
    #[error("header descriptor has {0} bytes, needs {HEADER_LEN}")]
    HeaderTooShort(u32),
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("data descriptor {0} has the wrong direction for this request type")]
    WrongDirection(usize),
    #[error("request needs data descriptors and has none")]
    MissingData,
    #[error("request type takes no data but has {0} data descriptors")]
    UnexpectedData(usize),
    #[error("{0} data descriptors, more than seg_max {SEG_MAX}")]
    TooManySegments(usize),
    #[error("data length {0} is more than the {MAX_REQUEST_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sectors {sector}+{sectors} are beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("discard/write-zeroes payload of {0} bytes; exactly one 16-byte range is allowed")]
    RangeCount(u32),
    #[error("discard/write-zeroes flags {0:#x} not supported")]
    RangeFlags(u32),
    #[error("discard/write-zeroes of {sectors} sectors is more than the {max}-sector limit")]
    RangeTooLarge { sectors: u32, max: u32 },
}

impl RequestError {
    /// The status byte a request failing this way completes with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::RangeFlags(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// A chain that is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseFailure {
    pub head: u16,
    /// Where the status byte goes, if the chain has a usable status descriptor.
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

/// Parses the descriptors of the chain with head index `head`.
pub fn parse<M, I>(
    head: u16,
    chain: I,
    mem: &M,
    limits: &DiskLimits,
) -> Result<Request, ParseFailure>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let fail = |status, error| ParseFailure {
        head,
        status,
        error,
    };
    let descs: Vec<Descriptor> = chain.into_iter().take(MAX_DESCRIPTORS + 1).collect();
    let Some(last) = descs.last() else {
        return Err(fail(None, RequestError::Empty));
    };
    if descs.len() > MAX_DESCRIPTORS {
        return Err(fail(None, RequestError::TooLong));
    }
    // The chain iterator stops quietly on a loop (after queue-size descriptors), a next
    // index past the table or a bad indirect table: the last descriptor then says NEXT.
    if last.has_next() {
        return Err(fail(None, RequestError::Truncated));
    }
    let status = status_addr(last, mem).map_err(|e| fail(None, e))?;
    let fail = |error| fail(Some(status), error);
    if descs.len() < 2 {
        return Err(fail(RequestError::TooShort(descs.len())));
    }
    let header = &descs[0];
    if header.is_write_only() {
        return Err(fail(RequestError::HeaderWritable));
    }
    if header.len() < HEADER_LEN {
        return Err(fail(RequestError::HeaderTooShort(header.len())));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr()).map_err(|_| {
        fail(RequestError::OutOfMemory {
            addr: header.addr().0,
            len: HEADER_LEN,
        })
    })?;
    let req_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);
    let data = &descs[1..descs.len() - 1];

    let kind = match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = req_type == VIRTIO_BLK_T_OUT;
            if write && limits.read_only {
                return Err(fail(RequestError::ReadOnly));
            }
            let segs = segments(data, mem, !write).map_err(fail)?;
            let len: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(fail(RequestError::Unaligned(len)));
            }
            check_range(sector, len >> SECTOR_SHIFT, limits.capacity).map_err(fail)?;
            if write {
                RequestKind::Out { sector, data: segs }
            } else {
                RequestKind::In { sector, data: segs }
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if !data.is_empty() {
                return Err(fail(RequestError::UnexpectedData(data.len())));
            }
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId {
            data: segments(data, mem, true).map_err(fail)?,
        },
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            if (discard && !limits.discard) || (!discard && !limits.write_zeroes) {
                return Err(fail(RequestError::Unsupported(req_type)));
            }
            if limits.read_only {
                return Err(fail(RequestError::ReadOnly));
            }
            let (sector, sectors, flags) = range(data, mem).map_err(fail)?;
            let (allowed_flags, max) = if discard {
                // The unmap flag is only meaningful for write-zeroes (§5.2.6.2).
                (0, MAX_DISCARD_SECTORS)
            } else {
                (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, MAX_WRITE_ZEROES_SECTORS)
            };
            if flags & !allowed_flags != 0 {
                return Err(fail(RequestError::RangeFlags(flags)));
            }
            if sectors > max {
                return Err(fail(RequestError::RangeTooLarge { sectors, max }));
            }
            check_range(sector, sectors.into(), limits.capacity).map_err(fail)?;
            if discard {
                RequestKind::Discard { sector, sectors }
            } else {
                RequestKind::WriteZeroes {
                    sector,
                    sectors,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            }
        }
        other => return Err(fail(RequestError::Unsupported(other))),
    };
    Ok(Request { head, kind, status })
}

fn status_addr<M: GuestMemory + ?Sized>(
    desc: &Descriptor,
    mem: &M,
) -> Result<GuestAddress, RequestError> {
    if !desc.is_write_only() {
        return Err(RequestError::StatusNotWritable);
    }
    if desc.len() == 0 {
        return Err(RequestError::StatusEmpty);
    }
    if !mem.check_range(desc.addr(), 1) {
        return Err(RequestError::StatusOutOfMemory(desc.addr().0));
    }
    Ok(desc.addr())
}

/// Checks the data descriptors: non-empty, all in the `writable` direction, inside guest
/// memory, within the segment and size limits.
fn segments<M: GuestMemory + ?Sized>(
    data: &[Descriptor],
    mem: &M,
    writable: bool,
) -> Result<Vec<Segment>, RequestError> {
    if data.is_empty() {
        return Err(RequestError::MissingData);
    }
    if data.len() > SEG_MAX as usize {
        return Err(RequestError::TooManySegments(data.len()));
    }
    let mut total = 0u64;
    let mut segs = Vec::with_capacity(data.len());
    for (i, d) in data.iter().enumerate() {
        if d.is_write_only() != writable {
            // Index in the chain: the header is 0.
            return Err(RequestError::WrongDirection(i + 1));
        }
        total += u64::from(d.len());
        if total > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(total));
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(RequestError::OutOfMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        segs.push(Segment {
            addr: d.addr(),
            len: d.len(),
        });
    }
    Ok(segs)
}

/// Reads the single discard / write-zeroes range: (sector, sectors, flags).
fn range<M: GuestMemory + ?Sized>(
    data: &[Descriptor],
    mem: &M,
) -> Result<(u64, u32, u32), RequestError> {
    let segs = segments(data, mem, false)?;
    let total: u32 = segs.iter().map(|s| s.len).sum();
    if segs.len() != 1 || total != RANGE_LEN {
        return Err(RequestError::RangeCount(total));
    }
    let mut raw = [0u8; RANGE_LEN as usize];
    mem.read_slice(&mut raw, segs[0].addr)
        .map_err(|_| RequestError::OutOfMemory {
            addr: segs[0].addr.0,
            len: RANGE_LEN,
        })?;
    let sector = u64::from_le_bytes([
        raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
    ]);
    let sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
    Ok((sector, sectors, flags))
}

fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    use crate::virtio::test_utils::{DESC_INDIRECT, DESC_NEXT, DESC_WRITE};
    use crate::virtio::GuestMem;

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const R: u16 = 0;
    const W: u16 = DESC_WRITE;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn limits() -> DiskLimits {
        DiskLimits {
            capacity: 1024,
            read_only: false,
            discard: true,
            write_zeroes: true,
        }
    }

    fn header(mem: &GuestMem, req_type: u32, sector: u64) {
        mem.write_obj(req_type.to_le(), GuestAddress(HDR)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(HDR + 8))
            .unwrap();
    }

    /// Parses a chain of (addr, len, flags) laid out with NEXT links by the mock driver.
    fn parse_chain(
        mem: &GuestMem,
        descs: &[(u64, u32, u16)],
        limits: &DiskLimits,
    ) -> Result<Request, ParseFailure> {
        let vq = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(Descriptor::new(a, l, f, 0)))
            .collect();
        let chain = vq.build_desc_chain(&raw).unwrap();
        parse(chain.head_index(), chain.clone(), chain.memory(), limits)
    }

    /// Parses raw descriptors stored as given (no NEXT fix-up), head at index 0.
    fn parse_raw(mem: &GuestMem, descs: &[RawDescriptor]) -> Result<Request, ParseFailure> {
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().unwrap();
        parse(chain.head_index(), chain.clone(), mem, &limits())
    }

    fn err(r: Result<Request, ParseFailure>) -> (Option<GuestAddress>, RequestError) {
        let f = r.unwrap_err();
        (f.status, f.error)
    }

    /// Writes a header of `req_type` at `sector` and parses `chain` with the default limits.
    fn parse_ok(m: &GuestMem, req_type: u32, sector: u64, chain: &[(u64, u32, u16)]) -> Request {
        header(m, req_type, sector);
        parse_chain(m, chain, &limits()).unwrap()
    }

    #[test]
    fn parses_read_write_flush_get_id() {
        let m = mem();
        let seg = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
        };
        let r = parse_ok(
            &m,
            VIRTIO_BLK_T_IN,
            8,
            &[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)],
        );
        assert_eq!(
            r.kind,
            RequestKind::In {
                sector: 8,
                data: vec![seg(DATA, 4096)]
            }
        );
        assert_eq!(r.status, GuestAddress(STATUS));
        assert_eq!(r.data_len(), 4096);

        let chain = [
            (HDR, 16, R),
            (DATA, 2048, R),
            (DATA + 4096, 2048, R),
            (STATUS, 1, W),
        ];
        let r = parse_ok(&m, VIRTIO_BLK_T_OUT, 1016, &chain);
        assert_eq!(
            r.kind,
            RequestKind::Out {
                sector: 1016,
                data: vec![seg(DATA, 2048), seg(DATA + 4096, 2048)]
            }
        );

        let r = parse_ok(&m, VIRTIO_BLK_T_FLUSH, 0, &[(HDR, 16, R), (STATUS, 1, W)]);
        assert_eq!(r.kind, RequestKind::Flush);

        let r = parse_ok(
            &m,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)],
        );
        assert_eq!(
            r.kind,
            RequestKind::GetId {
                data: vec![seg(DATA, 20)]
            }
        );
    }

    #[test]
    fn parses_discard_and_write_zeroes() {
        let m = mem();
        let range = |sector: u64, n: u32, flags: u32| {
            m.write_obj(sector.to_le(), GuestAddress(DATA)).unwrap();
            m.write_obj(n.to_le(), GuestAddress(DATA + 8)).unwrap();
            m.write_obj(flags.to_le(), GuestAddress(DATA + 12)).unwrap();
        };
        let chain = [(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)];
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        range(16, 32, 0);
        assert_eq!(
            parse_chain(&m, &chain, &limits()).unwrap().kind,
            RequestKind::Discard {
                sector: 16,
                sectors: 32
            }
        );
        range(16, 32, 1);
        assert_eq!(
            err(parse_chain(&m, &chain, &limits())).1,
            RequestError::RangeFlags(1)
        );
        assert_eq!(RequestError::RangeFlags(1).status(), STATUS_UNSUPP);

        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range(1000, 24, 1);
        assert_eq!(
            parse_chain(&m, &chain, &limits()).unwrap().kind,
            RequestKind::WriteZeroes {
                sector: 1000,
                sectors: 24,
                unmap: true
            }
        );
        range(1000, 25, 0);
        assert!(matches!(
            err(parse_chain(&m, &chain, &limits())).1,
            RequestError::OutOfRange { .. }
        ));
        range(u64::MAX, 2, 0);
        assert!(matches!(
            err(parse_chain(&m, &chain, &limits())).1,
            RequestError::OutOfRange { .. }
        ));

        // Two ranges (max_discard_seg is 1).
        let two = [(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)];
        assert_eq!(
            err(parse_chain(&m, &two, &limits())).1,
            RequestError::RangeCount(32)
        );

        // Not negotiated: unsupported.
        let no = DiskLimits {
            discard: false,
            write_zeroes: false,
            ..limits()
        };
        assert_eq!(
            err(parse_chain(&m, &chain, &no)),
            (
                Some(GuestAddress(STATUS)),
                RequestError::Unsupported(VIRTIO_BLK_T_WRITE_ZEROES)
            )
        );
    }

    /// (request type, sector, chain, limits, expected status location, expected error).
    type Case = (
        u32,
        u64,
        Vec<(u64, u32, u16)>,
        DiskLimits,
        Option<GuestAddress>,
        RequestError,
    );

    #[test]
    fn rejects_bad_requests() {
        use RequestError::*;
        let m = mem();
        let st = Some(GuestAddress(STATUS));
        let ro = DiskLimits {
            read_only: true,
            ..limits()
        };
        let bad_oom = (0x3f_ff00, 512, W);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            // Data descriptors.
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)], limits(), st, WrongDirection(1)),
            (VIRTIO_BLK_T_OUT, 0, vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)], limits(), st, WrongDirection(1)),
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 16, R), (DATA, 513, W), (STATUS, 1, W)], limits(), st, Unaligned(513)),
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 16, R), (STATUS, 1, W)], limits(), st, MissingData),
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 16, R), (DATA, 0x7fff_0000, W), (STATUS, 1, W)], limits(), st, TooLarge(0x7fff_0000)),
            // A chain whose lengths overflow u32 ends early in virtio-queue.
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 16, R), (DATA, u32::MAX, W), (STATUS, 1, W)], limits(), None, Truncated),
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 16, R), bad_oom, (STATUS, 1, W)], limits(), st, OutOfMemory { addr: 0x3f_ff00, len: 512 }),
            (VIRTIO_BLK_T_IN, 1023, vec![(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)], limits(), st, OutOfRange { sector: 1023, sectors: 2, capacity: 1024 }),
            (VIRTIO_BLK_T_IN, u64::MAX, vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)], limits(), st, OutOfRange { sector: u64::MAX, sectors: 1, capacity: 1024 }),
            (VIRTIO_BLK_T_OUT, 0, vec![(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)], ro, st, ReadOnly),
            (VIRTIO_BLK_T_FLUSH, 0, vec![(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)], limits(), st, UnexpectedData(1)),
            (0xdead, 0, vec![(HDR, 16, R), (STATUS, 1, W)], limits(), st, Unsupported(0xdead)),
            // Header.
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)], limits(), st, HeaderWritable),
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)], limits(), st, HeaderTooShort(8)),
            (VIRTIO_BLK_T_IN, 0, vec![(0x3f_fff8, 16, R), (DATA, 512, W), (STATUS, 1, W)], limits(), st, OutOfMemory { addr: 0x3f_fff8, len: 16 }),
            // Status: nowhere to report the error.
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)], limits(), None, StatusNotWritable),
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)], limits(), None, StatusEmpty),
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 16, R), (DATA, 512, W), (0x40_0000, 1, W)], limits(), None, StatusOutOfMemory(0x40_0000)),
            // A lone descriptor: too short, but its status byte is usable.
            (VIRTIO_BLK_T_IN, 0, vec![(STATUS, 1, W)], limits(), st, TooShort(1)),
        ];
        for (req_type, sector, chain, limits, status, error) in cases {
            header(&m, req_type, sector);
            let got = err(parse_chain(&m, &chain, &limits));
            assert_eq!(
                got,
                (status, error.clone()),
                "type {req_type} chain {chain:x?}"
            );
            let want = if matches!(error, Unsupported(_)) {
                STATUS_UNSUPP
            } else {
                STATUS_IOERR
            };
            assert_eq!(error.status(), want);
        }
    }

    #[test]
    fn rejects_loops_bad_links_and_long_chains() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let n = DESC_NEXT;
        let d = |a, l, f, next| RawDescriptor::from(Descriptor::new(a, l, f, next));
        // 0 -> 1 -> 0 -> ...
        let looped = [d(HDR, 16, R | n, 1), d(DATA, 512, W | n, 0)];
        assert_eq!(err(parse_raw(&m, &looped)), (None, RequestError::Truncated));
        // Next index beyond the table.
        let bad_next = [d(HDR, 16, R | n, 200)];
        assert_eq!(
            err(parse_raw(&m, &bad_next)),
            (None, RequestError::Truncated)
        );
        // Nested indirect table: the inner indirect descriptor ends the chain early.
        let table = 0x8000u64;
        for (i, desc) in [d(HDR, 16, R | n, 1), d(0x9000, 32, DESC_INDIRECT, 0)]
            .iter()
            .enumerate()
        {
            m.write_obj(*desc, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let indirect = [d(table, 32, DESC_INDIRECT, 0)];
        assert_eq!(
            err(parse_raw(&m, &indirect)),
            (None, RequestError::Truncated)
        );
        // A valid indirect chain parses.
        for (i, desc) in [
            d(HDR, 16, R | n, 1),
            d(DATA, 512, W | n, 2),
            d(STATUS, 1, W, 0),
        ]
        .iter()
        .enumerate()
        {
            m.write_obj(*desc, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let indirect = [d(table, 48, DESC_INDIRECT, 0)];
        assert!(matches!(
            parse_raw(&m, &indirect).unwrap().kind,
            RequestKind::In { .. }
        ));

        // More descriptors than seg_max + 2 (in an indirect table, which allows it).
        let count = MAX_DESCRIPTORS + 4;
        for i in 0..count {
            let flags = if i == count - 1 { W } else { W | n };
            let desc = if i == 0 {
                d(HDR, 16, R | n, 1)
            } else {
                d(DATA, 512, flags, u16::try_from(i).unwrap() + 1)
            };
            m.write_obj(desc, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let indirect = [d(
            table,
            16 * u32::try_from(count).unwrap(),
            DESC_INDIRECT,
            0,
        )];
        assert_eq!(err(parse_raw(&m, &indirect)), (None, RequestError::TooLong));
    }

    #[test]
    fn empty_chain_has_no_status() {
        let m = mem();
        let r = parse(3, std::iter::empty(), &m, &limits());
        assert_eq!(
            r.unwrap_err(),
            ParseFailure {
                head: 3,
                status: None,
                error: RequestError::Empty
            }
        );
    }
}
