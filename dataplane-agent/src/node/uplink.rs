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
    constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_LINK},
    packet_core::NetlinkPayload,
    packet_route::RouteNetlinkMessage,
    sys::{AsyncSocket as _, SocketAddr},
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

/// Names of the interfaces holding an IPv4 default route, from
/// `/proc/net/route` (this network namespace's), without duplicates.
pub fn default_route_interfaces() -> Result<Vec<String>, UplinkError> {
    let path = "/proc/net/route";
    let text = std::fs::read_to_string(path).map_err(|source| UplinkError::Read {
        path: path.into(),
        source,
    })?;
    Ok(parse_default_routes(&text))
}

fn parse_default_routes(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        if fields.len() >= 8 && fields[1] == "00000000" && fields[7] == "00000000" {
            let name = fields[0].to_owned();
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
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

/// A notice each time an interface, an IPv4 route or an address (either
/// family) of this network namespace is added, changed or removed: the
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
            RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_LINK,
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

    #[test]
    fn default_routes_are_found_in_proc_net_route() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0164A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0064A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
cbr0\t00F4000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
eth1\t00000000\t0164A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(parse_default_routes(text), vec!["eth0", "eth1"]);
    }
}
