//! The pod's network: the CNI network namespace on the host wired to the pod VM's NIC(s),
//! Kata's "tc-redirect" (tcfilter) model. For maintainers:
//!
//! ```text
//!  host / CNI bridge ── veth peer ══ veth eth0 ──ingress u32 → mirred redirect──▶ tap0_pv ──fd──▶ VMM virtio-net ──▶ guest eth0
//!                                   (pod netns)  ◀──mirred redirect ← u32 ingress──         (same MAC as the veth)
//! ```
//!
//! * Input: the network namespace path of the CRI sandbox container
//!   (`linux.namespaces[type=network].path`, `spec::netns_path`). No path (`ctr run`): no NIC,
//!   the guest has loopback only.
//! * [`PodNetwork::setup`], in a dedicated thread inside that namespace ([`Netns::run`]):
//!   every non-loopback Ethernet link (CNI's veth, usually `eth0`) is read (MAC, MTU,
//!   addresses, the main table's routes); a tap `tap<N>_pv` is created with the veth's
//!   MTU and set up; each gets an `ingress` qdisc and a match-all u32 filter whose action is
//!   `mirred egress redirect` to the other, both ways. No bridge, no extra process, the
//!   veth keeps its addresses (nothing reaches the namespace's own stack any more: its
//!   ingress is redirected).
//! * The guest NIC gets the veth's MAC, so the neighbour entries of the peer (bridge, host,
//!   other pods) stay valid; the tap keeps its own random MAC, never seen by anyone. The
//!   agent finds the NIC by that MAC ([`PodNetwork::request`] → ConfigureNetwork) and gives
//!   it the veth's name, MTU, addresses and routes.
//! * The tap fd ([`Nic::tap_fd`]) goes to the VMM (`vmm::config::NetConfig` with
//!   `TapSource::Fd`, `mac`, `mtu`); it is non-blocking and carries a 12-byte virtio-net
//!   header per frame ([`tap::VNET_HDR_LEN`]). Offloads are off until the device enables
//!   them (TUNSETOFFLOAD), so frames arrive with complete checksums.
//! * Teardown ([`PodNetwork::teardown`], or drop): the veth's ingress qdisc (and with it its
//!   filter) and the tap (its qdisc goes with it); the veth belongs to CNI and stays. The
//!   namespace is held open by [`Netns`] until then.
//! * A shim that died (SIGKILL) tears nothing down: `shim delete` for the pod's last
//!   container runs [`cleanup_stale`] on the namespace of the bundle's spec, which removes
//!   ingress qdiscs whose redirects point at deleted links or at taps of ours, and those taps.

pub mod forward;
pub mod netns;
pub mod tap;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use podvisor_agent_protocol::agent::{ConfigureNetworkRequest, Interface, Route as AgentRoute};
use podvisor_agent_protocol::rtnl::{Address, Link, LinkChange, MacAddr, Route, Rtnl, RtnlError};

pub use netns::Netns;

/// Suffix of the taps podvisor creates (`tap0_pv`); such links are never taken for CNI's.
pub const TAP_SUFFIX: &str = "_pv";

/// errno values meaning "already gone" for a teardown.
const GONE: [i32; 3] = [libc::ENOENT, libc::ENODEV, libc::EINVAL];

/// Pod network wiring failures; each says what failed and where to look.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open the pod network namespace {path}: {source}; check the path in the sandbox's OCI spec (linux.namespaces, type network) and that CNI created it")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot enter the pod network namespace {netns}: {source} (the shim needs CAP_SYS_ADMIN)"
    )]
    EnterNetns {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("netns {0} has no non-loopback interface: did CNI run? (check containerd's CNI config and plugin logs)")]
    NoInterface(String),
    #[error("pod network namespace {netns}: {what}: {source}")]
    Netlink {
        netns: String,
        what: String,
        #[source]
        source: RtnlError,
    },
    #[error("pod network namespace {netns}: creating tap {tap}: {source}; check /dev/net/tun (CONFIG_TUN) and that no {tap} is left from an earlier pod")]
    Tap {
        netns: String,
        tap: String,
        #[source]
        source: io::Error,
    },
    #[error("pod network namespace {netns}: {name} has MTU {mtu}, more than a virtio-net device can announce (65535)")]
    Mtu {
        netns: String,
        name: String,
        mtu: u32,
    },
}

/// The links of a namespace CNI put there for the pod: non-loopback Ethernet links with a
/// MAC, not a tap of ours.
pub fn cni_links(links: &[Link]) -> Vec<&Link> {
    links
        .iter()
        .filter(|l| !l.loopback && l.ether && l.mac.is_some())
        .filter(|l| l.kind.as_deref() != Some("tun") && !l.name.ends_with(TAP_SUFFIX))
        .collect()
}

