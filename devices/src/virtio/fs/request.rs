//! Checking a descriptor chain before the FUSE server sees it, and answering requests the
//! server could not answer. Unit-tested without a VM.
//!
//! A virtio-fs request is one chain: device-readable descriptors (`fuse_in_header`, the
//! operation's arguments, write data) followed by device-writable ones (`fuse_out_header`,
//! the reply). [`check_chain`] enforces what fuse-backend-rs' `Reader`/`Writer` assume or
//! do not check:
//! * the chain ends (the chain iterator stops quietly on loops, next indices past the table
//!   and bad indirect tables);
//! * no device-readable descriptor after a device-writable one (fuse-backend-rs would
//!   silently pick the readable ones out of the middle);
//! * every descriptor lies inside one guest memory region;
//! * each direction carries at most [`MAX_MESSAGE`] bytes, so no guest-chosen size reaches
//!   an allocation (descriptors may overlap, so a small guest could otherwise describe
//!   gigabytes);
//! * the request holds at least a `fuse_in_header`.
//!
//! Failures that leave the writable part intact are answered with a FUSE error reply
//! ([`write_error`]); the others (broken structure, bad writable descriptors) are returned
//! to the guest unanswered, with a used length of 0.

use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::server::MAX_BUFFER_SIZE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Largest request or reply: a 1 MiB payload (the `max_pages` the server announces) plus
/// room for headers, as fuse-backend-rs' own limit on `fuse_in_header.len`.
pub const MAX_MESSAGE: u64 = MAX_BUFFER_SIZE as u64 + 0x1000;
/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER_LEN: u64 = size_of::<InHeader>() as u64;
/// `sizeof(struct fuse_out_header)`.
pub const OUT_HEADER_LEN: u64 = size_of::<OutHeader>() as u64;
/// The same, for a used length or the header's own `len`.
const OUT_HEADER_LEN_U32: u32 = crate::virtio::const_u32(OUT_HEADER_LEN);

/// One buffer of a checked chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A chain that passed [`check_chain`].
#[derive(Debug, Clone)]
pub struct CheckedChain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    pub header: InHeader,
}

impl CheckedChain {
    /// Total bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        total(&self.writable)
    }
}

/// What is wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the chain is empty (head index beyond the descriptor table?)")]
    Empty,
    #[error("the chain does not end: a descriptor loop, a next index past the table or a bad indirect table")]
    Truncated,
    #[error("descriptor {0} is device-readable but follows device-writable ones")]
    ReadableAfterWritable(usize),
    #[error("descriptor {index} ({addr:#x}, {len} bytes) is not inside one guest memory region")]
    OutOfMemory { index: usize, addr: u64, len: u32 },
    #[error("the {direction} part is {len} bytes, more than the {max}-byte maximum")]
    TooLarge {
        direction: &'static str,
        len: u64,
        max: u64,
    },
    #[error("the request has {0} readable bytes, less than a fuse_in_header")]
    NoHeader(u64),
}

/// A chain [`check_chain`] refused, with what is left to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFailure {
    pub error: ChainError,
    /// The writable descriptors, when they are intact and can hold an error reply.
    pub reply_to: Option<Vec<Segment>>,
    /// The request's `unique`, when its header could be read.
    pub unique: u64,
}

