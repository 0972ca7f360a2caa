//! The node's uplinks and addresses: which interfaces carry traffic from
//! outside (by default those holding the default routes), the addresses
//! NodePorts are served on (both followed as links, routes and addresses
//! change), and the SNAT port range kept free of the node's own sockets.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use rtnetlink::{
    constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
    },
    packet_core::{
        parse_i32, parse_u32, Emitable as _, NetlinkBuffer, NlasIterator, Parseable as _,
        NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP, NLM_F_REQUEST,
    },
    packet_route::{
        route::{RouteAttribute, RouteHeader, RouteMessage, RouteType},
        AddressFamily,
    },
    sys::{
        protocols::NETLINK_ROUTE, AsyncSocket as _, AsyncSocketExt as _, Socket, SocketAddr,
        TokioSocket,
    },
};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listing the node's addresses")]
    Addresses(#[source] nix::Error),
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening a netlink socket for link, route and address events")]
    Netlink(#[source] std::io::Error),
    #[error("listing the routes (netlink)")]
    RouteDump(#[source] std::io::Error),
    #[error("SNAT port range {min}-{max} overlaps the node's ephemeral ports {eph_min}-{eph_max} (net.ipv4.ip_local_port_range)")]
    RangeOverlapsEphemeral {
        min: u16,
        max: u16,
        eph_min: u16,
        eph_max: u16,
    },
}

/// An interface traffic from outside arrives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub ifindex: u32,
    pub name: String,
}

/// The routing table `local` (255): the node's own and broadcast
/// addresses, never a way out.
const RT_TABLE_LOCAL: u32 = 255;
const RT_TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// Names of the interfaces holding a default route (`0.0.0.0/0` or `::/0`)
/// in this network namespace, either family, without duplicates: those of
/// the main table first, then those of the other tables in table order
/// (each by metric, IPv4 before IPv6), so the first one is the interface
/// the node itself leaves by.
///
/// Every table but `local` counts, not only `main`: policy routing
/// (source-based routing of a second NIC, a cloud's per-ENI tables, a
/// VRF's table) puts the default route of an interface traffic from
/// outside arrives on in a table of its own. Whether an `ip rule` sends
/// lookups there is not asked: a VRF's table is reached by the `l3mdev`
/// rule, which names no table, and rules would be one more thing to
/// follow. Only unicast routes count: the `unreachable`/`blackhole`/
/// `prohibit` defaults that close policy tables and VRFs have no device.
///
/// A route through a nexthop object (`ip route add default nhid 10`, as
/// FRR installs them) names only the object's id once
/// `net.ipv4.nexthop_compat_mode` is 0: the objects are dumped too and the
/// id resolved to the devices of the object, or of every member of a
/// group (ECMP).
pub fn default_route_interfaces() -> Result<Vec<String>, UplinkError> {
    let mut routes = dump_routes(AddressFamily::Inet)?;
    routes.extend(dump_routes(AddressFamily::Inet6)?);
    let uses_nexthop_objects = routes.iter().any(|r| {
        r.attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::NhId(_)))
    });
    let nexthops = if uses_nexthop_objects {
        dump_nexthops()?
    } else {
        HashMap::new()
    };
    Ok(default_route_ifindexes(&routes, &nexthops)
        .into_iter()
        // An interface gone since the dump is not an uplink any more.
        .filter_map(|ifindex| nix::net::if_::if_indextoname(ifindex).ok())
        .filter_map(|name| name.into_string().ok())
        .collect())
}

// Nexthop objects (linux/rtnetlink.h, linux/nexthop.h): netlink-packet-route
// has no messages for them.
const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;
const RTNLGRP_NEXTHOP: u32 = 32;
/// `struct nhmsg`: family, scope, protocol, reserved, flags (u32).
const NHMSG_LEN: usize = 8;
const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_OIF: u16 = 5;
/// `struct nexthop_grp`: id (u32), weight, weight_high, reserved (u16).
const NEXTHOP_GRP_LEN: usize = 8;

