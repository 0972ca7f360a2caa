//! Socket-level load balancing on IPv6: `connect6`, `sendmsg6`, `recvmsg6`
//! and `getpeername6`, the rules of `sock` on the `LB6_*` maps. An
//! AF_INET6 socket of a dual-stack application that names an IPv4 service
//! by its IPv4-mapped address (`::ffff:10.96.0.10`) is translated with the
//! IPv4 maps, and sees the backend (and the service again) in that form.
//!
//! Decisions are traced as `sock` traces them, as IPv6 records (a mapped
//! address's as IPv4 ones, by `sock`). (An unconnected UDP datagram to a
//! mapped address is not seen here: the kernel hands it to `sendmsg4` as
//! an IPv4 sockaddr.)

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use dataplane_common::{
    trace_hook, Counter, Ipv6Bytes, SockRevNat6Entry, SockRevNat6Key, Trace6Tuple, IPPROTO_TCP,
    IPPROTO_UDP,
};

use crate::{
    lb6::{lb6_choose_backend_netns, lb6_lookup_sock, Choice6, Selected6},
    maps::{count, sock6_revnat_get, LB6_SOCK_REVNAT},
    skb,
    sock::{sock4_forward_to, sock4_reverse_of, ALLOW, ECONNREFUSED, REJECT},
    sock_ctx::{mapped_ipv4, SockAddr, AF_INET6},
    trace::{trace6_sock, Decision6},
};