/// The ConfigureNetwork request that gives the guest what the namespace has on `wired`:
/// their MACs, names, MTUs and addresses (not link-local ones: the guest makes its own),
/// and the main table's routes through them, link-scope routes first. Routes the kernel
/// derives from an address's prefix (`proto kernel`) are left out: the guest's kernel
/// derives them too.
pub fn agent_request(
    wired: &[&Link],
    addresses: &[Address],
    routes: &[Route],
) -> ConfigureNetworkRequest {
    let mut req = ConfigureNetworkRequest::new();
    for link in wired {
        req.interfaces.push(Interface {
            mac: link.mac.unwrap_or_default().to_string(),
            name: link.name.clone(),
            mtu: link.mtu,
            addresses: addresses
                .iter()
                .filter(|a| {
                    a.index == link.index && a.scope != podvisor_agent_protocol::rtnl::SCOPE_LINK
                })
                .map(|a| a.cidr.to_string())
                .collect(),
            ..Default::default()
        });
    }
    let mut picked: Vec<&Route> = routes
        .iter()
        .filter(|r| !r.kernel)
        .filter(|r| {
            r.oif
                .is_some_and(|oif| wired.iter().any(|l| l.index == oif))
        })
        .collect();
    picked.sort_by_key(|r| r.gateway.is_some());
    for r in picked {
        let device = wired
            .iter()
            .find(|l| Some(l.index) == r.oif)
            .map(|l| l.name.clone())
            .unwrap_or_default();
        req.routes.push(AgentRoute {
            destination: r.destination.map(|d| d.to_string()).unwrap_or_default(),
            gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
            source: r.source.map(|s| s.to_string()).unwrap_or_default(),
            device,
            scope: i32::from(r.scope),
            ..Default::default()
        });
    }
    req
}

/// One wired interface: the veth CNI made and the tap that stands for the guest NIC.
#[derive(Debug)]
pub struct Nic {
    /// The veth's name: the guest NIC's name.
    pub name: String,
    /// The veth's MAC: the guest NIC's MAC.
    pub mac: [u8; 6],
    pub mtu: u16,
    pub tap_name: String,
    tap: OwnedFd,
    veth_index: u32,
    tap_index: u32,
}

impl Nic {
    /// A new fd of the tap for the VMM (`TapSource::Fd`); the device lives while any is open
    /// and until [`PodNetwork::teardown`].
    pub fn tap_fd(&self) -> io::Result<OwnedFd> {
        self.tap.try_clone()
    }
}

/// A pod namespace wired for its VM; torn down on [`Self::teardown`] or drop.
#[derive(Debug)]
pub struct PodNetwork {
    /// The guest NICs to create, in order.
    pub nics: Vec<Nic>,
    /// What the agent must be told (ConfigureNetwork), after CreateSandbox.
    pub request: ConfigureNetworkRequest,
    netns: Netns,
    /// Port forwarding into the VM ([`forward`]), once started.
    forward: Option<forward::PortForward>,
    torn_down: bool,
}

impl PodNetwork {
    /// Wires the namespace at `netns_path` (see the module docs); on failure nothing of it is
    /// left.
    pub fn setup(netns_path: &Path) -> Result<Self, NetError> {
        let netns = Netns::open(netns_path).map_err(|source| NetError::OpenNetns {
            path: netns_path.to_path_buf(),
            source,
        })?;
        let name = netns.path().to_string();
        let (nics, request) = netns
            .run("pod-net-setup", || wire(&name))
            .map_err(|source| NetError::EnterNetns {
                netns: name.clone(),
                source,
            })??;
        for nic in &nics {
            log::info!(
                "pod network {name}: {} ({}, mtu {}) ⇄ {} by tc redirect",
                nic.name,
                MacAddr(nic.mac),
                nic.mtu,
                nic.tap_name
            );
        }
        Ok(Self {
            nics,
            request,
            netns,
            forward: None,
            torn_down: false,
        })
    }

    /// Starts forwarding containerd's PortForward dials in the namespace to the agent,
    /// whose port-forward listener `connect` reaches ([`forward`]).
    pub fn forward_ports(&mut self, connect: forward::Connect) -> io::Result<()> {
        self.forward = Some(forward::PortForward::start(&self.netns, connect)?);
        Ok(())
    }

    /// The namespace's path.
    pub fn netns(&self) -> &str {
        self.netns.path()
    }

