//! A small synchronous rtnetlink client (feature `rtnl`): what the shim's pod network
//! wiring and the agent's ConfigureNetwork need, and no async runtime.
//!
//! A [`Rtnl`] socket talks to the network namespace of the thread that opened it (the
//! kernel binds a netlink socket to its creator's namespace), so code that works in another
//! namespace opens its socket after `setns` in a dedicated thread.
//!
//! Messages are built and parsed with `netlink-packet-route`; this module adds the
//! request/ack/dump loop ([`Rtnl::request`]) and typed helpers for links, addresses,
//! routes, the `ingress` qdisc and the u32 + mirred "redirect everything" filter of the
//! tc-redirect model. Shared value types ([`Cidr`], [`MacAddr`]) parse and print the
//! strings the agent protocol carries.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::str::FromStr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionOption, TcActionType, TcAttribute, TcFilterU32Option,
    TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector,
    TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The main routing table.
pub const RT_TABLE_MAIN: u8 = 254;
/// `ETH_P_ALL` in network byte order, as tc's `protocol all`: libc's `c_int` holds a 16-bit
/// ethertype (0x0003), the low two of its big-endian bytes.
const ETH_P_ALL_BE: u16 = {
    let be = libc::ETH_P_ALL.to_be_bytes();
    u16::from_ne_bytes([be[2], be[3]])
};
/// Priority of the redirect filter (tc's `prio`).
const REDIRECT_PRIO: u32 = 1;

/// A failed netlink exchange.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused the request (errno).
    #[error("{0}")]
    Kernel(#[source] io::Error),
    #[error("malformed netlink answer: {0}")]
    Decode(String),
}

impl RtnlError {
    /// The errno the kernel answered with, if it answered with one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

pub type RtnlResult<T> = Result<T, RtnlError>;

/// An address with its prefix length: `10.1.2.3/24`, `fd00::2/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn new(ip: IpAddr, prefix: u8) -> Result<Self, String> {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!(
                "prefix /{prefix} is longer than {max} bits for {ip}"
            ));
        }
        Ok(Self { ip, prefix })
    }

    fn family(&self) -> AddressFamily {
        family_of(&self.ip)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an address/prefix (CIDR) like 10.0.0.2/24"))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{s:?}: {prefix:?} is not a prefix length"))?;
        Self::new(ip, prefix).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// An Ethernet address, printed and parsed as `02:00:0a:00:00:02`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a MAC address like 02:00:0a:00:00:02");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A network interface as a link dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware address of an Ethernet-like link.
    pub mac: Option<MacAddr>,
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
    pub loopback: bool,
    /// Ethernet framing (ARPHRD_ETHER): veth, tap, virtio-net, dummy...
    pub ether: bool,
    /// The rtnl link kind (`veth`, `tun`, `dummy`...) when the kernel reports one.
    pub kind: Option<String>,
}

/// An address assigned to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub cidr: Cidr,
    /// RT_SCOPE_* of the address (253 = link: e.g. IPv6 fe80::/64).
    pub scope: u8,
}

/// A route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// None: the default route of its family.
    pub destination: Option<Cidr>,
    pub gateway: Option<IpAddr>,
    /// Preferred source address.
    pub source: Option<IpAddr>,
    /// Output interface index.
    pub oif: Option<u32>,
    /// RT_SCOPE_* (0 universe, 253 link, 254 host).
    pub scope: u8,
    /// Installed by the kernel for an address's prefix (`proto kernel`).
    pub kernel: bool,
    /// IPv6 rather than IPv4.
    pub ipv6: bool,
}

/// A route to add (the destination family decides IPv4 or IPv6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRoute {
    /// None: a default route (its family is the gateway's or the source's; IPv4 otherwise).
    pub destination: Option<Cidr>,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub oif: u32,
    /// RT_SCOPE_*.
    pub scope: u8,
}

