//! Narrow wrappers over the contexts of the cgroup socket hooks: the
//! socket address of the sock_addr hooks (`bpf_sock_addr`), the socket of
//! `sock_release` (`bpf_sock`), and the helpers they need. Like `skb`,
//! this is where the socket hooks' `unsafe` blocks live.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval,
    },
    programs::{SockAddrContext, SockContext},
    EbpfContext as _,
};
use dataplane_common::Ipv6Bytes;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// `::ffff:a.b.c.d` for the IPv4 address `addr` (network byte order, as
/// stored in maps).
#[inline(always)]
pub fn ipv4_mapped(addr: u32) -> Ipv6Bytes {
    let [a, b, c, d] = addr.to_ne_bytes();
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d]
}

/// The IPv4 address of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`),
/// network byte order.
#[inline(always)]
pub fn mapped_ipv4(addr: &Ipv6Bytes) -> Option<u32> {
    let [prefix @ .., a, b, c, d] = *addr;
    (prefix == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]).then(|| u32::from_ne_bytes([a, b, c, d]))
}

/// A socket-address hook's context: the address the application passed
/// (connect, sendmsg) or is about to see (recvmsg, getpeername).
pub struct SockAddr<'a> {
    ctx: &'a SockAddrContext,
}

impl<'a> SockAddr<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a SockAddrContext) -> Self {
        Self { ctx }
    }

    fn raw(&self) -> *mut bpf_sock_addr {
        self.ctx.sock_addr
    }

    /// Address family of the address passed by the application.
    #[inline(always)]
    pub fn user_family(&self) -> u32 {
        // SAFETY: the kernel hands the program a valid bpf_sock_addr for its
        // whole run; `user_family` is readable in every sock_addr hook.
        unsafe { (*self.raw()).user_family }
    }

    /// IPPROTO_TCP or IPPROTO_UDP (or another protocol we leave alone).
    #[inline(always)]
    pub fn protocol(&self) -> u8 {
        // SAFETY: as above; `protocol` is a readable 4-byte field.
        unsafe { (*self.raw()).protocol as u8 }
    }

    /// The IPv4 address, network byte order, as stored in maps.
    #[inline(always)]
    pub fn user_ip4(&self) -> u32 {
        // SAFETY: as above; a 4-byte read of `user_ip4`.
        unsafe { (*self.raw()).user_ip4 }
    }

    /// The port, network byte order, as stored in maps: the kernel keeps it
    /// in the low 16 bits of a 4-byte field.
    #[inline(always)]
    pub fn user_port(&self) -> u16 {
        // SAFETY: as above; a 4-byte read of `user_port`.
        unsafe { (*self.raw()).user_port as u16 }
    }

    /// The IPv6 address in packet byte order, as stored in maps (connect6,
    /// sendmsg6, recvmsg6, getpeername6 only).
    #[inline(always)]
    pub fn user_ip6(&self) -> Ipv6Bytes {
        // SAFETY: as above; four 4-byte reads of `user_ip6`, readable in
        // the IPv6 hooks, each word in memory (network) byte order.
        ip6_bytes(unsafe { (*self.raw()).user_ip6 })
    }

    /// Rewrites the IPv6 address and port: writable in the IPv6 hooks this
    /// object uses.
    #[inline(always)]
    pub fn set_user_ip6(&self, addr: &Ipv6Bytes, port: u16) {
        let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
        let words = [word(0), word(4), word(8), word(12)];
        // SAFETY: 4-byte writes of fields the verifier allows these hooks
        // to write; the context is the program's own.
        unsafe {
            (*self.raw()).user_ip6[0] = words[0];
            (*self.raw()).user_ip6[1] = words[1];
            (*self.raw()).user_ip6[2] = words[2];
            (*self.raw()).user_ip6[3] = words[3];
            (*self.raw()).user_port = u32::from(port);
        }
    }

    /// Rewrites the address (and port): writable in connect4, sendmsg4,
    /// recvmsg4 and getpeername4, the hooks this object uses.
    #[inline(always)]
    pub fn set_user_addr(&self, addr: u32, port: u16) {
        // SAFETY: 4-byte writes of fields the verifier allows these hooks to
        // write; the context is the program's own.
        unsafe {
            (*self.raw()).user_ip4 = addr;
            (*self.raw()).user_port = u32::from(port);
        }
    }

    /// Identifies the socket for as long as it lives.
    #[inline(always)]
    pub fn cookie(&self) -> u64 {
        // SAFETY: helper call on the program's own context.
        unsafe { bpf_get_socket_cookie(self.ctx.as_ptr()) }
    }

    /// Identifies the socket's network namespace.
    #[inline(always)]
    pub fn netns_cookie(&self) -> u64 {
        // SAFETY: helper call on the program's own context.
        unsafe { bpf_get_netns_cookie(self.ctx.as_ptr()) }
    }

    /// Fails the syscall with `errno` once the program returns 0 (instead of
    /// the default EPERM).
    #[inline(always)]
    pub fn fail_with(&self, errno: i32) {
        // SAFETY: plain helper call; it only sets the syscall's return value.
        unsafe {
            bpf_set_retval(-errno);
        }
    }
}

