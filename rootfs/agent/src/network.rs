//! ConfigureNetwork: the pod VM's network namespace, set up as the shim found the pod's
//! network namespace on the host (tc-redirect model: the guest NIC carries the host veth's
//! MAC, addresses and routes, so the CNI side sees the pod as it would without a VM).
//!
//! Order: validate the whole request against the links the guest has ([`plan`], pure and
//! unit-tested) so a bad request changes nothing; bring `lo` up; per interface: down (a
//! rename needs it), name + MTU, addresses, up; then the routes, link-scope (no gateway)
//! routes first so the gateways they make reachable exist before the routes through them
//! ([`order_routes`]). Addresses and routes are added with NLM_F_REPLACE: a repeated call
//! converges instead of failing on EEXIST. `/etc/resolv.conf` is written only when the agent
//! owns the machine (guest mode); in host-test mode the host's file is left alone.
//!
//! Containers of the pod share the VM's network namespace (the shim drops the netns from
//! their specs), so this runs in the agent's own namespace, through `rtnl`.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;

use podvisor_agent_protocol::agent::ConfigureNetworkRequest;
use podvisor_agent_protocol::rtnl::{Cidr, Link, LinkChange, MacAddr, NewRoute, Rtnl, RtnlError};

use crate::error::RpcError;

/// Longest interface name (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// Errors of ConfigureNetwork.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{0}")]
    Invalid(String),
    #[error("no network interface in the VM has MAC {0}: the VM has no NIC for it (check the VMM's net device list and the guest kernel's virtio-net driver)")]
    NoSuchMac(MacAddr),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: RtnlError,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<NetworkError> for RpcError {
    fn from(err: NetworkError) -> Self {
        let msg = err.to_string();
        match err {
            NetworkError::Invalid(_) => RpcError::InvalidArgument(msg),
            NetworkError::NoSuchMac(_) => RpcError::NotFound(msg),
            _ => RpcError::Internal(msg),
        }
    }
}

/// One interface to configure, resolved to a guest link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedInterface {
    pub index: u32,
    pub current_name: String,
    /// The new name; None keeps the current one.
    pub rename: Option<String>,
    /// The requested MAC, when the NIC has another one (see [`plan`]).
    pub set_mac: Option<MacAddr>,
    pub mtu: Option<u32>,
    pub addresses: Vec<Cidr>,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub interfaces: Vec<PlannedInterface>,
    /// In the order they are added.
    pub routes: Vec<NewRoute>,
}

fn invalid(msg: impl Into<String>) -> NetworkError {
    NetworkError::Invalid(msg.into())
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn parse_ip(what: &str, s: &str) -> Result<Option<IpAddr>, NetworkError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| invalid(format!("{what} {s:?} is not an IP address")))
}

/// Link-scope (directly connected) routes before routes through a gateway; otherwise the
/// request's order.
pub fn order_routes(routes: &mut [NewRoute]) {
    routes.sort_by_key(|r| r.gateway.is_some());
}

/// The NIC that takes the request's MAC when no NIC has it: a VM restored from a template
/// has the template's MAC on its only NIC. Only when both the request and the VM have
/// exactly one Ethernet NIC (besides loopback) and none of the request's MACs is present.
fn adoptable<'a>(req: &ConfigureNetworkRequest, links: &'a [Link]) -> Option<&'a Link> {
    let nics: Vec<&Link> = links.iter().filter(|l| l.ether && !l.loopback).collect();
    match (req.interfaces.as_slice(), nics.as_slice()) {
        ([_], [only]) => Some(only),
        _ => None,
    }
}