/// Changes to one link; `None` leaves a property alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkChange {
    pub name: Option<String>,
    pub mtu: Option<u32>,
    pub up: Option<bool>,
    /// A new hardware address.
    pub mac: Option<MacAddr>,
}

/// A link index as tc's `tcm_ifindex`, a C `int`: the kernel's ifindex is a positive `int`
/// that rtnetlink's link messages carry as `u32`, so this is the same bits.
fn tc_ifindex(index: u32) -> i32 {
    index.cast_signed()
}

fn family_of(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn ip_of(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// A netlink route socket in the namespace of the thread that opened it.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> RtnlResult<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
        socket.bind_auto().map_err(RtnlError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(RtnlError::Socket)?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends one request and collects the answers: the messages of a dump, nothing for an
    /// acknowledged change. `flags` are added to NLM_F_REQUEST (+ NLM_F_ACK unless dumping).
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> RtnlResult<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0).map_err(RtnlError::Socket)?;

        let mut answers = Vec::new();
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(RtnlError::Socket)?;
            let mut offset = 0;
            while offset < n {
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                        .map_err(|e| RtnlError::Decode(e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(RtnlError::Decode("zero-length message".into()));
                }
                offset += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(err) => {
                        return match err.code {
                            None => Ok(answers),
                            Some(_) => Err(RtnlError::Kernel(err.to_io())),
                        };
                    }
                    // Noop/Overrun; a non-dump answer is followed by its ack.
                    _ => {}
                }
            }
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> RtnlResult<Vec<Link>> {
        let answers = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(&l)),
                _ => None,
            })
            .collect())
    }

    /// The link named `name`, if any.
    pub fn link_by_name(&mut self, name: &str) -> RtnlResult<Option<Link>> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    /// Every address of the namespace (both families).
    pub fn addresses(&mut self) -> RtnlResult<Vec<Address>> {
        let answers = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => parse_address(&a),
                _ => None,
            })
            .collect())
    }

    /// The unicast routes of the main table, both families.
    pub fn routes(&mut self) -> RtnlResult<Vec<Route>> {
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let answers = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP)?;
            routes.extend(answers.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse_route(&r),
                _ => None,
            }));
        }
        Ok(routes)
    }

    /// Applies `change` to link `index` (a rename needs the link down).
    pub fn set_link(&mut self, index: u32, change: &LinkChange) -> RtnlResult<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if let Some(up) = change.up {
            msg.header.change_mask = LinkFlags::Up;
            if up {
                msg.header.flags = LinkFlags::Up;
            }
        }
        if let Some(name) = &change.name {
            msg.attributes.push(LinkAttribute::IfName(name.clone()));
        }
        if let Some(mtu) = change.mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = change.mac {
            msg.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        }
        self.request(RouteNetlinkMessage::SetLink(msg), 0).map(drop)
    }

    /// Sets link `index` administratively up or down.
    pub fn set_up(&mut self, index: u32, up: bool) -> RtnlResult<()> {
        self.set_link(
            index,
            &LinkChange {
                up: Some(up),
                ..Default::default()
            },
        )
    }

    /// Deletes link `index` (a veth takes its peer along).
    pub fn del_link(&mut self, index: u32) -> RtnlResult<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(msg), 0).map(drop)
    }

    /// Creates a veth pair `name` ↔ `peer`, the peer in the namespace `peer_netns` (this
    /// one when None), the peer with the hardware address `peer_mac` if given.
    pub fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_netns: Option<BorrowedFd<'_>>,
        peer_mac: Option<MacAddr>,
    ) -> RtnlResult<()> {
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(peer.to_string()));
        if let Some(fd) = peer_netns {
            peer_msg
                .attributes
                .push(LinkAttribute::NetNsFd(fd.as_raw_fd()));
        }
        if let Some(mac) = peer_mac {
            peer_msg
                .attributes
                .push(LinkAttribute::Address(mac.0.to_vec()));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
    }

    /// Adds (or replaces) an address on link `index`.
    pub fn add_address(&mut self, index: u32, cidr: Cidr) -> RtnlResult<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = cidr.family();
        msg.header.prefix_len = cidr.prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(cidr.ip));
        msg.attributes.push(AddressAttribute::Address(cidr.ip));
        if let IpAddr::V4(ip) = cidr.ip {
            if cidr.prefix < 31 {
                let host_bits = u32::MAX.checked_shr(u32::from(cidr.prefix)).unwrap_or(0);
                let broadcast = u32::from(ip) | host_bits;
                msg.attributes
                    .push(AddressAttribute::Broadcast(broadcast.into()));
            }
        }
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Adds (or replaces) a route of the main table.
    pub fn add_route(&mut self, route: &NewRoute) -> RtnlResult<()> {
        let family = route
            .destination
            .map(|d| family_of(&d.ip))
            .or(route.gateway.as_ref().map(family_of))
            .or(route.source.as_ref().map(family_of))
            .unwrap_or(AddressFamily::Inet);
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.table = RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::from(route.scope);
        msg.header.kind = RouteType::Unicast;
        if let Some(dst) = route.destination {
            msg.header.destination_prefix_length = dst.prefix;
            msg.attributes
                .push(RouteAttribute::Destination(dst.ip.into()));
        }
        if let Some(gw) = route.gateway {
            msg.attributes.push(RouteAttribute::Gateway(gw.into()));
        }
        if let Some(src) = route.source {
            msg.attributes.push(RouteAttribute::PrefSource(src.into()));
        }
        msg.attributes.push(RouteAttribute::Oif(route.oif));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Adds the `ingress` qdisc (handle ffff:) to link `index`.
    pub fn add_ingress_qdisc(&mut self, index: u32) -> RtnlResult<()> {
        let mut msg = TcMessage::with_index(tc_ifindex(index));
        msg.header.handle = TcHandle::from(0xffff_0000);
        msg.header.parent = TcHandle::INGRESS;
        msg.attributes.push(TcAttribute::Kind("ingress".into()));
        msg.attributes.push(TcAttribute::Options(Vec::new()));
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Deletes link `index`'s `ingress` qdisc, and with it its filters.
    pub fn del_ingress_qdisc(&mut self, index: u32) -> RtnlResult<()> {
        let mut msg = TcMessage::with_index(tc_ifindex(index));
        msg.header.handle = TcHandle::from(0xffff_0000);
        msg.header.parent = TcHandle::INGRESS;
        self.request(RouteNetlinkMessage::DelQueueDiscipline(msg), 0)
            .map(drop)
    }

    /// Whether link `index` has an `ingress` qdisc.
    pub fn has_ingress_qdisc(&mut self, index: u32) -> RtnlResult<bool> {
        let answers = self.request(
            RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers.iter().any(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(q) => {
                q.header.index == tc_ifindex(index)
                    && q.attributes.contains(&TcAttribute::Kind("ingress".into()))
            }
            _ => false,
        }))
    }

    /// On link `from`'s ingress qdisc: a u32 filter matching every frame (protocol all,
    /// one key with mask 0) whose action redirects it to the egress of link `to` — tc's
    /// `filter add dev FROM parent ffff: protocol all u32 match u8 0 0 action mirred egress
    /// redirect dev TO`.
    pub fn add_redirect_filter(&mut self, from: u32, to: u32) -> RtnlResult<()> {
        let mut msg = TcMessage::with_index(tc_ifindex(from));
        msg.header.parent = TcHandle::from(0xffff_0000);
        msg.header.info = (REDIRECT_PRIO << 16) | u32::from(ETH_P_ALL_BE);
        msg.attributes.push(TcAttribute::Kind("u32".into()));

        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        selector.nkeys = 1;
        selector.keys = vec![TcU32Key::default()];
        let mut mirror = TcMirror::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.tab = 1;
        action.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(
                netlink_packet_route::tc::TcActionMirrorOption::Parms(mirror),
            )]),
        ];
        msg.attributes.push(TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]));
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// The mirred redirect targets (ifindex) of the filters on link `index`'s ingress.
    pub fn redirect_targets(&mut self, index: u32) -> RtnlResult<Vec<u32>> {
        let mut msg = TcMessage::with_index(tc_ifindex(index));
        msg.header.parent = TcHandle::from(0xffff_0000);
        let answers = self.request(RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_DUMP)?;
        let mut targets = Vec::new();
        for m in answers {
            let RouteNetlinkMessage::NewTrafficFilter(f) = m else {
                continue;
            };
            for attr in &f.attributes {
                let TcAttribute::Options(opts) = attr else {
                    continue;
                };
                for opt in opts {
                    let TcOption::U32(TcFilterU32Option::Action(actions)) = opt else {
                        continue;
                    };
                    for a in actions {
                        for aa in &a.attributes {
                            let TcActionAttribute::Options(aopts) = aa else {
                                continue;
                            };
                            for o in aopts {
                                if let TcActionOption::Mirror(
                                    netlink_packet_route::tc::TcActionMirrorOption::Parms(p),
                                ) = o
                                {
                                    targets.push(p.ifindex);
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(targets)
    }
}

fn parse_link(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: l.header.flags.contains(LinkFlags::Up),
        loopback: l.header.flags.contains(LinkFlags::Loopback)
            || l.header.link_layer_type == LinkLayerType::Loopback,
        ether: l.header.link_layer_type == LinkLayerType::Ether,
        kind: None,
    };
    for attr in &l.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Address(a) if a.len() == 6 => {
                let mut mac = [0; 6];
                mac.copy_from_slice(a);
                link.mac = Some(MacAddr(mac));
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn parse_address(a: &AddressMessage) -> Option<Address> {
    let mut local = None;
    let mut address = None;
    for attr in &a.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on a
    // point-to-point link); IPv6 sends only IFA_ADDRESS.
    let ip = local.or(address)?;
    Some(Address {
        index: a.header.index,
        cidr: Cidr {
            ip,
            prefix: a.header.prefix_len,
        },
        scope: u8::from(a.header.scope),
    })
}

fn parse_route(r: &RouteMessage) -> Option<Route> {
    let mut table = u32::from(r.header.table);
    let mut route = Route {
        destination: None,
        gateway: None,
        source: None,
        oif: None,
        scope: u8::from(r.header.scope),
        kernel: r.header.protocol == RouteProtocol::Kernel,
        ipv6: r.header.address_family == AddressFamily::Inet6,
    };
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => {
                route.destination = ip_of(d).map(|ip| Cidr {
                    ip,
                    prefix: r.header.destination_prefix_length,
                });
            }
            RouteAttribute::Gateway(g) => route.gateway = ip_of(g),
            RouteAttribute::PrefSource(s) => route.source = ip_of(s),
            RouteAttribute::Oif(o) => route.oif = Some(*o),
            _ => {}
        }
    }
    if table != u32::from(RT_TABLE_MAIN) || r.header.kind != RouteType::Unicast {
        return None;
    }
    Some(route)
}

/// RT_SCOPE_LINK.
pub const SCOPE_LINK: u8 = 253;
/// RT_SCOPE_UNIVERSE.
pub const SCOPE_UNIVERSE: u8 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_cidrs() {
        let c: Cidr = "10.1.2.3/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.2.3/24");
        assert_eq!("fd00::2/64".parse::<Cidr>().unwrap().prefix, 64);
        for bad in [
            "10.1.2.3",
            "10.1.2.3/33",
            "fd00::1/129",
            "x/8",
            "10.0.0.1/a",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_and_prints_macs() {
        let m: MacAddr = "02:00:0A:00:00:ff".parse().unwrap();
        assert_eq!(m.0, [2, 0, 10, 0, 0, 255]);
        assert_eq!(m.to_string(), "02:00:0a:00:00:ff");
        for bad in [
            "02:00:0a:00:00",
            "02:00:0a:00:00:ff:01",
            "2:0:a:0:0:ff",
            "zz:00:0a:00:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
