//! A connection's guest→host buffer: bytes the guest sent that the host peer has not read
//! yet. Its size is bounded by the credit the device gives the guest (`buf_alloc`): a guest
//! that sends more than its credit allows is cut off (RST), so this never grows past
//! [`CONN_BUF_ALLOC`](super::CONN_BUF_ALLOC).

use std::collections::VecDeque;
use std::io;
use std::os::unix::net::UnixStream;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::uds;

/// Keep at most this much spare capacity once the buffer is empty again.
const KEEP_CAPACITY: usize = 64 << 10;

/// The bytes waiting for the host peer.
#[derive(Debug)]
pub(crate) struct TxBuf {
    data: VecDeque<u8>,
    limit: usize,
}

/// The buffer would grow past its limit: the guest ignored its credit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Overrun;

impl TxBuf {
    pub fn new(limit: usize) -> Self {
        Self {
            data: VecDeque::new(),
            limit,
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Room left before the limit.
    pub fn room(&self) -> usize {
        self.limit - self.data.len()
    }

    /// Appends guest bytes.
    pub fn push<B: BitmapSlice>(&mut self, src: &VolatileSlice<'_, B>) -> Result<(), Overrun> {
        if src.len() > self.room() {
            return Err(Overrun);
        }
        let mut tmp = vec![0u8; src.len()];
        let n = src.copy_to(&mut tmp);
        self.data.extend(&tmp[..n]);
        Ok(())
    }

    /// Appends host bytes (for unit tests of the flow control).
    #[cfg(test)]
    pub fn push_bytes(&mut self, src: &[u8]) -> Result<(), Overrun> {
        if src.len() > self.room() {
            return Err(Overrun);
        }
        self.data.extend(src);
        Ok(())
    }

    /// Writes as much as the socket takes. Returns the bytes written (0 if the socket is
    /// full); errors other than `WouldBlock` are the peer's end.
    pub fn flush_to(&mut self, stream: &UnixStream) -> io::Result<usize> {
        let mut total = 0;
        while !self.data.is_empty() {
            let (front, _) = self.data.as_slices();
            match uds::send(stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.data.drain(..n);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.data.is_empty() && self.data.capacity() > KEEP_CAPACITY {
            self.data = VecDeque::new();
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn bounded_and_flushes_in_order() {
        let mut b = TxBuf::new(8);
        b.push_bytes(b"abcde").unwrap();
        assert_eq!(b.room(), 3);
        assert_eq!(b.push_bytes(b"wxyz"), Err(Overrun));
        b.push_bytes(b"fgh").unwrap();
        assert_eq!(b.len(), 8);

        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        assert_eq!(b.flush_to(&ours).unwrap(), 8);
        assert!(b.is_empty());
        let mut got = [0u8; 8];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abcdefgh");

        drop(theirs);
        b.push_bytes(b"x").unwrap();
        assert_eq!(
            b.flush_to(&ours).unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[test]
    fn a_full_socket_keeps_the_rest() {
        let limit = 4 << 20;
        let mut b = TxBuf::new(limit);
        let (ours, _theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        b.push_bytes(&vec![7u8; limit]).unwrap();
        let n = b.flush_to(&ours).unwrap();
        assert!(n > 0 && n < limit, "socket took {n}");
        assert_eq!(b.len(), limit - n);
        assert_eq!(b.flush_to(&ours).unwrap(), 0);
    }
}