/// A nexthop object as far as uplinks go: its device, or the members of a
/// group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct NextHop {
    id: u32,
    /// `NHA_OIF`; none for a group or a blackhole.
    oif: Option<u32>,
    /// `NHA_GROUP`: the member ids.
    group: Vec<u32>,
}

/// A `RTM_NEWNEXTHOP` payload (`nhmsg` and attributes), or `None` when it
/// is malformed or has no id.
fn parse_nexthop(payload: &[u8]) -> Option<NextHop> {
    let mut nexthop = NextHop::default();
    let mut id = None;
    for nla in NlasIterator::new(payload.get(NHMSG_LEN..)?) {
        let nla = nla.ok()?;
        let value = nla.value();
        match nla.kind() {
            NHA_ID => id = Some(parse_u32(value).ok()?),
            NHA_OIF => nexthop.oif = Some(parse_u32(value).ok()?),
            NHA_GROUP => {
                nexthop.group = value
                    .chunks_exact(NEXTHOP_GRP_LEN)
                    .filter_map(|member| parse_u32(&member[..4]).ok())
                    .collect();
            }
            _ => {}
        }
    }
    nexthop.id = id?;
    Some(nexthop)
}

/// The devices nexthop `id` sends through: its own, or its members' for a
/// group (groups hold plain nexthops only; one more level is not
/// followed).
fn nexthop_devices(id: u32, nexthops: &HashMap<u32, NextHop>) -> Vec<u32> {
    let Some(nexthop) = nexthops.get(&id) else {
        return Vec::new();
    };
    if nexthop.group.is_empty() {
        return nexthop.oif.into_iter().collect();
    }
    nexthop
        .group
        .iter()
        .filter_map(|member| nexthops.get(member)?.oif)
        .collect()
}

/// Every nexthop object of the namespace (`RTM_GETNEXTHOP` dump), by id;
/// none on a kernel without them (before 5.3).
fn dump_nexthops() -> Result<HashMap<u32, NextHop>, UplinkError> {
    let payloads = match dump(RTM_GETNEXTHOP, RTM_NEWNEXTHOP, &[0; NHMSG_LEN]) {
        Ok(payloads) => payloads,
        Err(UplinkError::RouteDump(e))
            if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) =>
        {
            return Ok(HashMap::new());
        }
        Err(e) => return Err(e),
    };
    Ok(payloads
        .iter()
        .filter_map(|p| parse_nexthop(p))
        .map(|nh| (nh.id, nh))
        .collect())
}

/// The routes of one family in every table (`RTM_GETROUTE` dump), as
/// `ip route show table all` lists them.
fn dump_routes(family: AddressFamily) -> Result<Vec<RouteMessage>, UplinkError> {
    let mut query = RouteMessage::default();
    query.header.address_family = family;
    let mut header = vec![0; query.buffer_len()];
    query.emit(&mut header);
    dump(RTM_GETROUTE, RTM_NEWROUTE, &header)?
        .iter()
        .map(|payload| {
            RouteMessage::parse(payload.as_slice())
                .map_err(|e| UplinkError::RouteDump(std::io::Error::other(e)))
        })
        .collect()
}

/// A dump request of `request` type with `header` (the family's fixed
/// header): the payloads of the `reply` messages answering it.
fn dump(request: u16, reply: u16, header: &[u8]) -> Result<Vec<Vec<u8>>, UplinkError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(UplinkError::RouteDump)?;
    socket.bind_auto().map_err(UplinkError::RouteDump)?;
    let mut message = vec![0; NETLINK_HEADER_LEN + header.len()];
    {
        let mut buf = NetlinkBuffer::new(&mut message[..]);
        buf.set_length((NETLINK_HEADER_LEN + header.len()) as u32);
        buf.set_message_type(request);
        buf.set_flags(NLM_F_REQUEST | NLM_F_DUMP);
        buf.set_sequence_number(1);
        buf.payload_mut().copy_from_slice(header);
    }
    socket.send(&message, 0).map_err(UplinkError::RouteDump)?;
    let mut payloads = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full().map_err(UplinkError::RouteDump)?;
        for (kind, payload) in messages(&datagram) {
            match kind {
                NLMSG_DONE => return Ok(payloads),
                NLMSG_ERROR => {
                    // `struct nlmsgerr`: a negative errno first.
                    let code = payload.get(..4).and_then(|c| parse_i32(c).ok());
                    if let Some(code) = code.filter(|c| *c != 0) {
                        return Err(UplinkError::RouteDump(std::io::Error::from_raw_os_error(
                            -code,
                        )));
                    }
                }
                kind if kind == reply => payloads.push(payload.to_vec()),
                _ => {}
            }
        }
    }
}

