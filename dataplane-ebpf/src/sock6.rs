//! Socket-level load balancing on IPv6: `connect6`, `sendmsg6`, `recvmsg6`
//! and `getpeername6`, the rules of `sock` on the `LB6_*` maps. An
//! AF_INET6 socket of a dual-stack application that names an IPv4 service
//! by its IPv4-mapped address (`::ffff:10.96.0.10`) is translated with the
//! IPv4 maps, and sees the backend (and the service again) in that form.
//!
//! Decisions are traced as `TraceEvent6` records (`record6_sock`), the
//! IPv4-mapped ones as IPv4 `TraceEvent`s. (An unconnected UDP datagram to a mapped address is not seen here: the
//! kernel hands it to `sendmsg4` as an IPv4 sockaddr.)

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use dataplane_common::{
    trace_hook, Counter, SockRevNat6Entry, SockRevNat6Key, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    lb6::{lb6_choose_backend_netns, lb6_lookup_sock, Choice6, Selected6},
    maps::{count, sock6_revnat_get, LB6_SOCK_REVNAT},
    skb,
    sock::{sock4_forward_to, sock4_reverse_of, ALLOW, ECONNREFUSED, REJECT},
    sock_ctx::{mapped_ipv4, SockAddr, AF_INET6},
    trace::{record6_sock, Sock6Decision},
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
        return sock4_forward_to(sock, addr4, port, proto, true, hook, translated);
    }
    let Some(service) = lb6_lookup_sock(&addr, port, proto) else {
        return ALLOW;
    };
    let mut selected = Selected6::default();
    let untranslated = |decision| Sock6Decision {
        hook,
        decision,
        proto,
        forward: true,
        service_id: service.service_id,
        backend_id: 0,
        before: (&addr, port),
        after: (&addr, port),
    };
    match lb6_choose_backend_netns(&service, sock.netns_cookie(), skb::now_ns(), &mut selected) {
        Choice6::Backend => {}
        Choice6::NoEndpoints => {
            record6_sock(sock, &untranslated(Counter::SockRefusedNoEndpoints));
            sock.fail_with(ECONNREFUSED);
            return REJECT;
        }
        Choice6::NoLocalEndpoints => {
            // Left untranslated, as `sock4_forward` leaves it.
            record6_sock(sock, &untranslated(Counter::SockNoLocalEndpoints));
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
    record6_sock(
        sock,
        &Sock6Decision {
            hook,
            decision: translated,
            proto,
            forward: true,
            service_id: service.service_id,
            backend_id: selected.backend_id,
            before: (&addr, port),
            after: (&backend.addr, backend.port),
        },
    );
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
        sock4_reverse_of(sock, addr4, port, true, hook, translated);
        return;
    }
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
    record6_sock(
        sock,
        &Sock6Decision {
            hook,
            decision: translated,
            proto: sock.protocol(),
            forward: false,
            service_id: entry.service_id,
            backend_id: 0,
            before: (&addr, port),
            after: (&entry.service_addr, entry.service_port),
        },
    );
}