    /// Removes the veths' ingress qdiscs (with their filters) and the taps.
    pub fn teardown(mut self) -> Result<(), NetError> {
        self.torn_down = true;
        self.unwire()
    }

    fn unwire(&mut self) -> Result<(), NetError> {
        self.forward = None;
        let name = self.netns.path().to_string();
        let nics = std::mem::take(&mut self.nics);
        let pairs: Vec<(u32, u32, String)> = nics
            .iter()
            .map(|n| (n.veth_index, n.tap_index, n.name.clone()))
            .collect();
        // Our tap fds go first: the VMM may hold others.
        drop(nics);
        self.netns
            .run("pod-net-teardown", || {
                let mut nl = Rtnl::open().map_err(netlink(&name, "opening a netlink socket"))?;
                let mut first_err = None;
                for (veth, tap, veth_name) in &pairs {
                    if let Err(e) = unwire_one(&mut nl, &name, *veth, *tap, veth_name) {
                        first_err.get_or_insert(e);
                    }
                }
                first_err.map_or(Ok(()), Err)
            })
            .map_err(|source| NetError::EnterNetns {
                netns: name.clone(),
                source,
            })?
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if !self.torn_down {
            if let Err(e) = self.unwire() {
                log::warn!("pod network teardown: {e}");
            }
        }
    }
}

/// Removes what a shim that died (SIGKILL, crash) left wired in the pod namespace at
/// `netns_path`: taps of ours (`*_pv`: gone already when their last fd closed with the
/// shim, unless the VMM leaked one) and the ingress qdisc of every CNI link whose filters
/// all redirect to a link that no longer exists or to a tap of ours. Someone else's
/// ingress qdisc (a filter redirecting elsewhere, or no filter) stays. Without the
/// cleanup the veth would blackhole its traffic (mirred to a deleted device) and refuse
/// the next pod's wiring. A namespace that is gone (CNI deleted it) is fine. Returns what
/// was removed, for the log.
pub fn cleanup_stale(netns_path: &Path) -> Result<Vec<String>, NetError> {
    let netns = match Netns::open(netns_path) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(NetError::OpenNetns {
                path: netns_path.to_path_buf(),
                source,
            })
        }
    };
    let name = netns.path().to_string();
    netns
        .run("pod-net-cleanup", || {
            let mut nl = Rtnl::open().map_err(netlink(&name, "opening a netlink socket"))?;
            let links = nl.links().map_err(netlink(&name, "listing links"))?;
            let ours: Vec<&Link> = links
                .iter()
                .filter(|l| l.name.ends_with(TAP_SUFFIX))
                .collect();
            let mut removed = Vec::new();
            for l in cni_links(&links) {
                if !nl
                    .has_ingress_qdisc(l.index)
                    .map_err(netlink(&name, "listing qdiscs"))?
                {
                    continue;
                }
                let targets = nl
                    .redirect_targets(l.index)
                    .map_err(netlink(&name, "listing tc filters"))?;
                let stale = !targets.is_empty()
                    && targets.iter().all(|t| {
                        !links.iter().any(|x| x.index == *t) || ours.iter().any(|x| x.index == *t)
                    });
                if stale {
                    gone_ok(nl.del_ingress_qdisc(l.index))
                        .map_err(netlink(&name, "removing a stale ingress qdisc"))?;
                    removed.push(format!("ingress qdisc of {}", l.name));
                }
            }
            for tap in ours {
                gone_ok(nl.del_link(tap.index)).map_err(netlink(&name, "deleting a stale tap"))?;
                removed.push(format!("tap {}", tap.name));
            }
            Ok(removed)
        })
        .map_err(|source| NetError::EnterNetns {
            netns: name.clone(),
            source,
        })?
}

fn netlink<'a>(netns: &'a str, what: &'a str) -> impl FnOnce(RtnlError) -> NetError + 'a {
    move |source| NetError::Netlink {
        netns: netns.to_string(),
        what: what.to_string(),
        source,
    }
}

/// Ignores "already gone" answers.
fn gone_ok(result: Result<(), RtnlError>) -> Result<(), RtnlError> {
    match result {
        Err(e) if e.errno().is_some_and(|n| GONE.contains(&n)) => Ok(()),
        other => other,
    }
}

fn unwire_one(
    nl: &mut Rtnl,
    netns: &str,
    veth: u32,
    tap: u32,
    veth_name: &str,
) -> Result<(), NetError> {
    gone_ok(nl.del_ingress_qdisc(veth)).map_err(|source| NetError::Netlink {
        netns: netns.to_string(),
        what: format!("removing the ingress qdisc of {veth_name}"),
        source,
    })?;
    gone_ok(nl.del_link(tap)).map_err(|source| NetError::Netlink {
        netns: netns.to_string(),
        what: format!("deleting the tap of {veth_name}"),
        source,
    })
}