/// Checks `req` against the guest's `links` and resolves it; changes nothing.
pub fn plan(req: &ConfigureNetworkRequest, links: &[Link]) -> Result<Plan, NetworkError> {
    let mut interfaces = Vec::new();
    let mut macs = HashSet::new();
    let mut names = HashSet::new();
    for iface in &req.interfaces {
        let mac: MacAddr = iface
            .mac
            .parse()
            .map_err(|e| invalid(format!("interface {:?}: {e}", iface.name)))?;
        if !macs.insert(mac) {
            return Err(invalid(format!("MAC {mac} is listed twice")));
        }
        if !iface.name.is_empty() && !valid_ifname(&iface.name) {
            return Err(invalid(format!(
                "{:?} is not a valid interface name (1 to {MAX_IFNAME} characters, no '/', ':' or spaces)",
                iface.name
            )));
        }
        let link = match links.iter().find(|l| l.mac == Some(mac) && !l.loopback) {
            Some(l) => l,
            None => adoptable(req, links).ok_or(NetworkError::NoSuchMac(mac))?,
        };
        let name = if iface.name.is_empty() {
            link.name.clone()
        } else {
            iface.name.clone()
        };
        if !names.insert(name.clone()) {
            return Err(invalid(format!("interface name {name:?} is used twice")));
        }
        if let Some(other) = links
            .iter()
            .find(|l| l.name == name && l.index != link.index)
        {
            return Err(invalid(format!(
                "cannot name the NIC {mac} {name:?}: the VM's interface {} already has that name",
                other.index
            )));
        }
        if iface.mtu != 0 && !(68..=65535).contains(&iface.mtu) {
            return Err(invalid(format!(
                "interface {name:?}: MTU {} is outside 68..=65535",
                iface.mtu
            )));
        }
        let addresses = iface
            .addresses
            .iter()
            .map(|a| {
                a.parse::<Cidr>()
                    .map_err(|e| invalid(format!("interface {name:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        interfaces.push(PlannedInterface {
            index: link.index,
            current_name: link.name.clone(),
            rename: (name != link.name).then_some(name),
            set_mac: (link.mac != Some(mac)).then_some(mac),
            mtu: (iface.mtu != 0).then_some(iface.mtu),
            addresses,
        });
    }

    let mut routes = Vec::new();
    for r in &req.routes {
        let destination = if r.destination.is_empty() {
            None
        } else {
            Some(
                r.destination
                    .parse::<Cidr>()
                    .map_err(|e| invalid(format!("route destination: {e}")))?,
            )
        };
        let gateway = parse_ip("route gateway", &r.gateway)?;
        let source = parse_ip("route source", &r.source)?;
        let families: HashSet<bool> = destination
            .map(|d| d.ip.is_ipv4())
            .into_iter()
            .chain(gateway.map(|g| g.is_ipv4()))
            .chain(source.map(|s| s.is_ipv4()))
            .collect();
        if families.len() > 1 {
            return Err(invalid(format!(
                "route to {:?} mixes IPv4 and IPv6 addresses",
                r.destination
            )));
        }
        let oif = if r.device.is_empty() {
            match interfaces.as_slice() {
                [only] => only.index,
                _ => {
                    return Err(invalid(format!(
                        "route to {:?} names no device and the request has {} interfaces",
                        r.destination,
                        interfaces.len()
                    )))
                }
            }
        } else if let Some(i) = interfaces
            .iter()
            .find(|i| i.rename.as_deref().unwrap_or(&i.current_name) == r.device)
        {
            i.index
        } else if let Some(l) = links
            .iter()
            .find(|l| l.name == r.device && !interfaces.iter().any(|i| i.index == l.index))
        {
            l.index
        } else {
            return Err(invalid(format!(
                "route to {:?}: device {:?} is neither an interface of the request nor one of the VM's",
                r.destination, r.device
            )));
        };
        let scope = u8::try_from(r.scope)
            .map_err(|_| invalid(format!("route scope {} is not 0..=255", r.scope)))?;
        routes.push(NewRoute {
            destination,
            gateway,
            source,
            oif,
            scope,
        });
    }
    order_routes(&mut routes);
    Ok(Plan { interfaces, routes })
}

fn netlink(what: impl Into<String>) -> impl FnOnce(RtnlError) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// Applies `req` in the calling thread's network namespace; writes `resolv_conf` (when
/// given and the request has content for it).
pub fn configure(
    req: &ConfigureNetworkRequest,
    resolv_conf: Option<&Path>,
) -> Result<(), NetworkError> {
    let mut nl = Rtnl::open().map_err(netlink("opening a netlink socket"))?;
    let links = nl.links().map_err(netlink("listing the VM's interfaces"))?;
    let plan = plan(req, &links)?;

    for lo in links.iter().filter(|l| l.loopback && !l.up) {
        nl.set_up(lo.index, true)
            .map_err(netlink(format!("bringing {} up", lo.name)))?;
    }
    for iface in &plan.interfaces {
        let name = iface.rename.as_deref().unwrap_or(&iface.current_name);
        if iface.rename.is_some() || iface.set_mac.is_some() {
            nl.set_up(iface.index, false).map_err(netlink(format!(
                "taking {} down to rename it / change its MAC",
                iface.current_name
            )))?;
        }
        if iface.rename.is_some() || iface.mtu.is_some() || iface.set_mac.is_some() {
            let change = LinkChange {
                name: iface.rename.clone(),
                mtu: iface.mtu,
                up: None,
                mac: iface.set_mac,
            };
            nl.set_link(iface.index, &change).map_err(netlink(format!(
                "renaming {} to {name} / setting its MTU to {:?} / its MAC to {:?}",
                iface.current_name,
                iface.mtu,
                iface.set_mac.map(|m| m.to_string())
            )))?;
        }
        for cidr in &iface.addresses {
            nl.add_address(iface.index, *cidr).map_err(|source| {
                let hint = match source.errno() {
                    Some(libc::EAFNOSUPPORT) => {
                        " (the guest kernel lacks this address family: CONFIG_IPV6?)"
                    }
                    _ => "",
                };
                NetworkError::Netlink {
                    what: format!("adding {cidr} to {name}{hint}"),
                    source,
                }
            })?;
        }
        nl.set_up(iface.index, true)
            .map_err(netlink(format!("bringing {name} up")))?;
        log::debug!(
            "network interface {name} (index {}): mtu {:?}, addresses {:?}",
            iface.index,
            iface.mtu,
            iface
                .addresses
                .iter()
                .map(Cidr::to_string)
                .collect::<Vec<_>>()
        );
    }
    for route in &plan.routes {
        let dst = route
            .destination
            .map_or_else(|| "default".to_string(), |d| d.to_string());
        let via = route
            .gateway
            .map(|g| format!(" via {g}"))
            .unwrap_or_default();
        nl.add_route(route).map_err(netlink(format!(
            "adding the route {dst}{via} (device index {})",
            route.oif
        )))?;
        log::debug!("route {dst}{via} dev index {}", route.oif);
    }
    if let Some(path) = resolv_conf.filter(|_| !req.resolv_conf.is_empty()) {
        std::fs::write(path, &req.resolv_conf).map_err(|source| NetworkError::Write {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use podvisor_agent_protocol::agent::{Interface, Route};

    use super::*;

    fn link(index: u32, name: &str, mac: Option<[u8; 6]>) -> Link {
        Link {
            index,
            name: name.into(),
            mac: mac.map(MacAddr),
            mtu: 1500,
            up: false,
            loopback: name == "lo",
            ether: mac.is_some(),
            kind: None,
        }
    }

    fn links() -> Vec<Link> {
        vec![
            link(1, "lo", Some([0; 6])),
            link(2, "eth0", Some([2, 0, 0, 0, 0, 1])),
            link(3, "eth1", Some([2, 0, 0, 0, 0, 2])),
        ]
    }

    fn iface(mac: &str, name: &str, addresses: &[&str]) -> Interface {
        Interface {
            mac: mac.into(),
            name: name.into(),
            mtu: 1400,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    fn route(dst: &str, gw: &str, dev: &str) -> Route {
        Route {
            destination: dst.into(),
            gateway: gw.into(),
            device: dev.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_template_clone_adopts_the_requested_mac() {
        let one_nic = vec![
            link(1, "lo", Some([0; 6])),
            link(2, "eth0", Some([2, 0, 0, 0, 0, 9])),
        ];
        let req = ConfigureNetworkRequest {
            interfaces: vec![iface("0a:58:0a:01:00:02", "eth0", &["10.1.0.2/24"])],
            ..Default::default()
        };
        let planned = plan(&req, &one_nic).unwrap();
        assert_eq!(planned.interfaces[0].index, 2);
        assert_eq!(
            planned.interfaces[0].set_mac,
            Some("0a:58:0a:01:00:02".parse().unwrap())
        );
        assert_eq!(planned.interfaces[0].rename, None);
        // With two NICs it is ambiguous: the MAC must match.
        assert!(matches!(
            plan(&req, &links()),
            Err(NetworkError::NoSuchMac(_))
        ));
    }

    #[test]
    fn plans_interfaces_and_orders_routes() {
        let req = ConfigureNetworkRequest {
            interfaces: vec![iface(
                "02:00:00:00:00:02",
                "pod0",
                &["10.1.0.2/24", "fd00::2/64"],
            )],
            routes: vec![
                route("", "10.1.0.1", "pod0"),
                route("10.2.0.0/16", "10.1.0.254", "pod0"),
                route("10.1.0.0/24", "", "pod0"),
                route("", "fd00::1", ""),
            ],
            ..Default::default()
        };
        let plan = plan(&req, &links()).unwrap();
        assert_eq!(
            plan.interfaces,
            vec![PlannedInterface {
                index: 3,
                current_name: "eth1".into(),
                rename: Some("pod0".into()),
                set_mac: None,
                mtu: Some(1400),
                addresses: vec![
                    "10.1.0.2/24".parse().unwrap(),
                    "fd00::2/64".parse().unwrap()
                ],
            }]
        );
        let order: Vec<String> = plan
            .routes
            .iter()
            .map(|r| {
                format!(
                    "{:?} {:?} {}",
                    r.destination.map(|d| d.to_string()),
                    r.gateway,
                    r.oif
                )
            })
            .collect();
        assert_eq!(
            order,
            vec![
                "Some(\"10.1.0.0/24\") None 3",
                "None Some(10.1.0.1) 3",
                "Some(\"10.2.0.0/16\") Some(10.1.0.254) 3",
                "None Some(fd00::1) 3",
            ]
        );
    }

    #[test]
    fn rejects_bad_requests() {
        let one = |i: Interface, routes: Vec<Route>| ConfigureNetworkRequest {
            interfaces: vec![i],
            routes,
            ..Default::default()
        };
        let cases = [
            (
                one(iface("02:00:00:00:00:09", "", &[]), vec![]),
                "no network interface in the VM has MAC 02:00:00:00:00:09",
            ),
            (
                one(iface("02:00:00:00:00:0", "", &[]), vec![]),
                "not a MAC address",
            ),
            (
                one(iface("02:00:00:00:00:01", "", &["10.0.0.1"]), vec![]),
                "not an address/prefix",
            ),
            (
                one(iface("02:00:00:00:00:01", "", &["10.0.0.1/40"]), vec![]),
                "longer than 32",
            ),
            (
                one(iface("02:00:00:00:00:01", "a/b", &[]), vec![]),
                "not a valid interface name",
            ),
            (
                one(iface("02:00:00:00:00:01", "eth1", &[]), vec![]),
                "already has that name",
            ),
            (
                one(
                    iface("02:00:00:00:00:01", "", &[]),
                    vec![route("", "10.0.0.1", "eth7")],
                ),
                "device \"eth7\"",
            ),
            (
                one(
                    iface("02:00:00:00:00:01", "", &[]),
                    vec![route("10.0.0.0/8", "fd00::1", "")],
                ),
                "mixes IPv4 and IPv6",
            ),
            (
                one(
                    iface("02:00:00:00:00:01", "", &[]),
                    vec![route("", "gw", "")],
                ),
                "not an IP address",
            ),
        ];
        for (req, want) in cases {
            let err = plan(&req, &links()).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{err} does not say {want:?}"
            );
        }
        let err: RpcError = plan(&one(iface("02:00:00:00:00:09", "", &[]), vec![]), &links())
            .unwrap_err()
            .into();
        assert_eq!(err.code(), ttrpc::Code::NOT_FOUND);
        let err: RpcError = plan(&one(iface("x", "", &[]), vec![]), &links())
            .unwrap_err()
            .into();
        assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT);
    }
}
