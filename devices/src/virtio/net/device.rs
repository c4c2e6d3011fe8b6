//! The virtio-net device: configuration space, features, activation, reset and state.

use std::sync::{Arc, Mutex};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::Queue;

use super::queue_handler::{Active, NetHandler, NetStats};
use super::rx::RxConfig;
use super::tap::{offload_flags, Tap, TapError, TapSource};
use super::{
    DEFAULT_MTU, ETH_HLEN, HDR_LEN, MAX_FRAME_LEN, MAX_MTU, MIN_MTU, NUM_QUEUES, QUEUE_SIZE,
    VLAN_HLEN,
};
use crate::virtio::common::{common_accessors, ActiveQueues, HasCore, VirtioCommon};
use crate::virtio::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::virtio::persist::same;
use crate::virtio::{
    const_u16, lock, read_config_bytes, ActivateError, DeviceState, GuestMem, Interrupt,
    PersistError, QueuePosition, VirtioDevice,
};

/// Size of the part of `struct virtio_net_config` the device fills: `mac[6]`, `status`,
/// `max_virtqueue_pairs`, `mtu`.
const CONFIG_LEN: usize = 12;

/// The offloads offered when the tap takes them (checksum both ways, TCP segmentation
/// both ways). UFO/USO and ECN are not offered: Linux dropped UFO, USO needs a newer tap
/// than every host has, and neither side needs them.
pub(crate) const OFFLOAD_FEATURES: [u32; 6] = [
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
];

/// How to build a NIC.
///
/// ```no_run
/// # use devices::virtio::net::{NetConfig, TapSource};
/// # let fd: std::os::fd::OwnedFd = todo!();
/// // A tap the caller opened (e.g. in the pod's network namespace):
/// let nic = NetConfig { tap: TapSource::from(fd), mac: Some([0x02, 0, 0, 0, 0, 1]), mtu: Some(1500) };
/// // A tap by name in this process's network namespace, random MAC, MTU 1500:
/// let nic = NetConfig::named("tap0");
/// ```
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The host side.
    pub tap: TapSource,
    /// The guest's MAC address (config space); a random locally administered one if
    /// `None`. Must be unicast.
    pub mac: Option<[u8; 6]>,
    /// The MTU the guest uses (`VIRTIO_NET_F_MTU`), [`MIN_MTU`]..=[`MAX_MTU`]; 1500 if
    /// `None`. Keep the tap's MTU at most this: larger frames from the host are dropped.
    pub mtu: Option<u16>,
}

impl NetConfig {
    /// A NIC on the tap `name`, random MAC, default MTU.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            tap: TapSource::Name(name.into()),
            mac: None,
            mtu: None,
        }
    }
}

/// Errors building a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("MTU {0} is outside {MIN_MTU}..={MAX_MTU}")]
    Mtu(u16),
    #[error("MAC address {} is a multicast address: the guest needs a unicast one (first byte even)", format_mac(.0))]
    MulticastMac([u8; 6]),
    #[error("cannot create the device's event fds: {0}; check the process's fd limit")]
    EventFd(std::io::Error),
}

/// The device's state (for snapshots and tests). A restored device must have the saved MAC
/// and MTU (the guest has read them); `tap` is the source VM's interface name and only
/// informative: a restore binds the device to this VM's tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub tap: String,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub avail_features: u64,
    pub acked_features: u64,
    /// Its positions in the queues (rx, tx) while the device is active.
    pub queues: Option<Vec<QueuePosition>>,
}

/// A virtio-net device on a tap (see the [module docs](super)).
pub struct Net {
    common: VirtioCommon,
    tap: Arc<Tap>,
    mac: [u8; 6],
    mtu: u16,
    handler: Arc<Mutex<NetHandler>>,
}

impl Net {
    /// Opens the tap and builds the device.
    pub fn new(cfg: &NetConfig) -> Result<Net, NetError> {
        let mtu = cfg.mtu.unwrap_or(DEFAULT_MTU);
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(NetError::Mtu(mtu));
        }
        let mac = match cfg.mac {
            Some(mac) if mac[0] & 1 != 0 => return Err(NetError::MulticastMac(mac)),
            Some(mac) => mac,
            None => random_mac(),
        };
        let tap = Arc::new(Tap::open(&cfg.tap)?);

