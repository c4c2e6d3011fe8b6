//! The bench's two network namespaces, set up like a CNI plugin would for one pod: a
//! "pod" namespace whose `eth0` (one end of a veth pair) holds the pod's address, and a
//! "peer" namespace on the other end of the veth that stands for the rest of the network.
//! The pod's containers join the pod namespace (`ctr run --with-ns network:…`); the
//! measuring client runs in the peer namespace.
//!
//! Built with iproute2's `ip` (Debian package iproute2, `make deps`); named
//! `/run/netns/pvnet-<pid>-<tag>[-peer]`. [`NetnsPair`]'s drop deletes both namespaces,
//! which deletes the veth with them, also when the bench fails or is interrupted.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

/// The pod's address on its veth (`eth0`, /24).
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
/// The peer's address on the other end.
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const PREFIX: u8 = 24;

/// Errors setting up the namespaces; nothing of the pair is left behind.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("`ip {args}` failed: {detail} (the bench needs root and iproute2: `make deps`)")]
    Ip { args: String, detail: String },
}

/// Two named network namespaces joined by a veth pair; deleted on drop.
#[derive(Debug)]
pub struct NetnsPair {
    pub pod: String,
    pub peer: String,
    created: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), PairError> {
    let fail = |detail: String| PairError::Ip {
        args: args.join(" "),
        detail,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// `/run/netns/<name>`, where `ip netns add` binds a namespace.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

impl NetnsPair {
    /// Creates `pvnet-<pid>-<tag>` (pod: `eth0` with [`POD_IP`]/24, lo up) and
    /// `pvnet-<pid>-<tag>-peer` ([`PEER_IP`]/24 on the veth's other end, lo up).
    pub fn create(tag: &str) -> Result<NetnsPair, PairError> {
        let base = format!("pvnet-{}-{tag}", std::process::id());
        let mut pair = NetnsPair {
            pod: base.clone(),
            peer: format!("{base}-peer"),
            created: Vec::new(),
        };
        for ns in [pair.pod.clone(), pair.peer.clone()] {
            ip(&["netns", "add", &ns])?;
            pair.created.push(ns);
        }
        let (pod, peer) = (pair.pod.as_str(), pair.peer.as_str());
        let pod_cidr = format!("{POD_IP}/{PREFIX}");
        let peer_cidr = format!("{PEER_IP}/{PREFIX}");
        ip(&[
            "link", "add", "veth0", "netns", peer, "type", "veth", "peer", "name", "eth0", "netns",
            pod,
        ])?;
        ip(&["-n", pod, "addr", "add", &pod_cidr, "dev", "eth0"])?;
        ip(&["-n", peer, "addr", "add", &peer_cidr, "dev", "veth0"])?;
        for (ns, dev) in [(pod, "eth0"), (pod, "lo"), (peer, "veth0"), (peer, "lo")] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(pair)
    }

    pub fn pod_path(&self) -> PathBuf {
        netns_path(&self.pod)
    }

    pub fn peer_path(&self) -> PathBuf {
        netns_path(&self.peer)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                log::warn!("bench net: cannot delete netns {ns}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::probe;

    /// Root and iproute2 here: creates a pair, reaches the pod side from the peer side
    /// through the veth, and leaves no namespace behind.
    #[test]
    fn pair_connects_and_is_removed() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED pair_connects_and_is_removed: needs root to create netns");
            return;
        }
        let pair = NetnsPair::create("unit").expect("netns pair");
        let (pod, peer) = (pair.pod_path(), pair.peer_path());
        assert!(pod.exists() && peer.exists());
        let pod_ns = podvisor_shim::Netns::open(&pod).unwrap();
        let listener = pod_ns
            .run("pair-test-listen", || {
                std::net::TcpListener::bind((POD_IP, 0)).unwrap()
            })
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let peer_ns = podvisor_shim::Netns::open(&peer).unwrap();
        let accept = std::thread::spawn(move || listener.accept().map(|_| ()));
        let connected = peer_ns
            .run("pair-test-connect", || {
                probe::connect((POD_IP, port).into(), std::time::Duration::from_secs(5)).map(|_| ())
            })
            .unwrap();
        connected.expect("peer reaches the pod side");
        accept.join().unwrap().unwrap();
        drop((pod_ns, peer_ns));
        drop(pair);
        assert!(!pod.exists() && !peer.exists(), "netns left behind");
    }
}