const NETLINK_HEADER_LEN: usize = 16;

/// The netlink messages of a datagram: (type, payload). A malformed one
/// ends the walk.
fn messages(datagram: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        let buf = NetlinkBuffer::new_checked(rest).ok()?;
        let length = buf.length() as usize;
        let item = (buf.message_type(), buf.payload());
        // Messages are 4-byte aligned within a datagram.
        rest = rest.get(((length + 3) & !3).min(rest.len())..)?;
        Some(item)
    })
}

/// The interfaces (indexes) of the default routes among `routes`, in the
/// order [`default_route_interfaces`] gives: the selection, apart from
/// reading the kernel's tables. `nexthops` resolves the routes through
/// nexthop objects.
fn default_route_ifindexes(routes: &[RouteMessage], nexthops: &HashMap<u32, NextHop>) -> Vec<u32> {
    let mut defaults: Vec<(u32, u8, u32, Vec<u32>)> = routes
        .iter()
        .filter(|r| r.header.destination_prefix_length == 0 && r.header.kind == RouteType::Unicast)
        .filter_map(|r| {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            if table == RT_TABLE_LOCAL {
                return None;
            }
            let mut devices = Vec::new();
            let mut metric = 0;
            for attribute in &r.attributes {
                match attribute {
                    RouteAttribute::Oif(ifindex) => devices.push(*ifindex),
                    // ECMP: every next hop's interface.
                    RouteAttribute::MultiPath(hops) => {
                        devices.extend(hops.iter().map(|h| h.interface_index));
                    }
                    // A nexthop object, or a group of them (ECMP).
                    RouteAttribute::NhId(id) => devices.extend(nexthop_devices(*id, nexthops)),
                    RouteAttribute::Priority(p) => metric = *p,
                    _ => {}
                }
            }
            let family = u8::from(r.header.address_family == AddressFamily::Inet6);
            Some((table, family, metric, devices))
        })
        .collect();
    // Main first, then by table; stable, so the dump's order breaks ties.
    defaults.sort_by_key(|(table, family, metric, _)| {
        (*table != RT_TABLE_MAIN, *table, *metric, *family)
    });
    let mut ifindexes = Vec::new();
    for ifindex in defaults.into_iter().flat_map(|(.., devices)| devices) {
        if ifindex != 0 && !ifindexes.contains(&ifindex) {
            ifindexes.push(ifindex);
        }
    }
    ifindexes
}

/// The interfaces named that exist now, with their indexes, and the names
/// of those that do not (yet).
pub fn present(names: &[String]) -> (Vec<Uplink>, Vec<String>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for name in names {
        match nix::net::if_::if_nametoindex(name.as_str()) {
            Ok(ifindex) => found.push(Uplink {
                ifindex,
                name: name.clone(),
            }),
            Err(_) => missing.push(name.clone()),
        }
    }
    (found, missing)
}

/// Whether `name` is a virtual interface (no device behind it in sysfs:
/// veth, bridge, dummy), as opposed to a NIC with a driver.
pub fn is_virtual(name: &str) -> bool {
    !Path::new("/sys/class/net")
        .join(name)
        .join("device")
        .exists()
}

/// Whether the node has an IPv4 and an IPv6 address other than loopback
/// and link-local ones: the families it can reach pods and services in.
pub fn address_families() -> Result<(bool, bool), UplinkError> {
    let (mut ipv4, mut ipv6) = (false, false);
    for ifaddr in nix::ifaddrs::getifaddrs().map_err(UplinkError::Addresses)? {
        let Some(addr) = ifaddr.address.as_ref() else {
            continue;
        };
        if let Some(v4) = addr.as_sockaddr_in() {
            ipv4 |= !v4.ip().is_loopback() && !v4.ip().is_link_local();
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            ipv6 |= !v6.ip().is_loopback() && !v6.ip().is_unicast_link_local();
        }
    }
    Ok((ipv4, ipv6))
}

