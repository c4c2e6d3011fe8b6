//! Descriptor chains as host memory: the guest buffers of one chain as `VolatileSlice`s,
//! checked for direction, bounds and size, and turned into `iovec`s for `readv`/`writev` on
//! the tap — the only copy a frame sees is the kernel's, between the tap and guest memory.

use std::num::Wrapping;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{Bytes, GuestMemory, VolatileSlice};

use super::MAX_IOVECS;
use crate::virtio::GuestMem;

/// Which way a chain's buffers must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The device reads them (transmit).
    DeviceReads,
    /// The device writes them (receive).
    DeviceWrites,
}

/// Why a chain cannot carry a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor {index} is device-{found} in a chain the device must {wanted}")]
    Direction {
        index: usize,
        found: &'static str,
        wanted: &'static str,
    },
    #[error("descriptor {index} ({len} bytes at {addr:#x}) is not inside guest memory")]
    Memory { index: usize, addr: u64, len: u32 },
    #[error("the chain holds more than {max} bytes")]
    TooLong { max: usize },
    #[error("the chain has more than {MAX_IOVECS} buffers")]
    TooManyBuffers,
    #[error("the chain has no buffer with data")]
    Empty,
    #[error(
        "the chain does not end (a descriptor loop, a link past the table or a bad indirect table)"
    )]
    Unterminated,
}

/// The buffers of one descriptor chain.
#[derive(Debug)]
pub struct ChainBuffers<'m> {
    /// The chain's head index (for the used ring).
    pub head: u16,
    slices: Vec<VolatileSlice<'m, ()>>,
    len: usize,
    descriptors: usize,
}

impl<'m> ChainBuffers<'m> {
    /// The buffers of `chain`, all in `direction`, at most `max_len` bytes in at most
    /// `max_slices` pieces (a descriptor spanning two memory regions is two pieces).
    pub fn collect(
        mem: &'m GuestMem,
        chain: DescriptorChain<&'m GuestMem>,
        direction: Direction,
        max_len: usize,
        max_slices: usize,
    ) -> Result<Self, ChainError> {
        let head = chain.head_index();
        let mut slices = Vec::new();
        let mut len = 0usize;
        let mut descriptors = 0;
        let mut more = false;
        for (index, desc) in chain.enumerate() {
            descriptors += 1;
            // virtio-queue ends a chain early (loop past the queue size, link out of the
            // table, unreadable or nested indirect table) without saying so: the last
            // descriptor it gave then still has NEXT.
            more = desc.has_next();
            let writable = desc.is_write_only();
            if writable != (direction == Direction::DeviceWrites) {
                let (found, wanted) = if writable {
                    ("writable", "read")
                } else {
                    ("readable", "write")
                };
                return Err(ChainError::Direction {
                    index,
                    found,
                    wanted,
                });
            }
            len += desc.len() as usize;
            if len > max_len {
                return Err(ChainError::TooLong { max: max_len });
            }
            let bad = || ChainError::Memory {
                index,
                addr: desc.addr().0,
                len: desc.len(),
            };
            for slice in mem.get_slices(desc.addr(), desc.len() as usize) {
                slices.push(slice.map_err(|_| bad())?);
                if slices.len() > max_slices {
                    return Err(ChainError::TooManyBuffers);
                }
            }
        }
        if more {
            return Err(ChainError::Unterminated);
        }
        if len == 0 {
            return Err(ChainError::Empty);
        }
        Ok(Self {
            head,
            slices,
            len,
            descriptors,
        })
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the chain has no bytes (never, for a collected chain).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Descriptors in the chain.
    pub fn descriptors(&self) -> usize {
        self.descriptors
    }

    /// The host views of the buffers.
    pub fn slices(&self) -> &[VolatileSlice<'m, ()>] {
        &self.slices
    }

    /// The views of the bytes from `offset` on.
    pub fn slices_from(&self, mut offset: usize) -> Vec<VolatileSlice<'m, ()>> {
        let mut out = Vec::with_capacity(self.slices.len());
        for s in &self.slices {
            if offset >= s.len() {
                offset -= s.len();
                continue;
            }
            if let Ok(rest) = s.offset(offset) {
                out.push(rest);
            }
            offset = 0;
        }
        out
    }

