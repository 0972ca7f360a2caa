//! The node's uplinks and addresses: which interfaces carry traffic from
//! outside (by default those holding the default routes), the addresses
//! NodePorts are served on (both followed as links, routes and addresses
//! change), and the SNAT port range kept free of the node's own sockets.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use futures::StreamExt as _;
use rtnetlink::{
    constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
    },
    packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST},
    packet_route::{
        route::{RouteAttribute, RouteHeader, RouteMessage, RouteType},
        AddressFamily, RouteNetlinkMessage,
    },
    sys::{protocols::NETLINK_ROUTE, AsyncSocket as _, Socket, SocketAddr},
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
pub fn default_route_interfaces() -> Result<Vec<String>, UplinkError> {
    let mut routes = dump_routes(AddressFamily::Inet)?;
    routes.extend(dump_routes(AddressFamily::Inet6)?);
    Ok(default_route_ifindexes(&routes)
        .into_iter()
        // An interface gone since the dump is not an uplink any more.
        .filter_map(|ifindex| nix::net::if_::if_indextoname(ifindex).ok())
        .filter_map(|name| name.into_string().ok())
        .collect())
}

/// The routes of one family in every table (`RTM_GETROUTE` dump), as
/// `ip route show table all` lists them.
fn dump_routes(family: AddressFamily) -> Result<Vec<RouteMessage>, UplinkError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(UplinkError::RouteDump)?;
    socket.bind_auto().map_err(UplinkError::RouteDump)?;
    let mut query = RouteMessage::default();
    query.header.address_family = family;
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(query));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).map_err(UplinkError::RouteDump)?;
    let mut routes = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full().map_err(UplinkError::RouteDump)?;
        let mut offset = 0;
        while offset < datagram.len() {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[offset..])
                .map_err(|e| UplinkError::RouteDump(std::io::Error::other(e)))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                    routes.push(route);
                }
                NetlinkPayload::Done(_) => return Ok(routes),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(UplinkError::RouteDump(e.to_io()));
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            // Messages are 4-byte aligned within a datagram.
            offset += (length + 3) & !3;
        }
    }
}

/// The interfaces (indexes) of the default routes among `routes`, in the
/// order [`default_route_interfaces`] gives: the selection, apart from
/// reading the kernel's tables.
fn default_route_ifindexes(routes: &[RouteMessage]) -> Vec<u32> {
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
    let mut out = Vec::new();
    for ifaddr in nix::ifaddrs::getifaddrs().map_err(UplinkError::Addresses)? {
        let Some(addr) = ifaddr.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        out.push((ifaddr.interface_name.clone(), addr.ip()));
    }
    Ok(out)
}

/// Every global IPv6 address of the node (no loopback, no link-local),
/// with the interface holding it.
pub fn addresses6() -> Result<Vec<(String, Ipv6Addr)>, UplinkError> {
    let mut out = Vec::new();
    for ifaddr in nix::ifaddrs::getifaddrs().map_err(UplinkError::Addresses)? {
        let Some(addr) = ifaddr.address.as_ref().and_then(|a| a.as_sockaddr_in6()) else {
            continue;
        };
        let ip = addr.ip();
        if ip.is_loopback() || ip.is_unicast_link_local() {
            continue;
        }
        out.push((ifaddr.interface_name.clone(), ip));
    }
    Ok(out)
}

/// A notice each time an interface, a route or an address (either
/// family, any table) of this network namespace is added, changed or removed: the
/// receiver reads the uplinks ([`default_route_interfaces`], [`present`])
/// and addresses ([`addresses`], [`addresses6`]) again. Notices that arrive
/// while one is pending are merged into it.
pub fn watch_node_network() -> Result<mpsc::Receiver<()>, UplinkError> {
    let (mut connection, _handle, mut messages) =
        rtnetlink::new_connection().map_err(UplinkError::Netlink)?;
    connection
        .socket_mut()
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
    tokio::spawn(connection);
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewAddress(_)
                | RouteNetlinkMessage::DelAddress(_)
                | RouteNetlinkMessage::NewLink(_)
                | RouteNetlinkMessage::DelLink(_)
                | RouteNetlinkMessage::NewRoute(_)
                | RouteNetlinkMessage::DelRoute(_),
            ) = message.payload
            {
                if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
        }
        log::error!("netlink link, route and address notifications ended");
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
        assert_eq!(default_route_ifindexes(&routes), [2]);
    }

    #[test]
    fn ipv4_and_ipv6_default_routes_both_count_once_each_interface() {
        let routes = [
            default4(RT_TABLE_MAIN, 2, 0),
            default6(RT_TABLE_MAIN, 2, 1024),
            default6(RT_TABLE_MAIN, 4, 1024),
        ];
        assert_eq!(default_route_ifindexes(&routes), [2, 4]);
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
        assert_eq!(default_route_ifindexes(&routes), [2, 5, 7, 6]);
    }

    #[test]
    fn lower_metric_default_routes_come_first() {
        let routes = [
            default4(RT_TABLE_MAIN, 3, 200),
            default4(RT_TABLE_MAIN, 2, 100),
        ];
        assert_eq!(default_route_ifindexes(&routes), [2, 3]);
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
        assert_eq!(default_route_ifindexes(&routes), Vec::<u32>::new());
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
        assert_eq!(default_route_ifindexes(&[ecmp]), [3, 2]);
    }

    #[test]
    fn table_ids_above_255_are_read_from_the_table_attribute() {
        // The header's u8 says 252 (RT_TABLE_COMPAT); RTA_TABLE has the id.
        let routes = [default4(1_000_000, 9, 0), default4(RT_TABLE_MAIN, 2, 0)];
        assert_eq!(default_route_ifindexes(&routes), [2, 9]);
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
}