impl ChainFailure {
    /// Answers the request with `-EINVAL` if possible; returns the used length.
    pub fn answer<M: GuestMemory + ?Sized>(&self, mem: &M) -> u32 {
        match &self.reply_to {
            Some(segs) => write_error(mem, segs, self.unique, libc::EINVAL),
            None => 0,
        }
    }
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Checks the descriptors of the chain with head `head` (see the module documentation).
pub fn check_chain<M, I>(head: u16, chain: I, mem: &M) -> Result<CheckedChain, ChainFailure>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let fail = |error, reply_to, unique| ChainFailure {
        error,
        reply_to,
        unique,
    };
    // The iterator yields at most a table's worth of descriptors (its TTL).
    let descs: Vec<Descriptor> = chain.into_iter().collect();
    let Some(last) = descs.last() else {
        return Err(fail(ChainError::Empty, None, 0));
    };
    if last.has_next() {
        return Err(fail(ChainError::Truncated, None, 0));
    }
    let split = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    if let Some(i) = descs[split..].iter().position(|d| !d.is_write_only()) {
        return Err(fail(ChainError::ReadableAfterWritable(split + i), None, 0));
    }
    let segments = |range: std::ops::Range<usize>| -> Result<Vec<Segment>, ChainError> {
        let mut out = Vec::with_capacity(range.len());
        for index in range {
            let d = &descs[index];
            if mem.get_slice(d.addr(), d.len() as usize).is_err() {
                return Err(ChainError::OutOfMemory {
                    index,
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            out.push(Segment {
                addr: d.addr(),
                len: d.len(),
            });
        }
        Ok(out)
    };
    let too_large = |direction, len| ChainError::TooLarge {
        direction,
        len,
        max: MAX_MESSAGE,
    };

    let writable_len: u64 = descs[split..].iter().map(|d| u64::from(d.len())).sum();
    if writable_len > MAX_MESSAGE {
        return Err(fail(too_large("device-writable", writable_len), None, 0));
    }
    let writable = segments(split..descs.len()).map_err(|e| fail(e, None, 0))?;
    let reply_to = (writable_len >= OUT_HEADER_LEN).then(|| writable.clone());

    let readable_len: u64 = descs[..split].iter().map(|d| u64::from(d.len())).sum();
    if readable_len > MAX_MESSAGE {
        return Err(fail(
            too_large("device-readable", readable_len),
            reply_to,
            0,
        ));
    }
    let readable = segments(0..split).map_err(|e| fail(e, reply_to.clone(), 0))?;
    if readable_len < IN_HEADER_LEN {
        return Err(fail(ChainError::NoHeader(readable_len), reply_to, 0));
    }
    let mut header = InHeader::default();
    if gather(mem, &readable, header.as_mut_slice()).is_err() {
        // Checked above; guest memory does not shrink under us.
        return Err(fail(
            ChainError::OutOfMemory {
                index: 0,
                addr: readable[0].addr.0,
                len: readable[0].len,
            },
            reply_to,
            0,
        ));
    }
    Ok(CheckedChain {
        head,
        readable,
        writable,
        header,
    })
}

/// Calls `f(addr, range)` for the pieces of `0..len` that `segs` hold, in order; fails if
/// they hold less than `len` bytes.
fn for_each_piece(
    segs: &[Segment],
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), GuestMemoryError>,
) -> Result<(), GuestMemoryError> {
    let mut done = 0;
    for s in segs {
        if done == len {
            break;
        }
        let n = (s.len as usize).min(len - done);
        f(s.addr, done..done + n)?;
        done += n;
    }
    if done < len {
        return Err(GuestMemoryError::PartialBuffer {
            expected: len,
            completed: done,
        });
    }
    Ok(())
}

/// Reads `buf.len()` bytes from the start of `segs`.
pub fn gather<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), GuestMemoryError> {
    let len = buf.len();
    for_each_piece(segs, len, |addr, r| mem.read_slice(&mut buf[r], addr))
}

/// Writes `data` at the start of `segs`.
pub fn scatter<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    data: &[u8],
) -> Result<(), GuestMemoryError> {
    for_each_piece(segs, data.len(), |addr, r| mem.write_slice(&data[r], addr))
}

/// Writes a `fuse_out_header` carrying `-errno` for request `unique` into `segs`. Returns
/// the used length (0 if it does not fit).
pub fn write_error<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    unique: u64,
    errno: i32,
) -> u32 {
    let out = OutHeader {
        len: OUT_HEADER_LEN_U32,
        error: -errno,
        unique,
    };
    match scatter(mem, segs, out.as_slice()) {
        Ok(()) => OUT_HEADER_LEN_U32,
        Err(_) => 0,
    }
}