/// Four address words in memory (network) byte order as packet bytes, as
/// stored in maps.
#[inline(always)]
fn ip6_bytes(words: [u32; 4]) -> Ipv6Bytes {
    let [a, b, c, d] = words.map(u32::to_ne_bytes);
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The socket a `sock_release` program sees: read-only, as the kernel
/// lets that hook read it.
pub struct Sock<'a> {
    ctx: &'a SockContext,
}

impl<'a> Sock<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a SockContext) -> Self {
        Self { ctx }
    }

    fn raw(&self) -> *mut bpf_sock {
        self.ctx.sock
    }

    /// AF_INET or AF_INET6 (the hook runs for inet sockets only).
    #[inline(always)]
    pub fn family(&self) -> u32 {
        // SAFETY: the kernel hands the program a valid bpf_sock for its
        // whole run; `family` is a readable 4-byte field in every
        // cgroup/sock hook.
        unsafe { (*self.raw()).family }
    }

    #[inline(always)]
    pub fn protocol(&self) -> u8 {
        // SAFETY: as above; `protocol` is a readable 4-byte field.
        unsafe { (*self.raw()).protocol as u8 }
    }

    /// The peer's port, network byte order, as stored in maps; 0 for a
    /// socket never connected.
    #[inline(always)]
    pub fn dst_port(&self) -> u16 {
        // SAFETY: as above; a 4-byte read at the 4-byte aligned offset of
        // `dst_port`: every kernel with this hook takes it (the field was
        // 4 bytes until 5.18, which kept such reads working), the port in
        // the low 16 bits as `user_port` has it.
        unsafe {
            core::ptr::addr_of!((*self.raw()).dst_port)
                .cast::<u32>()
                .read() as u16
        }
    }

    /// The peer's IPv4 address, network byte order, as stored in maps.
    #[inline(always)]
    pub fn dst_ip4(&self) -> u32 {
        // SAFETY: as above; a 4-byte read of `dst_ip4`.
        unsafe { (*self.raw()).dst_ip4 }
    }

    /// The peer's IPv6 address in packet byte order, as stored in maps.
    #[inline(always)]
    pub fn dst_ip6(&self) -> Ipv6Bytes {
        // SAFETY: as above; four 4-byte reads of `dst_ip6`.
        ip6_bytes(unsafe { (*self.raw()).dst_ip6 })
    }

    /// The cookie the sock_addr hooks keyed the socket's entries with.
    #[inline(always)]
    pub fn cookie(&self) -> u64 {
        // SAFETY: helper call on the program's own context.
        unsafe { bpf_get_socket_cookie(self.ctx.as_ptr()) }
    }
}

/// cgroup v2 id of the calling process.
#[inline(always)]
pub fn cgroup_id() -> u64 {
    // SAFETY: helper without arguments or side effects.
    unsafe { bpf_get_current_cgroup_id() }
}