        let mut avail = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_MTU)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF);
        let offloads = tap.supports_offloads();
        if offloads {
            avail |= OFFLOAD_FEATURES.iter().fold(0, |a, &f| a | bit(f));
        }
        info!(
            "virtio-net: tap {}, MAC {}, MTU {mtu}, offloads {}",
            tap.name(),
            format_mac(&mac),
            if offloads {
                "on"
            } else {
                "off (the tap refuses them)"
            }
        );
        let (common, handler) = VirtioCommon::with_handler(
            "virtio-net",
            VIRTIO_ID_NET,
            &[QUEUE_SIZE; NUM_QUEUES],
            avail,
            |core| NetHandler::new(core, tap.clone()),
        )
        .map_err(NetError::EventFd)?;
        Ok(Net {
            common,
            tap,
            mac,
            mtu,
            handler,
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The guest's MTU.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The event-loop handler (also reachable as [`VirtioDevice::subscriber`]).
    pub fn handler(&self) -> Arc<Mutex<NetHandler>> {
        self.handler.clone()
    }

    /// Frame counters.
    pub fn stats(&self) -> NetStats {
        lock(&self.handler).stats()
    }

    /// The device's state.
    pub fn state(&self) -> NetState {
        NetState {
            tap: self.tap.name().to_string(),
            mac: self.mac,
            mtu: self.mtu,
            avail_features: self.common.features().avail(),
            acked_features: self.common.features().acked(),
            queues: lock(&self.handler).core().queue_positions(),
        }
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&const { const_u16(VIRTIO_NET_S_LINK_UP) }.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// What receiving needs from the features the driver accepted.
    fn rx_config(&self, acked: u64) -> RxConfig {
        let gso = offload_flags(acked) & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0;
        let frame = if gso {
            MAX_FRAME_LEN
        } else {
            usize::from(self.mtu) + ETH_HLEN + VLAN_HLEN
        };
        RxConfig {
            mergeable: acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            frame_max: HDR_LEN + frame,
        }
    }
}

/// A random locally administered unicast MAC address.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into the valid buffer.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if usize::try_from(n) != Ok(mac.len()) {
        // No entropy source: still unique enough per process for a NIC address.
        let seed = std::process::id().to_le_bytes();
        mac[2..6].copy_from_slice(&seed);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl VirtioDevice for Net {
    common_accessors!(common);

    // The MAC is writable only for legacy drivers and with CTRL_MAC_ADDR (not offered): the
    // default `write_config` ignores writes.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.common.check_queues(&queues)?;
        let mut handler = lock(&self.handler);
        handler.core().check_idle()?;
        let acked = self.common.features().acked();
        let offload = offload_flags(acked);
        self.tap
            .set_offload(offload)
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        let io = ActiveQueues::new(handler.core(), mem, interrupt, queues);
        handler.core_mut().activate(Active {
            io,
            acked,
            rx: self.rx_config(acked),
            rx_waiting: false,
        });
        info!(
            "virtio-net: tap {} active, features {acked:#x}, tap offloads {offload:#x}",
            self.tap.name()
        );
        Ok(())
    }

    fn reset(&mut self) -> bool {
        lock(&self.handler).core_mut().reset();
        if let Err(e) = self.tap.set_offload(0) {
            warn!("virtio-net: {e}");
        }
        true
    }

    fn save(&self) -> DeviceState {
        DeviceState::Net(self.state())
    }

    fn check_restore(&self, saved: &DeviceState) -> Result<(), PersistError> {
        let DeviceState::Net(s) = saved else {
            return saved.same_kind(&self.save());
        };
        same(
            "virtio-net",
            "MAC address",
            &format_mac(&s.mac),
            &format_mac(&self.mac),
        )?;
        same("virtio-net", "MTU", &s.mtu, &self.mtu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        let mac = parse_mac("02:00:0a:FF:00:01").unwrap();
        assert_eq!(mac, [2, 0, 0x0a, 0xff, 0, 1]);
        assert_eq!(format_mac(&mac), "02:00:0a:ff:00:01");
        assert_eq!(parse_mac("02-00-0a-ff-00-01"), Some(mac));
        for bad in [
            "",
            "02:00:0a:ff:00",
            "02:00:0a:ff:00:01:02",
            "2:00:0a:ff:00:01",
            "zz:00:0a:ff:00:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        for _ in 0..16 {
            let r = random_mac();
            assert_eq!(r[0] & 0x03, 0x02, "locally administered unicast");
        }
    }
}