/// Every IPv4 address of the node, with the interface holding it.
pub fn addresses() -> Result<Vec<(String, Ipv4Addr)>, UplinkError> {
    addresses_of(|addr| Some(addr.as_sockaddr_in()?.ip()))
}

/// Every global IPv6 address of the node (no loopback, no link-local),
/// with the interface holding it.
pub fn addresses6() -> Result<Vec<(String, Ipv6Addr)>, UplinkError> {
    addresses_of(|addr| {
        let ip = addr.as_sockaddr_in6()?.ip();
        (!ip.is_loopback() && !ip.is_unicast_link_local()).then_some(ip)
    })
}

/// The node's addresses `pick` takes (those of one family), with the
/// interface holding each.
fn addresses_of<A>(
    pick: impl Fn(&nix::sys::socket::SockaddrStorage) -> Option<A>,
) -> Result<Vec<(String, A)>, UplinkError> {
    Ok(nix::ifaddrs::getifaddrs()
        .map_err(UplinkError::Addresses)?
        .filter_map(|ifaddr| {
            let ip = pick(ifaddr.address.as_ref()?)?;
            Some((ifaddr.interface_name, ip))
        })
        .collect())
}

// Message types of linux/rtnetlink.h that netlink-packet-route keeps private.
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;

/// Whether a notification of this type may change the uplinks or the
/// node's addresses.
fn is_node_network_change(message_type: u16) -> bool {
    matches!(
        message_type,
        RTM_NEWLINK
            | RTM_DELLINK
            | RTM_NEWADDR
            | RTM_DELADDR
            | RTM_NEWROUTE
            | RTM_DELROUTE
            | RTM_NEWNEXTHOP
            | RTM_DELNEXTHOP
    )
}

