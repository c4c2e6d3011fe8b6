//! The virtio-vsock packet header (virtio 1.x §5.10.6) as plain data, and the protocol's
//! constants.
//!
//! Descriptor chains are parsed with `virtio_vsock::packet::VsockPacket` (it checks
//! directions, lengths and guest-memory bounds). The device then works on a [`Header`]: a copy
//! of the header fields read once from guest memory, so a guest that rewrites the header
//! while the device looks at it (time-of-check/time-of-use) changes nothing. Headers the
//! device sends are built as [`Header`]s and written in one piece.

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;

/// Size of `struct virtio_vsock_hdr`.
pub const HEADER_LEN: usize = PKT_HEADER_SIZE;
/// The same, in a used length.
pub const HEADER_LEN_U32: u32 = crate::virtio::const_u32(HEADER_LEN as u64);

/// The host's CID: guest connections to it go to the host side of this device.
pub const HOST_CID: u64 = 2;

/// `type`: stream sockets, the only type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// `op` values.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;

    /// A name for logs.
    pub fn name(op: u16) -> &'static str {
        match op {
            REQUEST => "REQUEST",
            RESPONSE => "RESPONSE",
            RST => "RST",
            SHUTDOWN => "SHUTDOWN",
            RW => "RW",
            CREDIT_UPDATE => "CREDIT_UPDATE",
            CREDIT_REQUEST => "CREDIT_REQUEST",
            _ => "unknown",
        }
    }
}

/// `flags` of a SHUTDOWN packet.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    /// Both.
    pub const BOTH: u32 = RCV | SEND;
}

/// The fields of a packet header, in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The header the device parsed with the packet (read from guest memory once).
    pub fn of<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Header {
        Header {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// The little-endian wire format.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the wire format (`None` if `b` is shorter than a header).
    pub fn from_bytes(b: &[u8]) -> Option<Header> {
        let b: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| (u64::from(u32_at(o + 4)) << 32) | u64::from(u32_at(o));
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }
}

impl std::fmt::Display for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}:{} -> {}:{} len {} type {} flags {:#x} buf_alloc {} fwd_cnt {}",
            op::name(self.op),
            self.src_cid,
            self.src_port,
            self.dst_cid,
            self.dst_port,
            self.len,
            self.type_,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_round_trips() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 0x4000_0001,
            len: 4096,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: shutdown::BOTH,
            buf_alloc: 256 << 10,
            fwd_cnt: 0xffff_fff0,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), Some(h));
        assert_eq!(Header::from_bytes(&b[..43]), None);
        assert!(h.to_string().starts_with("RW "));
        assert_eq!(op::name(0), "unknown");
    }
}