    /// Copies bytes from `offset` into `buf`; returns how many there were.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize {
        let mut done = 0;
        for s in self.slices_from(offset) {
            if done == buf.len() {
                break;
            }
            done += s.read(&mut buf[done..], 0).unwrap_or(0);
        }
        done
    }

    /// Copies `data` into the buffers from `offset`; returns how many bytes fitted.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> usize {
        let mut done = 0;
        for s in self.slices_from(offset) {
            if done == data.len() {
                break;
            }
            done += s.write(&data[done..], 0).unwrap_or(0);
        }
        done
    }
}

/// `iovec`s for `slices`, with the pointer guards that must live as long as the iovecs are
/// used (the guards are what keeps a dirty-page bitmap right; with `()` they are free).
pub struct IoVecs<'a> {
    _guards: Vec<PtrGuardMut>,
    pub iovs: Vec<libc::iovec>,
    _slices: std::marker::PhantomData<&'a ()>,
}

impl<'a> IoVecs<'a> {
    /// Starts with `prefix` (host bytes, e.g. a checked header), then `slices`.
    pub fn new(prefix: Option<&'a [u8]>, slices: &[VolatileSlice<'a, ()>]) -> Self {
        let guards: Vec<PtrGuardMut> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iovs = Vec::with_capacity(slices.len() + 1);
        if let Some(p) = prefix {
            iovs.push(libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            });
        }
        iovs.extend(guards.iter().zip(slices).map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: s.len(),
        }));
        Self {
            _guards: guards,
            iovs,
            _slices: std::marker::PhantomData,
        }
    }
}

/// Pops the next available chain of `queue` (`what`: its name, for the error); `Err` if
/// the available ring is broken (the device then needs a reset).
pub fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMem,
    what: &str,
) -> Result<Option<DescriptorChain<&'m GuestMem>>, String> {
    match queue.iter(mem) {
        Ok(mut chains) => Ok(chains.next()),
        Err(e) => Err(format!("{what} queue: bad available ring: {e}")),
    }
}

/// Puts the last `count` popped chains back on the available ring (they were looked at
/// but not used): the next pop returns them again.
pub fn unpop(queue: &mut Queue, count: usize) {
    if count > 0 {
        // Ring indices count modulo 2^16: the low 16 bits of `count` are its distance.
        let [lo, hi, ..] = count.to_le_bytes();
        let back = Wrapping(queue.next_avail()) - Wrapping(u16::from_le_bytes([lo, hi]));
        queue.set_next_avail(back.0);
    }
}

/// How a received frame of `len` bytes spreads over buffers of `caps` bytes, in order: the
/// used length of each buffer it occupies (the last may be partly filled). `None` if the
/// buffers are too small (or a part is past a u32 used length, which no frame is).
pub fn spread(len: usize, caps: &[usize]) -> Option<Vec<u32>> {
    let mut left = len;
    let mut used = Vec::new();
    for &cap in caps {
        if left == 0 {
            break;
        }
        let n = left.min(cap);
        used.push(u32::try_from(n).ok()?);
        left -= n;
    }
    (left == 0 && !used.is_empty()).then_some(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_spread_over_mergeable_buffers_in_order() {
        assert_eq!(spread(100, &[1526, 1526]), Some(vec![100]));
        assert_eq!(spread(1526, &[1526, 1526]), Some(vec![1526]));
        assert_eq!(spread(1527, &[1526, 1526]), Some(vec![1526, 1]));
        assert_eq!(
            spread(4000, &[1000, 2000, 500, 4000]),
            Some(vec![1000, 2000, 500, 500])
        );
        assert_eq!(spread(4000, &[1000, 2000]), None, "does not fit");
        assert_eq!(spread(0, &[1000]), None, "an empty frame uses nothing");
        assert_eq!(spread(10, &[]), None);
    }
}