/// A notice each time an interface, a route (either family, any table), a
/// nexthop object or an address of this network namespace is added,
/// changed or removed: the receiver reads the uplinks
/// ([`default_route_interfaces`], [`present`]) and addresses
/// ([`addresses`], [`addresses6`]) again. Notices that arrive while one is
/// pending are merged into it.
///
/// Nexthop notifications count because replacing an object or a group's
/// members changes the devices of the routes using it without a route
/// notification, and deleting one removes its routes silently. The
/// messages are only told apart by type, never decoded: rtnetlink's
/// connection cannot decode nexthop messages.
pub fn watch_node_network() -> Result<mpsc::Receiver<()>, UplinkError> {
    let mut socket = TokioSocket::new(NETLINK_ROUTE).map_err(UplinkError::Netlink)?;
    socket
        .socket_mut()
        .bind(&SocketAddr::new(
            0,
            RTMGRP_IPV4_IFADDR
                | RTMGRP_IPV6_IFADDR
                | RTMGRP_IPV4_ROUTE
                | RTMGRP_IPV6_ROUTE
                | RTMGRP_LINK,
        ))
        .map_err(UplinkError::Netlink)?;
    // Kernels without nexthop objects (before 5.3) have no such group.
    if let Err(e) = socket.socket_ref().add_membership(RTNLGRP_NEXTHOP) {
        log::info!("not following nexthop objects: {e}");
    }
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let changed = match socket.recv_from_full().await {
                Ok((datagram, _)) => {
                    messages(&datagram).any(|(kind, _)| is_node_network_change(kind))
                }
                // The socket's buffer overflowed: notifications were lost,
                // so everything is read again.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => true,
                Err(e) => {
                    log::error!("netlink link, route and address notifications ended: {e}");
                    return;
                }
            };
            if changed {
                if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Makes sure no socket of the node gets a port of `min..=max` on its own:
/// the range must lie outside the ephemeral range, and is also added to
/// `ip_local_reserved_ports` so widening the ephemeral range later does
/// not hand them out. (An explicit bind() to one of them is the
/// operator's choice and is not prevented.)
pub fn reserve_snat_ports(min: u16, max: u16) -> Result<(), UplinkError> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|source| UplinkError::Read {
            path: path.into(),
            source,
        })
    };
    let range = read(PORT_RANGE)?;
    let mut it = range
        .split_whitespace()
        .filter_map(|v| v.parse::<u16>().ok());
    if let (Some(eph_min), Some(eph_max)) = (it.next(), it.next()) {
        if min <= eph_max && eph_min <= max {
            return Err(UplinkError::RangeOverlapsEphemeral {
                min,
                max,
                eph_min,
                eph_max,
            });
        }
    }
    if !Path::new(RESERVED_PORTS).exists() {
        return Ok(());
    }
    let reserved = read(RESERVED_PORTS)?;
    let ours = format!("{min}-{max}");
    if reserved.split(',').any(|r| r.trim() == ours) {
        return Ok(());
    }
    let value = match reserved.trim() {
        "" => ours,
        existing => format!("{existing},{ours}"),
    };
    std::fs::write(RESERVED_PORTS, value).map_err(|source| UplinkError::Write {
        path: RESERVED_PORTS.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use rtnetlink::packet_route::route::RouteNextHop;

    /// A route as a dump gives it: `dst/len` in `table`, of `kind`, through
    /// `oif` (0: none) at `metric`.
    fn route(
        family: AddressFamily,
        len: u8,
        table: u32,
        kind: RouteType,
        oif: u32,
        metric: u32,
    ) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.address_family = family;
        r.header.destination_prefix_length = len;
        r.header.table = u8::try_from(table).unwrap_or(252);
        r.header.kind = kind;
        r.attributes.push(RouteAttribute::Table(table));
        r.attributes.push(RouteAttribute::Priority(metric));
        if oif != 0 {
            r.attributes.push(RouteAttribute::Oif(oif));
        }
        r
    }

    fn default4(table: u32, oif: u32, metric: u32) -> RouteMessage {
        route(
            AddressFamily::Inet,
            0,
            table,
            RouteType::Unicast,
            oif,
            metric,
        )
    }

    fn default6(table: u32, oif: u32, metric: u32) -> RouteMessage {
        route(
            AddressFamily::Inet6,
            0,
            table,
            RouteType::Unicast,
            oif,
            metric,
        )
    }

    #[test]
    fn an_ipv6_default_route_makes_an_uplink_on_an_ipv6_only_node() {
        let routes = [
            route(
                AddressFamily::Inet6,
                64,
                RT_TABLE_MAIN,
                RouteType::Unicast,
                3,
                256,
            ),
            default6(RT_TABLE_MAIN, 2, 1024),
        ];
        assert_eq!(default_route_ifindexes(&routes, &HashMap::new()), [2]);
    }

    #[test]
    fn ipv4_and_ipv6_default_routes_both_count_once_each_interface() {
        let routes = [
            default4(RT_TABLE_MAIN, 2, 0),
            default6(RT_TABLE_MAIN, 2, 1024),
            default6(RT_TABLE_MAIN, 4, 1024),
        ];
        assert_eq!(default_route_ifindexes(&routes, &HashMap::new()), [2, 4]);
    }

    #[test]
    fn default_routes_of_policy_routing_tables_count_after_the_main_table() {
        let routes = [
            // A second NIC's source-based table, dumped first.
            default4(100, 5, 0),
            default4(RT_TABLE_MAIN, 2, 100),
            default6(1000, 6, 0),
            // The `default` table (253), consulted by the last rule.
            default4(253, 7, 0),
        ];
        assert_eq!(
            default_route_ifindexes(&routes, &HashMap::new()),
            [2, 5, 7, 6]
        );
    }

    #[test]
    fn lower_metric_default_routes_come_first() {
        let routes = [
            default4(RT_TABLE_MAIN, 3, 200),
            default4(RT_TABLE_MAIN, 2, 100),
        ];
        assert_eq!(default_route_ifindexes(&routes, &HashMap::new()), [2, 3]);
    }

    #[test]
    fn routes_other_than_unicast_defaults_outside_the_local_table_do_not_count() {
        let routes = [
            // Not a default route.
            route(
                AddressFamily::Inet,
                24,
                RT_TABLE_MAIN,
                RouteType::Unicast,
                3,
                0,
            ),
            // The `unreachable default` closing a VRF's table: no device.
            route(
                AddressFamily::Inet,
                0,
                10,
                RouteType::Unreachable,
                0,
                4278198272,
            ),
            route(AddressFamily::Inet6, 0, 10, RouteType::BlackHole, 0, 0),
            // A `local default dev lo` (a proxy's TPROXY table).
            route(AddressFamily::Inet, 0, 2004, RouteType::Local, 1, 0),
            // Anything in the `local` table.
            default4(RT_TABLE_LOCAL, 8, 0),
        ];
        assert_eq!(
            default_route_ifindexes(&routes, &HashMap::new()),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn every_next_hop_of_an_ecmp_default_route_is_an_uplink() {
        let mut ecmp = default4(RT_TABLE_MAIN, 0, 0);
        ecmp.attributes.push(RouteAttribute::MultiPath(
            [3, 2]
                .map(|interface_index| {
                    let mut hop = RouteNextHop::default();
                    hop.interface_index = interface_index;
                    hop
                })
                .to_vec(),
        ));
        assert_eq!(default_route_ifindexes(&[ecmp], &HashMap::new()), [3, 2]);
    }

    #[test]
    fn table_ids_above_255_are_read_from_the_table_attribute() {
        // The header's u8 says 252 (RT_TABLE_COMPAT); RTA_TABLE has the id.
        let routes = [default4(1_000_000, 9, 0), default4(RT_TABLE_MAIN, 2, 0)];
        assert_eq!(default_route_ifindexes(&routes, &HashMap::new()), [2, 9]);
    }

    /// A netlink attribute: length, type, value, padded to 4 bytes.
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u16::try_from(4 + value.len()).unwrap().to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    /// A `RTM_NEWNEXTHOP` payload: `nhmsg` (AF_INET) and `attributes`.
    fn nhmsg(attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![2, 0, 4, 0, 0, 0, 0, 0];
        for a in attributes {
            out.extend_from_slice(a);
        }
        out
    }

    fn group(members: &[u32]) -> Vec<u8> {
        members
            .iter()
            .flat_map(|id| {
                let mut entry = id.to_ne_bytes().to_vec();
                // Weight 1 (stored as weight - 1), reserved.
                entry.extend_from_slice(&[0, 0, 0, 0]);
                entry
            })
            .collect()
    }

    const NHA_GATEWAY: u16 = 6;
    const NHA_GROUP_TYPE: u16 = 3;

    #[test]
    fn a_nexthop_object_reads_as_its_id_and_device() {
        // `ip nexthop add id 10 via 192.168.100.254 dev eth0` (ifindex 2).
        let payload = nhmsg(&[
            nla(NHA_ID, &10u32.to_ne_bytes()),
            nla(NHA_GATEWAY, &[192, 168, 100, 254]),
            nla(NHA_OIF, &2u32.to_ne_bytes()),
        ]);
        assert_eq!(
            parse_nexthop(&payload),
            Some(NextHop {
                id: 10,
                oif: Some(2),
                group: vec![],
            })
        );
    }

    #[test]
    fn a_nexthop_group_reads_as_its_members() {
        // `ip nexthop add id 20 group 10/11`.
        let payload = nhmsg(&[
            nla(NHA_ID, &20u32.to_ne_bytes()),
            nla(NHA_GROUP, &group(&[10, 11])),
            nla(NHA_GROUP_TYPE, &0u16.to_ne_bytes()),
        ]);
        assert_eq!(
            parse_nexthop(&payload),
            Some(NextHop {
                id: 20,
                oif: None,
                group: vec![10, 11],
            })
        );
    }

    #[test]
    fn malformed_nexthop_messages_are_skipped() {
        // Shorter than `nhmsg`; no id; an attribute longer than the message.
        assert_eq!(parse_nexthop(&[2, 0, 4]), None);
        assert_eq!(
            parse_nexthop(&nhmsg(&[nla(NHA_OIF, &2u32.to_ne_bytes())])),
            None
        );
        let mut truncated = nhmsg(&[nla(NHA_ID, &10u32.to_ne_bytes())]);
        truncated.extend_from_slice(&[40, 0, 5, 0, 2, 0]);
        assert_eq!(parse_nexthop(&truncated), None);
    }

    fn nexthops(list: &[NextHop]) -> HashMap<u32, NextHop> {
        list.iter().map(|nh| (nh.id, nh.clone())).collect()
    }

    fn device(id: u32, oif: u32) -> NextHop {
        NextHop {
            id,
            oif: Some(oif),
            group: vec![],
        }
    }

    /// A default route naming only a nexthop object, as the kernel dumps
    /// it with `nexthop_compat_mode` 0.
    fn default_via_nexthop(family: AddressFamily, id: u32) -> RouteMessage {
        let mut r = route(family, 0, RT_TABLE_MAIN, RouteType::Unicast, 0, 0);
        r.attributes.push(RouteAttribute::NhId(id));
        r
    }

    #[test]
    fn a_default_route_through_a_nexthop_object_makes_its_device_an_uplink() {
        let table = nexthops(&[device(10, 2), device(11, 3)]);
        let routes = [
            default_via_nexthop(AddressFamily::Inet, 10),
            default_via_nexthop(AddressFamily::Inet6, 11),
        ];
        assert_eq!(default_route_ifindexes(&routes, &table), [2, 3]);
    }

    #[test]
    fn every_member_of_a_nexthop_group_of_a_default_route_is_an_uplink() {
        let table = nexthops(&[
            device(10, 2),
            device(11, 3),
            NextHop {
                id: 20,
                oif: None,
                group: vec![11, 10],
            },
        ]);
        let routes = [default_via_nexthop(AddressFamily::Inet, 20)];
        assert_eq!(default_route_ifindexes(&routes, &table), [3, 2]);
    }

    #[test]
    fn a_nexthop_object_also_given_as_the_device_counts_once() {
        // `nexthop_compat_mode` 1 (the default): RTA_NH_ID and RTA_OIF.
        let mut r = default4(RT_TABLE_MAIN, 2, 0);
        r.attributes.push(RouteAttribute::NhId(10));
        assert_eq!(
            default_route_ifindexes(&[r], &nexthops(&[device(10, 2)])),
            [2]
        );
    }

    #[test]
    fn an_unknown_nexthop_object_makes_no_uplink() {
        // Deleted between the two dumps: its routes go with it.
        let routes = [default_via_nexthop(AddressFamily::Inet, 10)];
        assert_eq!(
            default_route_ifindexes(&routes, &nexthops(&[device(11, 3)])),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn a_datagram_is_split_into_its_messages() {
        let message = |kind: u16, payload: &[u8]| {
            let mut out = vec![0; NETLINK_HEADER_LEN];
            let mut buf = NetlinkBuffer::new(&mut out[..]);
            buf.set_length(u32::try_from(NETLINK_HEADER_LEN + payload.len()).unwrap());
            buf.set_message_type(kind);
            out.extend_from_slice(payload);
            out.resize(out.len().next_multiple_of(4), 0);
            out
        };
        let mut datagram = message(RTM_NEWNEXTHOP, &[1, 2, 3]);
        datagram.extend(message(NLMSG_DONE, &[0; 4]));
        // A trailing fragment shorter than a header is not a message.
        datagram.extend_from_slice(&[1, 2]);
        assert_eq!(
            messages(&datagram).collect::<Vec<_>>(),
            [
                (RTM_NEWNEXTHOP, &[1u8, 2, 3][..]),
                (NLMSG_DONE, &[0; 4][..])
            ]
        );
    }

    /// The dump itself, in a namespace of this test's own: its default
    /// routes of both families and of a policy table are found.
    #[test]
    fn the_route_dump_finds_default_routes_of_both_families_and_every_table() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (a network namespace of its own)"
        );
        let names = dataplane_testkit::netns::in_new_netns(|| {
            let ip = |args: &[&str]| dataplane_testkit::netns::ip(args);
            for dev in ["up4", "up6", "up100"] {
                let peer = format!("{dev}p");
                ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer]);
                ip(&["link", "set", &peer, "up"]);
                ip(&["link", "set", dev, "up"]);
            }
            ip(&["addr", "add", "192.0.2.1/24", "dev", "up4"]);
            ip(&[
                "route",
                "add",
                "default",
                "via",
                "192.0.2.254",
                "dev",
                "up4",
            ]);
            ip(&["-6", "route", "add", "default", "dev", "up6"]);
            ip(&["route", "add", "default", "dev", "up100", "table", "100"]);
            ip(&["route", "add", "unreachable", "default", "table", "101"]);
            default_route_interfaces().unwrap()
        });
        assert_eq!(names, ["up4", "up6", "up100"]);
    }

    /// The addresses of each family as a namespace of this test's own has
    /// them: IPv4 ones all (loopback too), IPv6 ones global only.
    #[test]
    fn node_addresses_are_read_per_family_with_their_interface() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (a network namespace of its own)"
        );
        let (v4, v6) = dataplane_testkit::netns::in_new_netns(|| {
            let ip = |args: &[&str]| dataplane_testkit::netns::ip(args);
            ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up0p"]);
            ip(&["addr", "add", "192.0.2.1/24", "dev", "up0"]);
            ip(&["addr", "add", "2001:db8::1/64", "dev", "up0", "nodad"]);
            ip(&["addr", "add", "fe80::1/64", "dev", "up0", "nodad"]);
            (addresses().unwrap(), addresses6().unwrap())
        });
        assert_eq!(
            v4,
            [
                ("lo".to_owned(), Ipv4Addr::LOCALHOST),
                ("up0".to_owned(), Ipv4Addr::new(192, 0, 2, 1))
            ]
        );
        assert_eq!(
            v6,
            [("up0".to_owned(), "2001:db8::1".parse::<Ipv6Addr>().unwrap())]
        );
    }

    /// The dump of routes through nexthop objects, with the kernel naming
    /// only the object (`nexthop_compat_mode` 0, which covers IPv6 routes
    /// too): a nexthop's device, and every member of a group.
    #[test]
    fn the_route_dump_resolves_nexthop_objects_and_groups() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (a network namespace of its own)"
        );
        let names = dataplane_testkit::netns::in_new_netns(|| {
            let ip = |args: &[&str]| dataplane_testkit::netns::ip(args);
            std::fs::write("/proc/sys/net/ipv4/nexthop_compat_mode", "0").unwrap();
            for (dev, addr) in [
                ("nh1", "192.0.2.1/24"),
                ("nh2", "198.51.100.1/24"),
                ("nh3", "203.0.113.1/24"),
                ("nh6", "2001:db8::1/64"),
            ] {
                let peer = format!("{dev}p");
                ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer]);
                ip(&["link", "set", &peer, "up"]);
                ip(&["link", "set", dev, "up"]);
                ip(&["addr", "add", addr, "dev", dev]);
            }
            ip(&[
                "nexthop",
                "add",
                "id",
                "10",
                "via",
                "192.0.2.254",
                "dev",
                "nh1",
            ]);
            ip(&[
                "nexthop",
                "add",
                "id",
                "11",
                "via",
                "198.51.100.254",
                "dev",
                "nh2",
            ]);
            ip(&[
                "nexthop",
                "add",
                "id",
                "12",
                "via",
                "203.0.113.254",
                "dev",
                "nh3",
            ]);
            ip(&["nexthop", "add", "id", "20", "group", "12/11"]);
            ip(&["route", "add", "default", "nhid", "10"]);
            ip(&["route", "add", "default", "nhid", "20", "table", "100"]);
            // IPv6 through an IPv6 nexthop object.
            ip(&["-6", "nexthop", "add", "id", "30", "dev", "nh6"]);
            ip(&[
                "-6", "route", "add", "default", "nhid", "30", "table", "200",
            ]);
            default_route_interfaces().unwrap()
        });
        assert_eq!(names, ["nh1", "nh3", "nh2", "nh6"]);
    }
}
