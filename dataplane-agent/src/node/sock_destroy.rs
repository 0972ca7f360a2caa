//! Closing connected UDP sockets still aimed at a backend that left: the
//! socket hooks translated them once, at connect(), so without this a DNS
//! client would keep sending to a dead pod until it gives up on its own.
//!
//! Cilium does this with `bpf_sock_destroy` from a socket iterator. aya
//! 0.14 cannot load that: the helper is a kfunc and its loader has no kfunc
//! relocations (aya-ebpf 0.2 has no iterator programs either). The kernel
//! offers the same operation to userspace as `SOCK_DESTROY` over
//! `NETLINK_SOCK_DIAG` (`ss -K`, `CONFIG_INET_DIAG_DESTROY`): the socket
//! gets ECONNABORTED and is disconnected, and the application reconnects
//! (and so gets a live backend). Netlink sees one network namespace, so
//! this runs in every namespace of the processes under the cgroup root.
//!
//! Both families are dumped: an AF_INET6 socket is aimed at an IPv6
//! backend, or (a dual-stack application that named an IPv4 service by its
//! IPv4-mapped address) at an IPv4 backend in mapped form, which counts as
//! that IPv4 backend.

use std::{
    collections::HashSet,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use log::{debug, info, warn};
use nix::{
    sched::{setns, CloneFlags},
    sys::socket::{
        recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    },
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_UDP: u8 = 17;
/// A connected UDP socket is in TCP_ESTABLISHED.
const TCP_ESTABLISHED: u8 = 1;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid, then
/// expires, rqueue, wqueue, uid, inode.
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;

#[derive(Debug, thiserror::Error)]
pub enum SockDestroyError {
    #[error("sock_diag netlink socket")]
    Netlink(#[source] nix::Error),
    #[error("entering network namespace {}", path.display())]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("opening {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed sock_diag answer")]
    Malformed,
}

/// `inet_diag_req_v2` for UDP sockets of `family` with `id` (zeroes for a
/// dump).
fn request(kind: u16, flags: u16, family: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDR + 8 + SOCKID_LEN;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    msg.extend_from_slice(&[family, IPPROTO_UDP, 0, 0]);
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    msg.extend_from_slice(id);
    msg
}

/// A connected UDP socket as the dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSocketId {
    /// Where it sends: an IPv4-mapped IPv6 destination is given as the IPv4
    /// address it maps.
    pub dst: SocketAddr,
    /// `AF_INET` or `AF_INET6`.
    family: u8,
    /// The raw `inet_diag_sockid`, sent back as is to destroy the socket.
    id: [u8; SOCKID_LEN],
}

/// The destination in a raw `inet_diag_sockid` of `family`.
fn destination(family: u8, id: &[u8; SOCKID_LEN]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes([id[2], id[3]]);
    let ip = match family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(id[20], id[21], id[22], id[23])),
        AF_INET6 => {
            let octets: [u8; 16] = id[20..36].try_into().expect("16 bytes");
            Ipv6Addr::from(octets).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The connected sockets in one batch of dump answers; `None` once the
/// dump is done.
fn parse_dump(buf: &[u8]) -> Result<Option<Vec<UdpSocketId>>, SockDestroyError> {
    let mut found = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDR || len > rest.len() {
            return Err(SockDestroyError::Malformed);
        }
        match kind {
            NLMSG_DONE => return Ok(None),
            NLMSG_ERROR => return Err(SockDestroyError::Malformed),
            SOCK_DIAG_BY_FAMILY => {
                let body = &rest[NLMSG_HDR..len];
                if body.len() < DIAG_MSG_LEN {
                    return Err(SockDestroyError::Malformed);
                }
                let id: [u8; SOCKID_LEN] = body[4..4 + SOCKID_LEN].try_into().expect("48 bytes");
                let family = body[0];
                if body[1] == TCP_ESTABLISHED {
                    if let Some(dst) = destination(family, &id) {
                        found.push(UdpSocketId { dst, family, id });
                    }
                }
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        rest = rest.get(next..).unwrap_or_default();
    }
    Ok(Some(found))
}

fn netlink() -> Result<std::os::fd::OwnedFd, SockDestroyError> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(SockDestroyError::Netlink)
}

/// Connected UDP sockets of this thread's network namespace, both
/// families.
pub fn connected_udp_sockets() -> Result<Vec<UdpSocketId>, SockDestroyError> {
    let mut sockets = Vec::new();
    for family in [AF_INET, AF_INET6] {
        sockets.extend(connected_udp_sockets_of(family)?);
    }
    Ok(sockets)
}

fn connected_udp_sockets_of(family: u8) -> Result<Vec<UdpSocketId>, SockDestroyError> {
    let fd = netlink()?;
    let kernel = NetlinkAddr::new(0, 0);
    let dump = request(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        family,
        &[0; SOCKID_LEN],
    );
    sendto(fd.as_raw_fd(), &dump, &kernel, MsgFlags::empty()).map_err(SockDestroyError::Netlink)?;
    let mut sockets = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n =
            recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(SockDestroyError::Netlink)?;
        match parse_dump(&buf[..n])? {
            Some(batch) => sockets.extend(batch),
            None => return Ok(sockets),
        }
    }
}

/// Destroys one socket of this thread's network namespace.
fn destroy(socket: &UdpSocketId) -> Result<(), SockDestroyError> {
    let fd = netlink()?;
    let msg = request(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        socket.family,
        &socket.id,
    );
    sendto(
        fd.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(SockDestroyError::Netlink)?;
    let mut buf = [0u8; 256];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(SockDestroyError::Netlink)?;
    // The ack is an NLMSG_ERROR carrying 0, or -errno.
    if n < NLMSG_HDR + 4 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
        return Err(SockDestroyError::Malformed);
    }
    let errno = i32::from_ne_bytes(buf[NLMSG_HDR..NLMSG_HDR + 4].try_into().expect("4 bytes"));
    if errno == 0 {
        Ok(())
    } else {
        Err(SockDestroyError::Netlink(nix::Error::from_raw(-errno)))
    }
}

/// Destroys this namespace's connected UDP sockets aimed at `gone`.
fn destroy_in_current_netns(gone: &HashSet<SocketAddr>) -> Result<usize, SockDestroyError> {
    let mut destroyed = 0;
    for socket in connected_udp_sockets()? {
        if gone.contains(&socket.dst) {
            match destroy(&socket) {
                Ok(()) => destroyed += 1,
                // Closed meanwhile.
                Err(SockDestroyError::Netlink(nix::Error::ENOENT)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(destroyed)
}

/// The network namespaces of the processes in the cgroups under `root`,
/// one open handle each, the agent's own first.
fn namespaces_under(root: &Path) -> Vec<(PathBuf, File)> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    let mut add = |path: PathBuf| {
        if let Ok(file) = File::open(&path) {
            if let Ok(meta) = file.metadata() {
                if seen.insert((meta.dev(), meta.ino())) {
                    found.push((path, file));
                }
            }
        }
    };
    add(PathBuf::from("/proc/self/ns/net"));
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                add(PathBuf::from(format!("/proc/{pid}/ns/net")));
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    found
}

/// Destroys every connected UDP socket aimed at a backend of `gone` (either
/// family) in the namespaces of the processes under `cgroup_root`,
/// on a thread of its own (which enters each namespace in turn), so the
/// caller does not wait. The thread returns how many it destroyed.
pub fn destroy_udp_sockets_to(
    gone: Vec<SocketAddr>,
    cgroup_root: PathBuf,
) -> std::thread::JoinHandle<usize> {
    let gone: HashSet<_> = gone.into_iter().collect();
    std::thread::spawn(move || {
        let (mut destroyed, mut unreachable) = (0, 0);
        for (path, ns) in namespaces_under(&cgroup_root) {
            // setns changes this thread only, and it is ours. Without
            // CAP_SYS_ADMIN only the agent's own namespace is reachable.
            if let Err(source) = setns(ns.as_fd(), CloneFlags::CLONE_NEWNET) {
                let e = SockDestroyError::Setns { path, source };
                debug!("{:#}", anyhow::Error::from(e));
                unreachable += 1;
                continue;
            }
            match destroy_in_current_netns(&gone) {
                Ok(n) => destroyed += n,
                Err(e) => warn!("{}: {:#}", path.display(), anyhow::Error::from(e)),
            }
        }
        if destroyed > 0 {
            info!("closed {destroyed} connected UDP sockets aimed at removed backends");
        }
        if unreachable > 0 {
            warn!("could not enter {unreachable} network namespaces to close sockets aimed at removed backends (needs CAP_SYS_ADMIN)");
        }
        destroyed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(kind: u16, state: u8, dst: [u8; 4], dport: u16) -> Vec<u8> {
        answer_of(kind, AF_INET, state, &dst, dport)
    }

    fn answer_of(kind: u16, family: u8, state: u8, dst: &[u8], dport: u16) -> Vec<u8> {
        let len = NLMSG_HDR + DIAG_MSG_LEN;
        let mut msg = Vec::new();
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[family, state, 0, 0]);
        let mut id = [0u8; SOCKID_LEN];
        id[2..4].copy_from_slice(&dport.to_be_bytes());
        id[20..20 + dst.len()].copy_from_slice(dst);
        msg.extend_from_slice(&id);
        msg.extend_from_slice(&[0; 20]);
        msg
    }

    #[test]
    fn dump_keeps_connected_sockets_with_their_destination() {
        let mut buf = answer(SOCK_DIAG_BY_FAMILY, TCP_ESTABLISHED, [10, 244, 2, 10], 5353);
        // Unconnected (TCP_CLOSE = 7): not aimed at anyone.
        buf.extend(answer(SOCK_DIAG_BY_FAMILY, 7, [0, 0, 0, 0], 0));
        let found = parse_dump(&buf).expect("parsed").expect("not done");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].dst, "10.244.2.10:5353".parse().unwrap());
    }

    #[test]
    fn ipv6_dump_gives_ipv6_destinations_and_mapped_ones_as_ipv4() {
        let v6: Ipv6Addr = "fd00:10:244:2::10".parse().unwrap();
        let mapped = Ipv4Addr::new(10, 244, 2, 10).to_ipv6_mapped();
        let mut buf = answer_of(
            SOCK_DIAG_BY_FAMILY,
            AF_INET6,
            TCP_ESTABLISHED,
            &v6.octets(),
            53,
        );
        buf.extend(answer_of(
            SOCK_DIAG_BY_FAMILY,
            AF_INET6,
            TCP_ESTABLISHED,
            &mapped.octets(),
            5353,
        ));
        let found = parse_dump(&buf).expect("parsed").expect("not done");
        let dsts: Vec<SocketAddr> = found.iter().map(|s| s.dst).collect();
        assert_eq!(
            dsts,
            [
                "[fd00:10:244:2::10]:53".parse().unwrap(),
                "10.244.2.10:5353".parse().unwrap()
            ]
        );
        // Destroyed in the family it was dumped in.
        assert!(found.iter().all(|s| s.family == AF_INET6));
    }

    #[test]
    fn dump_ends_at_done() {
        let mut done = Vec::new();
        done.extend_from_slice(&(NLMSG_HDR as u32 + 4).to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0; 14]);
        assert_eq!(parse_dump(&done).expect("parsed"), None);
    }

    #[test]
    fn truncated_answer_is_malformed() {
        let buf = answer(SOCK_DIAG_BY_FAMILY, TCP_ESTABLISHED, [10, 0, 0, 1], 53);
        assert!(matches!(
            parse_dump(&buf[..buf.len() - 8]),
            Err(SockDestroyError::Malformed)
        ));
    }
}