/// Reads the `fuse_out_header` at the start of `segs` (zeros if it cannot be read).
pub fn read_out_header<M: GuestMemory + ?Sized>(mem: &M, segs: &[Segment]) -> OutHeader {
    let mut out = OutHeader::default();
    if gather(mem, segs, out.as_mut_slice()).is_err() {
        return OutHeader::default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{DESC_NEXT, DESC_WRITE};
    use crate::virtio::GuestMem;

    const N: u16 = DESC_NEXT;
    const W: u16 = DESC_WRITE;
    const MEM: u64 = 0x10_0000;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), usize::try_from(MEM).unwrap())]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn header(m: &GuestMem, at: u64, unique: u64) {
        let h = InHeader {
            len: 40,
            opcode: 3,
            unique,
            nodeid: 1,
            ..Default::default()
        };
        m.write_slice(h.as_slice(), GuestAddress(at)).unwrap();
    }

    #[test]
    fn accepts_a_well_formed_request() {
        let m = mem();
        header(&m, 0x1000, 77);
        // Header split over two descriptors, reply over two.
        let c = check_chain(
            5,
            [
                d(0x1000, 24, N),
                d(0x1018, 16, N),
                d(0x2000, 8, W | N),
                d(0x3000, 200, W),
            ],
            &m,
        )
        .unwrap();
        assert_eq!(c.head, 5);
        assert_eq!(c.header.unique, 77);
        assert_eq!(c.readable.len(), 2);
        assert_eq!(c.writable_len(), 208);
        // An error reply straddles the two writable descriptors.
        assert_eq!(write_error(&m, &c.writable, 77, libc::ENOENT), 16);
        let out = read_out_header(&m, &c.writable);
        assert_eq!((out.len, out.error, out.unique), (16, -libc::ENOENT, 77));
        // A request without a reply part (FORGET).
        let c = check_chain(0, [d(0x1000, 48, 0)], &m).unwrap();
        assert!(c.writable.is_empty());
    }

    #[test]
    fn structural_failures_are_not_answered() {
        let m = mem();
        header(&m, 0x1000, 1);
        let err = |descs: &[Descriptor]| check_chain(0, descs.iter().copied(), &m).unwrap_err();

        let f = err(&[]);
        assert_eq!((f.error, f.reply_to), (ChainError::Empty, None));
        let f = err(&[d(0x1000, 40, N), d(0x2000, 64, W | N)]);
        assert_eq!((f.error, f.reply_to), (ChainError::Truncated, None));
        let f = err(&[d(0x1000, 40, N), d(0x2000, 64, W | N), d(0x3000, 8, 0)]);
        assert_eq!(f.error, ChainError::ReadableAfterWritable(2));
        assert_eq!(f.reply_to, None);
        // A writable descriptor outside memory or across its end.
        let f = err(&[d(0x1000, 40, N), d(MEM - 8, 64, W)]);
        assert!(matches!(f.error, ChainError::OutOfMemory { index: 1, .. }));
        assert_eq!(f.reply_to, None);
        let f = err(&[d(0x1000, 40, N), d(u64::MAX - 4, 64, W)]);
        assert!(matches!(f.error, ChainError::OutOfMemory { .. }));
        // Overlapping descriptors that add up to more than a message.
        let big: Vec<_> = (0..5).map(|_| d(0, 0x4_0000, W | N)).collect();
        let mut descs = vec![d(0x1000, 40, N)];
        descs.extend(big);
        descs.last_mut().unwrap().set_flags(W);
        let f = err(&descs);
        assert!(matches!(
            f.error,
            ChainError::TooLarge { len: 0x14_0000, .. }
        ));
        assert_eq!(f.answer(&m), 0);
    }

    #[test]
    fn request_failures_are_answered_when_the_reply_fits() {
        let m = mem();
        // Readable header outside memory.
        let f = check_chain(0, [d(MEM + 0x1000, 40, N), d(0x2000, 16, W)], &m).unwrap_err();
        assert!(matches!(f.error, ChainError::OutOfMemory { index: 0, .. }));
        assert_eq!(f.answer(&m), 16);
        let out = read_out_header(
            &m,
            &[Segment {
                addr: GuestAddress(0x2000),
                len: 16,
            }],
        );
        assert_eq!(out.error, -libc::EINVAL);
        // Too short for a header.
        let f = check_chain(0, [d(0x1000, 39, N), d(0x2000, 16, W)], &m).unwrap_err();
        assert_eq!(f.error, ChainError::NoHeader(39));
        assert_eq!(f.answer(&m), 16);
        // ... but not when the reply part cannot hold a header.
        let f = check_chain(0, [d(0x1000, 8, N), d(0x2000, 15, W)], &m).unwrap_err();
        assert_eq!(f.error, ChainError::NoHeader(8));
        assert_eq!(f.answer(&m), 0);
        // Oversize readable part (a WRITE claiming more than 1 MiB).
        let mut descs: Vec<_> = (0..5).map(|_| d(0, 0x4_0000, N)).collect();
        descs.push(d(0x2000, 16, W));
        let f = check_chain(0, descs, &m).unwrap_err();
        assert!(matches!(
            f.error,
            ChainError::TooLarge {
                direction: "device-readable",
                ..
            }
        ));
        assert_eq!(f.answer(&m), 16);
    }

    #[test]
    fn scatter_and_gather_stop_at_the_end_of_the_segments() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x200),
                len: 3,
            },
        ];
        scatter(&m, &segs, b"abcde").unwrap();
        let mut b = [0u8; 5];
        gather(&m, &segs, &mut b).unwrap();
        assert_eq!(&b, b"abcde");
        assert!(scatter(&m, &segs, b"abcdefg").is_err());
        let mut b = [0u8; 7];
        assert!(gather(&m, &segs, &mut b).is_err());
        assert_eq!(write_error(&m, &segs, 1, libc::EIO), 0);
    }
}
