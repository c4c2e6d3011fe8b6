//! A CNI network for a private containerd's CRI plugin: Debian's `containernetworking-plugins`
//! (`/usr/lib/cni`) `bridge` plugin with `host-local` IPAM, a bridge name and a /24 subnet
//! unique to the test process, IPAM state in the test's directory.
//!
//! The bridge plugin leaves its bridge in the root namespace after the last pod's DEL and,
//! as a gateway, turns on IPv4 forwarding: [`CniNetwork`]'s drop deletes the bridge and
//! restores `net.ipv4.ip_forward`, also when the test fails.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where Debian's containernetworking-plugins installs the plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// A CNI configuration written for one test; cleans up the host on drop.
#[derive(Debug)]
pub struct CniNetwork {
    /// containerd's `conf_dir` (holds `10-podvisor-test.conflist`).
    pub conf_dir: PathBuf,
    /// The bridge in the root namespace (≤ 15 characters).
    pub bridge: String,
    /// The pods' /24 subnet; the bridge (gateway) has `.1`.
    pub subnet: Ipv4Addr,
    pub gateway: Ipv4Addr,
    ip_forward: Option<String>,
}

/// Whether the bridge + host-local + loopback plugins are installed.
pub fn cni_plugins_installed() -> bool {
    ["bridge", "host-local", "loopback"]
        .iter()
        .all(|p| Path::new(CNI_BIN_DIR).join(p).is_file())
}

impl CniNetwork {
    /// Writes the config under `dir` (`dir/cni/conf`, IPAM state in `dir/cni/ipam`).
    pub fn write(dir: &Path) -> CniNetwork {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let bridge = format!("pvbr{}x{seq}", pid % 1_000_000);
        // 10.213-244.x.0/24: test-only range, unique per process (and call) here.
        let subnet = Ipv4Addr::new(10, 213 + (seq % 32) as u8, (pid % 251) as u8, 0);
        let o = subnet.octets();
        let gateway = Ipv4Addr::new(o[0], o[1], o[2], 1);
        let conf_dir = dir.join("cni/conf");
        std::fs::create_dir_all(&conf_dir).unwrap();
        let config = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("podvisor-test-{pid}-{seq}"),
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("{subnet}/24"), "gateway": gateway.to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.join("cni/ipam").display().to_string(),
                },
            }],
        });
        std::fs::write(
            conf_dir.join("10-podvisor-test.conflist"),
            serde_json::to_vec_pretty(&config).unwrap(),
        )
        .unwrap();
        CniNetwork {
            conf_dir,
            bridge,
            subnet,
            gateway,
            ip_forward: std::fs::read_to_string(IP_FORWARD).ok(),
        }
    }

    /// Whether `ip` is in the pods' subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.octets()[..3] == self.subnet.octets()[..3]
    }
}

impl Drop for CniNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
        if let Some(value) = &self.ip_forward {
            let _ = std::fs::write(IP_FORWARD, value);
        }
    }
}
