//! `sock_release`: when an application closes a socket, the reverse-map
//! entry its `connect()` made goes with it, so `SOCK_REVNAT` and
//! `LB6_SOCK_REVNAT` hold live sockets, not a full LRU of closed ones whose
//! eviction every new connection pays for.
//!
//! The entry is found by the socket's cookie and its current peer, the
//! backend `connect4`/`connect6` wrote (an IPv4 service on an AF_INET6
//! socket: the IPv4-mapped backend, entry in the IPv4 map). Entries of
//! unconnected UDP, one per backend a datagram went to, are keyed by a peer
//! the socket does not have at close: they stay until the LRU evicts them.
//! So does the entry of a socket connected again elsewhere before closing.

use aya_ebpf::{macros::cgroup_sock, programs::SockContext};
use dataplane_common::{SockRevNat6Key, SockRevNatKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    maps::{LB6_SOCK_REVNAT, SOCK_REVNAT},
    sock_ctx::{mapped_ipv4, Sock, AF_INET, AF_INET6},
};

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    sock_revnat_delete(&Sock::new(&ctx));
    // sock_release may not fail the close(): the verifier wants 1.
    1
}

#[inline(always)]
fn sock_revnat_delete(sock: &Sock) {
    let proto = sock.protocol();
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return;
    }
    let port = sock.dst_port();
    if port == 0 {
        // Never connected: nothing of it is keyed by a peer.
        return;
    }
    match sock.family() {
        AF_INET => sock4_revnat_delete(sock.cookie(), sock.dst_ip4(), port),
        AF_INET6 => {
            let addr = sock.dst_ip6();
            if let Some(addr4) = mapped_ipv4(&addr) {
                sock4_revnat_delete(sock.cookie(), addr4, port);
                return;
            }
            let key = SockRevNat6Key {
                cookie: sock.cookie(),
                backend_addr: addr,
                backend_port: port,
                _pad: [0; 6],
            };
            // Absent for a socket no hook translated: nothing to do.
            let _ = LB6_SOCK_REVNAT.remove(&key);
        }
        _ => {}
    }
}

#[inline(always)]
fn sock4_revnat_delete(cookie: u64, addr: u32, port: u16) {
    let key = SockRevNatKey {
        cookie,
        backend_addr: addr,
        backend_port: port,
        _pad: 0,
    };
    // Absent for a socket no hook translated: nothing to do.
    let _ = SOCK_REVNAT.remove(&key);
}
