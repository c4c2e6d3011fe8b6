//! `podvisor boot`'s device arguments: `--disk PATH[,ro]` and
//! `--net TAP[,mac=..][,mtu=N]`, parsed into the device configurations the VMM takes
//! (`--share` parses with the virtio-fs share's own `FromStr`).

use std::path::PathBuf;

use vmm::config::{parse_mac, BlockConfig, NetConfig, MAX_MTU, MIN_MTU};

/// A device argument that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid disk {spec:?}: expected PATH[,ro]")]
    Disk { spec: String },
    #[error("invalid NIC {spec:?}: {reason}; expected TAP[,mac=02:xx:xx:xx:xx:xx][,mtu=N]")]
    Net { spec: String, reason: String },
}

/// Parses a disk given as `PATH[,ro]`.
pub fn parse_disk(spec: &str) -> Result<BlockConfig, SpecError> {
    let err = || SpecError::Disk {
        spec: spec.to_string(),
    };
    let mut parts = spec.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(err)?;
    let mut read_only = false;
    for opt in parts {
        match opt {
            "ro" => read_only = true,
            "rw" => read_only = false,
            _ => return Err(err()),
        }
    }
    Ok(BlockConfig {
        path: PathBuf::from(path),
        read_only,
        id: None,
    })
}

/// Parses a NIC given as `TAP[,mac=AA:BB:CC:DD:EE:FF][,mtu=N]` (a tap by name, opened or
/// created in the caller's network namespace).
pub fn parse_net(spec: &str) -> Result<NetConfig, SpecError> {
    let err = |reason: &str| SpecError::Net {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let mut parts = spec.split(',');
    let tap = parts
        .next()
        .filter(|t| !t.is_empty() && !t.contains('='))
        .ok_or_else(|| err("the tap name comes first"))?;
    let mut nic = NetConfig::named(tap);
    for opt in parts {
        match opt.split_once('=') {
            Some(("mac", v)) => {
                let mac = parse_mac(v).ok_or_else(|| err("bad MAC"))?;
                if mac[0] & 1 != 0 {
                    return Err(err("the MAC is a multicast address"));
                }
                nic.mac = Some(mac);
            }
            Some(("mtu", v)) => {
                let mtu = v.parse::<u16>().map_err(|_| err("bad MTU"))?;
                if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                    return Err(err(&format!("the MTU must be {MIN_MTU} to {MAX_MTU}")));
                }
                nic.mtu = Some(mtu);
            }
            _ => return Err(err(&format!("unknown option {opt:?}"))),
        }
    }
    Ok(nic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::config::TapSource;

    #[test]
    fn parses_disk_specs() {
        let d = parse_disk("/var/a.img,ro").unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("/var/a.img"), true));
        assert!(!parse_disk("b.img").unwrap().read_only);
        assert!(parse_disk("").is_err());
        assert!(parse_disk("a.img,bogus").is_err());
    }

    #[test]
    fn parses_net_specs() {
        let n = parse_net("tap0,mac=02:00:00:00:00:07,mtu=9000").unwrap();
        assert!(matches!(&n.tap, TapSource::Name(t) if t == "tap0"));
        assert_eq!((n.mac, n.mtu), (Some([2, 0, 0, 0, 0, 7]), Some(9000)));
        let n = parse_net("tap1").unwrap();
        assert_eq!((n.mac, n.mtu), (None, None));
        for bad in [
            "",
            "mac=02:00:00:00:00:07",
            "tap0,mac=01:00:00:00:00:07",
            "tap0,mac=zz",
            "tap0,mtu=10",
            "tap0,mtu=big",
            "tap0,speed=10",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
    }
}