#[cgroup_sock_addr(connect6)]
pub fn sock6_connect(ctx: SockAddrContext) -> i32 {
    let sock = SockAddr::new(&ctx);
    sock6_forward(
        &sock,
        trace_hook::SOCK_CONNECT,
        Counter::SockConnectTranslated,
    )
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock6_sendmsg(ctx: SockAddrContext) -> i32 {
    let sock = SockAddr::new(&ctx);
    sock6_forward(
        &sock,
        trace_hook::SOCK_SENDMSG,
        Counter::SockSendmsgTranslated,
    )
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock6_recvmsg(ctx: SockAddrContext) -> i32 {
    let sock = SockAddr::new(&ctx);
    sock6_reverse(
        &sock,
        trace_hook::SOCK_RECVMSG,
        Counter::SockRecvmsgTranslated,
    );
    // recvmsg6 may not fail the syscall: the verifier wants 1.
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock6_getpeername(ctx: SockAddrContext) -> i32 {
    let sock = SockAddr::new(&ctx);
    sock6_reverse(
        &sock,
        trace_hook::SOCK_GETPEERNAME,
        Counter::SockGetpeernameTranslated,
    );
    ALLOW
}

/// Counts `decision` and reports it to `monitor` when IPv6 tracing is on.
#[inline(always)]
fn record6(
    sock: &SockAddr,
    hook: u8,
    decision: Counter,
    proto: u8,
    ids: (u32, u32),
    before: &Trace6Tuple,
    after: &Trace6Tuple,
) {
    count(decision);
    trace6_sock(
        sock,
        &Decision6 {
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
fn sock6_forward(sock: &SockAddr, hook: u8, translated: Counter) -> i32 {
    if sock.user_family() != AF_INET6 {
        return ALLOW;
    }
    let proto = sock.protocol();
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let (addr, port) = (sock.user_ip6(), sock.user_port());
    if let Some(addr4) = mapped_ipv4(&addr) {
        return sock6_forward_mapped(sock, addr4, port, hook, translated);
    }
    sock6_forward_to(sock, &addr, port, hook, translated)
}

/// `sock4_forward_to` of an IPv4-mapped address, in a frame of its own: the
/// hook's frame stays small, so either path fits the verifier's combined
/// stack limit with the trace's frame on top.
#[inline(never)]
fn sock6_forward_mapped(
    sock: &SockAddr,
    addr4: u32,
    port: u16,
    hook: u8,
    translated: Counter,
) -> i32 {
    sock4_forward_to(sock, addr4, port, sock.protocol(), true, hook, translated)
}

/// `sock6_forward` of an IPv6 service address. Not inlined: its frame and
/// the IPv4-mapped path's are never stacked.
#[inline(never)]
fn sock6_forward_to(
    sock: &SockAddr,
    addr: &Ipv6Bytes,
    port: u16,
    hook: u8,
    translated: Counter,
) -> i32 {
    let (addr, proto) = (*addr, sock.protocol());
    let Some(service) = lb6_lookup_sock(&addr, port, proto) else {
        return ALLOW;
    };
    // Built where it is traced: a tuple held across the whole function
    // would take the frame past the verifier's combined stack limit.
    let before = || Trace6Tuple {
        dst_addr: addr,
        dst_port: port,
        ..Trace6Tuple::default()
    };
    let ids = (service.service_id, 0);
    let mut selected = Selected6::default();
    match lb6_choose_backend_netns(&service, sock.netns_cookie(), skb::now_ns(), &mut selected) {
        Choice6::Backend => {}
        Choice6::NoEndpoints => {
            let refused = Counter::SockRefusedNoEndpoints;
            record6(sock, hook, refused, proto, ids, &before(), &before());
            sock.fail_with(ECONNREFUSED);
            return REJECT;
        }
        Choice6::NoLocalEndpoints => {
            // Left untranslated, as `sock4_forward` leaves it.
            let untranslated = Counter::SockNoLocalEndpoints;
            record6(sock, hook, untranslated, proto, ids, &before(), &before());
            return ALLOW;
        }
    }
    let backend = selected.backend;
    let key = SockRevNat6Key {
        cookie: sock.cookie(),
        backend_addr: backend.addr,
        backend_port: backend.port,
        _pad: [0; 6],
    };
    let entry = SockRevNat6Entry {
        service_addr: addr,
        service_port: port,
        _pad: 0,
        service_id: service.service_id,
    };
    // As on IPv4: a connecting socket's cookie is new to the map.
    let stored = hook != trace_hook::SOCK_CONNECT && sock6_revnat_get(&key) == Some(entry);
    if !stored && LB6_SOCK_REVNAT.insert(&key, &entry, 0).is_err() {
        count(Counter::SockRevNatFailed);
    }
    sock.set_user_ip6(&backend.addr, backend.port);
    if selected.by_affinity {
        count(Counter::AffinityHit);
    }
    let after = Trace6Tuple {
        dst_addr: backend.addr,
        dst_port: backend.port,
        ..Trace6Tuple::default()
    };
    let ids = (service.service_id, selected.backend_id);
    record6(sock, hook, translated, proto, ids, &before(), &after);
    ALLOW
}

/// recvmsg() / getpeername() on a translated socket: the backend's address
/// becomes the service's again.
#[inline(always)]
fn sock6_reverse(sock: &SockAddr, hook: u8, translated: Counter) {
    if sock.user_family() != AF_INET6 {
        return;
    }
    let (addr, port) = (sock.user_ip6(), sock.user_port());
    if let Some(addr4) = mapped_ipv4(&addr) {
        sock6_reverse_mapped(sock, addr4, port, hook, translated);
        return;
    }
    sock6_reverse_of(sock, &addr, port, hook, translated);
}

/// `sock4_reverse_of` of an IPv4-mapped address, in a frame of its own as
/// `sock6_forward_mapped`.
#[inline(never)]
fn sock6_reverse_mapped(sock: &SockAddr, addr4: u32, port: u16, hook: u8, translated: Counter) {
    sock4_reverse_of(sock, addr4, port, true, hook, translated);
}

/// `sock6_reverse` of an IPv6 backend address; not inlined, as
/// `sock6_forward_to`.
#[inline(never)]
fn sock6_reverse_of(sock: &SockAddr, addr: &Ipv6Bytes, port: u16, hook: u8, translated: Counter) {
    let addr = *addr;
    let key = SockRevNat6Key {
        cookie: sock.cookie(),
        backend_addr: addr,
        backend_port: port,
        _pad: [0; 6],
    };
    let Some(entry) = sock6_revnat_get(&key) else {
        return;
    };
    sock.set_user_ip6(&entry.service_addr, entry.service_port);
    let before = Trace6Tuple {
        src_addr: addr,
        src_port: port,
        ..Trace6Tuple::default()
    };
    let after = Trace6Tuple {
        src_addr: entry.service_addr,
        src_port: entry.service_port,
        ..Trace6Tuple::default()
    };
    let ids = (entry.service_id, 0);
    record6(
        sock,
        hook,
        translated,
        sock.protocol(),
        ids,
        &before,
        &after,
    );
}
