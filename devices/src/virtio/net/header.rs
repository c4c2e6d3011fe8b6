//! `struct virtio_net_hdr_v1` (virtio 1.x §5.1.6): the 12 bytes in front of every frame,
//! both ways, and the checks a guest's header must pass before its frame reaches the tap.
//!
//! ```text
//!  0: u8 flags        NEEDS_CSUM (1), DATA_VALID (2)
//!  1: u8 gso_type     NONE (0), TCPV4 (1), UDP (3), TCPV6 (4), | ECN (0x80)
//!  2: le16 hdr_len    3: ..
//!  4: le16 gso_size   6: le16 csum_start   8: le16 csum_offset
//! 10: le16 num_buffers  (rx only: how many buffers the frame spans)
//! ```
//!
//! The host kernel checks a header again when the tap gets it (`virtio_net_hdr_to_skb`); the
//! device's own check is about the features: a guest may only ask for the offloads it
//! negotiated, so a frame asking for TSO or checksum completion the device never offered
//! is dropped here.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

use super::HDR_LEN;
use crate::virtio::const_u8;
use crate::virtio::features::bit;

/// The header's flag bits, as its `flags` byte holds them.
pub const F_NEEDS_CSUM: u8 = const_u8(VIRTIO_NET_HDR_F_NEEDS_CSUM);
pub const F_DATA_VALID: u8 = const_u8(VIRTIO_NET_HDR_F_DATA_VALID);

/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// Why a guest's frame header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header flags {0:#x} are not NEEDS_CSUM/DATA_VALID")]
    Flags(u8),
    #[error("the header asks for checksum completion but VIRTIO_NET_F_CSUM was not negotiated")]
    CsumNotNegotiated,
    #[error("GSO type {0:#x} was not negotiated (or is not offered)")]
    Gso(u8),
    #[error("GSO without NEEDS_CSUM")]
    GsoWithoutCsum,
    #[error("GSO with a segment size of 0")]
    GsoSize,
    #[error("checksum at {start}+{offset} is outside the {len}-byte frame")]
    CsumRange { start: u16, offset: u16, len: usize },
}

/// A parsed `virtio_net_hdr_v1`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHdr {
    /// Parses the 12 bytes of a header.
    pub fn parse(b: &[u8; HDR_LEN]) -> NetHdr {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        }
    }

    /// The header's 12 bytes.
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Checks a transmit header against the negotiated features `acked` for a frame of
    /// `frame_len` bytes after the header. Returns the header the tap gets (`num_buffers`
    /// zeroed: it means nothing on transmit).
    pub fn check_tx(self, acked: u64, frame_len: usize) -> Result<NetHdr, HeaderError> {
        let has = |f: u32| acked & bit(f) != 0;
        let known = F_NEEDS_CSUM | F_DATA_VALID;
        if self.flags & !known != 0 {
            return Err(HeaderError::Flags(self.flags));
        }
        let needs_csum = self.flags & F_NEEDS_CSUM != 0;
        if needs_csum {
            if !has(VIRTIO_NET_F_CSUM) {
                return Err(HeaderError::CsumNotNegotiated);
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(HeaderError::CsumRange {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    len: frame_len,
                });
            }
        }
        let gso = u32::from(self.gso_type);
        if gso != VIRTIO_NET_HDR_GSO_NONE {
            let allowed = match gso {
                VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
                VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
                // UDP (UFO), UDP_L4 (USO) and ECN are not offered.
                _ => false,
            };
            if !allowed || gso & VIRTIO_NET_HDR_GSO_ECN != 0 {
                return Err(HeaderError::Gso(self.gso_type));
            }
            if !needs_csum {
                return Err(HeaderError::GsoWithoutCsum);
            }
            if self.gso_size == 0 {
                return Err(HeaderError::GsoSize);
            }
        }
        Ok(NetHdr {
            num_buffers: 0,
            ..self
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSUM: u64 = 1 << VIRTIO_NET_F_CSUM;
    const TSO4: u64 = 1 << VIRTIO_NET_F_HOST_TSO4;
    const TSO6: u64 = 1 << VIRTIO_NET_F_HOST_TSO6;

    fn tso4(gso_size: u16) -> NetHdr {
        NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: const_u8(VIRTIO_NET_HDR_GSO_TCPV4),
            hdr_len: 54,
            gso_size,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 7,
        }
    }

    #[test]
    fn round_trips_little_endian() {
        let h = tso4(1448);
        let b = h.to_bytes();
        assert_eq!(b[..4], [1, 1, 54, 0]);
        assert_eq!(b[4..6], 1448u16.to_le_bytes());
        assert_eq!(b[10..12], [7, 0]);
        assert_eq!(NetHdr::parse(&b), h);
    }

    #[test]
    fn plain_frames_need_no_features() {
        let h = NetHdr::default().check_tx(0, 60).unwrap();
        assert_eq!(h, NetHdr::default());
        // DATA_VALID is harmless.
        let dv = NetHdr {
            flags: F_DATA_VALID,
            ..Default::default()
        };
        assert!(dv.check_tx(0, 60).is_ok());
    }

    #[test]
    fn offloads_must_have_been_negotiated() {
        let csum = NetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..Default::default()
        };
        assert_eq!(csum.check_tx(0, 100), Err(HeaderError::CsumNotNegotiated));
        assert!(csum.check_tx(CSUM, 100).is_ok());
        assert!(matches!(
            csum.check_tx(CSUM, 41),
            Err(HeaderError::CsumRange { .. })
        ));

        assert_eq!(tso4(1448).check_tx(CSUM, 9000), Err(HeaderError::Gso(1)));
        let ok = tso4(1448).check_tx(CSUM | TSO4, 9000).unwrap();
        assert_eq!(ok.num_buffers, 0, "num_buffers is cleared on transmit");
        let v6 = NetHdr {
            gso_type: const_u8(VIRTIO_NET_HDR_GSO_TCPV6),
            ..tso4(1448)
        };
        assert_eq!(v6.check_tx(CSUM | TSO4, 9000), Err(HeaderError::Gso(4)));
        assert!(v6.check_tx(CSUM | TSO6, 9000).is_ok());
    }

    #[test]
    fn hostile_headers_are_refused() {
        let all = CSUM | TSO4 | TSO6;
        let bad_flags = NetHdr {
            flags: 0x80,
            ..Default::default()
        };
        assert_eq!(bad_flags.check_tx(all, 60), Err(HeaderError::Flags(0x80)));
        assert_eq!(tso4(0).check_tx(all, 9000), Err(HeaderError::GsoSize));
        let ecn = NetHdr {
            gso_type: const_u8(VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN),
            ..tso4(1448)
        };
        assert!(matches!(ecn.check_tx(all, 9000), Err(HeaderError::Gso(_))));
        let ufo = NetHdr {
            gso_type: 3,
            ..tso4(1448)
        };
        assert!(matches!(ufo.check_tx(all, 9000), Err(HeaderError::Gso(3))));
        let no_csum = NetHdr {
            flags: 0,
            ..tso4(1448)
        };
        assert_eq!(
            no_csum.check_tx(all, 9000),
            Err(HeaderError::GsoWithoutCsum)
        );
        let far = NetHdr {
            csum_start: u16::MAX,
            csum_offset: u16::MAX,
            ..tso4(1448)
        };
        assert!(matches!(
            far.check_tx(all, 65535),
            Err(HeaderError::CsumRange { .. })
        ));
    }
}