/// Runs in the namespace: discovery, then one tap + redirect pair per CNI link.
fn wire(netns: &str) -> Result<(Vec<Nic>, ConfigureNetworkRequest), NetError> {
    let mut nl = Rtnl::open().map_err(netlink(netns, "opening a netlink socket"))?;
    let links = nl.links().map_err(netlink(netns, "listing links"))?;
    let addresses = nl
        .addresses()
        .map_err(netlink(netns, "listing addresses"))?;
    let routes = nl.routes().map_err(netlink(netns, "listing routes"))?;
    let wired = cni_links(&links);
    if wired.is_empty() {
        return Err(NetError::NoInterface(netns.to_string()));
    }
    let request = agent_request(&wired, &addresses, &routes);
    let mut nics: Vec<Nic> = Vec::new();
    for (i, veth) in wired.iter().enumerate() {
        match wire_one(&mut nl, netns, i, veth) {
            Ok(nic) => nics.push(nic),
            Err(e) => {
                for nic in nics.drain(..) {
                    let (v, t, n) = (nic.veth_index, nic.tap_index, nic.name.clone());
                    drop(nic);
                    if let Err(e) = unwire_one(&mut nl, netns, v, t, &n) {
                        log::warn!("undoing the pod network after a failure: {e}");
                    }
                }
                return Err(e);
            }
        }
    }
    Ok((nics, request))
}

fn wire_one(nl: &mut Rtnl, netns: &str, i: usize, veth: &Link) -> Result<Nic, NetError> {
    let mtu = u16::try_from(veth.mtu).map_err(|_| NetError::Mtu {
        netns: netns.to_string(),
        name: veth.name.clone(),
        mtu: veth.mtu,
    })?;
    let tap_name = format!("tap{i}{TAP_SUFFIX}");
    let tap = tap::create(&tap_name).map_err(|source| NetError::Tap {
        netns: netns.to_string(),
        tap: tap_name.clone(),
        source,
    })?;
    let tap_link = nl
        .link_by_name(&tap_name)
        .map_err(netlink(netns, "looking up the new tap"))?
        .ok_or_else(|| NetError::Tap {
            netns: netns.to_string(),
            tap: tap_name.clone(),
            source: io::Error::other("created, but not listed by the kernel"),
        })?;
    let nic = Nic {
        name: veth.name.clone(),
        mac: veth.mac.unwrap_or_default().0,
        mtu,
        tap_name: tap_name.clone(),
        tap,
        veth_index: veth.index,
        tap_index: tap_link.index,
    };
    // From here a failure removes what was made (the tap goes when its last fd closes and
    // is deleted anyway; the veth's qdisc is ours only if we added it).
    let mut veth_qdisc = false;
    let result = (|| {
        let what = |w: &str| format!("{w} ({} ⇄ {tap_name})", veth.name);
        nl.set_link(
            nic.tap_index,
            &LinkChange {
                mtu: Some(veth.mtu),
                up: Some(true),
                ..Default::default()
            },
        )
        .map_err(|source| NetError::Netlink {
            netns: netns.to_string(),
            what: what("setting the tap's MTU and bringing it up"),
            source,
        })?;
        nl.add_ingress_qdisc(veth.index)
            .map_err(|source| NetError::Netlink {
                netns: netns.to_string(),
                what: what(&format!(
                    "adding an ingress qdisc to {} (EEXIST: another tc user has one there)",
                    veth.name
                )),
                source,
            })?;
        veth_qdisc = true;
        nl.add_ingress_qdisc(nic.tap_index)
            .map_err(|source| NetError::Netlink {
                netns: netns.to_string(),
                what: what("adding an ingress qdisc to the tap"),
                source,
            })?;
        for (from, to) in [(veth.index, nic.tap_index), (nic.tap_index, veth.index)] {
            nl.add_redirect_filter(from, to)
                .map_err(|source| NetError::Netlink {
                    netns: netns.to_string(),
                    what: what("adding the u32 + mirred redirect filter (kernel needs CONFIG_NET_CLS_U32, CONFIG_NET_ACT_MIRRED)"),
                    source,
                })?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(nic),
        Err(e) => {
            if veth_qdisc {
                let _ = nl.del_ingress_qdisc(veth.index);
            }
            let _ = nl.del_link(nic.tap_index);
            Err(e)
        }
    }
}
