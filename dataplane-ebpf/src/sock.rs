//! Socket-level load balancing: cgroup v2 hooks that translate a socket's
//! destination once, at `connect()` or per unconnected UDP datagram at
//! `sendmsg()`, so its packets leave already aimed at the backend and the
//! tc programs see ordinary pod traffic (no second translation). `recvmsg()`
//! and `getpeername()` show the service address again, from `SOCK_REVNAT`.
//!
//! Backends are chosen by `lb`, as on the tc path. Session affinity knows a
//! socket by its network namespace: all processes of the node's namespace
//! are one client, as they share the node IP under kube-proxy.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use dataplane_common::{
    trace_hook, Counter, SockRevNatEntry, SockRevNatKey, TraceTuple, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    lb::{lb4_choose_backend, lb4_lookup_sock, Choice, Client},
    maps::{count, sock_revnat_get, SOCK_REVNAT},
    skb,
    sock_ctx::{ipv4_mapped, SockAddr, AF_INET},
    trace::{trace_sock, Decision},
};

/// Return values of the sock_addr hooks: carry on with the (possibly
/// rewritten) address, or fail the syscall (with the errno set by
/// `SockAddr::fail_with`, EPERM otherwise).
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;

pub const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn sock4_connect(ctx: SockAddrContext) -> i32 {
    let sock = SockAddr::new(&ctx);
    sock4_forward(
        &sock,
        trace_hook::SOCK_CONNECT,
        Counter::SockConnectTranslated,
    )
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    let sock = SockAddr::new(&ctx);
    sock4_forward(
        &sock,
        trace_hook::SOCK_SENDMSG,
        Counter::SockSendmsgTranslated,
    )
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    let sock = SockAddr::new(&ctx);
    sock4_reverse(
        &sock,
        trace_hook::SOCK_RECVMSG,
        Counter::SockRecvmsgTranslated,
    );
    // recvmsg4 may not fail the syscall: the verifier wants 1.
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeername(ctx: SockAddrContext) -> i32 {
    let sock = SockAddr::new(&ctx);
    sock4_reverse(
        &sock,
        trace_hook::SOCK_GETPEERNAME,
        Counter::SockGetpeernameTranslated,
    );
    ALLOW
}

#[inline(always)]
fn record(
    sock: &SockAddr,
    hook: u8,
    decision: Counter,
    proto: u8,
    ids: (u32, u32),
    before: TraceTuple,
    after: TraceTuple,
) {
    count(decision);
    trace_sock(
        sock,
        &Decision {
            hook,
            decision,
            proto,
            service_id: ids.0,
            backend_id: ids.1,
            before,
            after,
        },
    );
}

/// connect() / sendmsg() to a service: the destination becomes a backend.
#[inline(always)]
fn sock4_forward(sock: &SockAddr, hook: u8, translated: Counter) -> i32 {
    if sock.user_family() != AF_INET {
        return ALLOW;
    }
    let proto = sock.protocol();
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let (addr, port) = (sock.user_ip4(), sock.user_port());
    sock4_forward_to(sock, addr, port, proto, false, hook, translated)
}

/// `sock4_forward` of `addr:port`, which came as an IPv4-mapped IPv6
/// address (`::ffff:a.b.c.d`) on an AF_INET6 socket when `mapped`: the
/// backend is written back the same way, as the socket's family wants.
#[inline(always)]
pub fn sock4_forward_to(
    sock: &SockAddr,
    addr: u32,
    port: u16,
    proto: u8,
    mapped: bool,
    hook: u8,
    translated: Counter,
) -> i32 {
    // A port that is no service is left to the packet path, as it is there.
    let Some(service) = lb4_lookup_sock(addr, port, proto) else {
        return ALLOW;
    };
    let before = TraceTuple {
        dst_addr: addr,
        dst_port: port,
        ..TraceTuple::default()
    };
    let client = Client::netns(sock.netns_cookie());
    let selected = match lb4_choose_backend(&service, client, skb::now_ns()) {
        Choice::Backend(selected) => selected,
        Choice::NoEndpoints => {
            let ids = (service.service_id, 0);
            record(
                sock,
                hook,
                Counter::SockRefusedNoEndpoints,
                proto,
                ids,
                before,
                before,
            );
            sock.fail_with(ECONNREFUSED);
            return REJECT;
        }
        Choice::NoLocalEndpoints => {
            // Left untranslated, so it ends as on the packet path: a pod's
            // packets are dropped by tc as kube-proxy drops them (the client
            // times out, the same with --socket-lb false); a node process's
            // go where the node routes the service IP.
            let ids = (service.service_id, 0);
            record(
                sock,
                hook,
                Counter::SockNoLocalEndpoints,
                proto,
                ids,
                before,
                before,
            );
            return ALLOW;
        }
    };
    let backend = selected.backend;
    let key = SockRevNatKey {
        cookie: sock.cookie(),
        backend_addr: backend.addr,
        backend_port: backend.port,
        _pad: 0,
    };
    let entry = SockRevNatEntry {
        service_addr: addr,
        service_port: port,
        _pad: 0,
        service_id: service.service_id,
    };
    // A connecting socket is new to the map (its cookie is); per datagram
    // the entry is usually there already: no write then.
    let stored = hook != trace_hook::SOCK_CONNECT && sock_revnat_get(&key) == Some(entry);
    if !stored && SOCK_REVNAT.insert(key, entry, 0).is_err() {
        count(Counter::SockRevNatFailed);
    }
    if mapped {
        sock.set_user_ip6(&ipv4_mapped(backend.addr), backend.port);
    } else {
        sock.set_user_addr(backend.addr, backend.port);
    }
    if selected.by_affinity {
        count(Counter::AffinityHit);
    }
    let after = TraceTuple {
        dst_addr: backend.addr,
        dst_port: backend.port,
        ..TraceTuple::default()
    };
    record(
        sock,
        hook,
        translated,
        proto,
        (service.service_id, selected.backend_id),
        before,
        after,
    );
    ALLOW
}

/// recvmsg() / getpeername() on a translated socket: the backend's address
/// becomes the service's again.
#[inline(always)]
fn sock4_reverse(sock: &SockAddr, hook: u8, translated: Counter) {
    if sock.user_family() != AF_INET {
        return;
    }
    let (addr, port) = (sock.user_ip4(), sock.user_port());
    sock4_reverse_of(sock, addr, port, false, hook, translated);
}

/// `sock4_reverse` of `addr:port`, shown to the application as an
/// IPv4-mapped IPv6 address when `mapped`.
#[inline(always)]
pub fn sock4_reverse_of(
    sock: &SockAddr,
    addr: u32,
    port: u16,
    mapped: bool,
    hook: u8,
    translated: Counter,
) {
    let key = SockRevNatKey {
        cookie: sock.cookie(),
        backend_addr: addr,
        backend_port: port,
        _pad: 0,
    };
    let Some(entry) = sock_revnat_get(&key) else {
        return;
    };
    if mapped {
        sock.set_user_ip6(&ipv4_mapped(entry.service_addr), entry.service_port);
    } else {
        sock.set_user_addr(entry.service_addr, entry.service_port);
    }
    let before = TraceTuple {
        src_addr: addr,
        src_port: port,
        ..TraceTuple::default()
    };
    let after = TraceTuple {
        src_addr: entry.service_addr,
        src_port: entry.service_port,
        ..TraceTuple::default()
    };
    record(
        sock,
        hook,
        translated,
        sock.protocol(),
        (entry.service_id, 0),
        before,
        after,
    );
}
