//! IPv6 map keys and values: the `LB6_*`, `CT6_*` maps beside the IPv4
//! ones, so that no IPv4 key pays for 16-byte addresses. Values that carry
//! no address (`ServiceValue`, `AffinityEntry`, `FragPorts`) and the maps
//! that hold none (`BACKEND_SLOTS`, `SERVICE_NAMES`, `COUNTERS`,
//! `CT_LIFETIMES`, the trace maps) are shared by both families: service ids
//! and slot blocks come from one allocator, backend ids from one per family.
//!
//! Addresses are the 16 bytes of the header field, in packet order
//! (`Ipv6Addr::octets`), so `bpftool map dump` prints them as byte arrays.

use bytemuck::{Pod, Zeroable};

use crate::{ct_dir, ct_flags, nat_dir, CtLifetimes};

/// An IPv6 address as it appears in the header.
pub type Ipv6Bytes = [u8; 16];

/// Key of `LB6_SERVICES`: one IPv6 frontend; see [`crate::ServiceKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Service6Key {
    /// Service IP; all zero (`::`) for a NodePort.
    pub addr: Ipv6Bytes,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// One of [`crate::service_scope`].
    pub scope: u8,
}

/// Value of `LB6_BACKENDS` (an array indexed by IPv6 backend id, ids from
/// 1): where a pod listens. An unused id holds the all-zero value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend6 {
    pub addr: Ipv6Bytes,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// Bits of [`crate::backend_flags`].
    pub flags: u8,
}

/// Key of `LB6_REPLY_SOURCES`: an IPv6 backend's address, port and
/// protocol, as its replies carry them in their source, or its address as a
/// whole (port and protocol 0); see [`crate::ReplySource`]. The values are
/// the same (`reply_source_flags`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ReplySource6 {
    pub addr: Ipv6Bytes,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl ReplySource6 {
    pub fn of(backend: &Backend6) -> Self {
        Self {
            addr: backend.addr,
            port: backend.port,
            proto: backend.proto,
            _pad: 0,
        }
    }

    /// The entry of address `addr` as a whole ([`crate::ReplySource::address`]).
    pub fn address(addr: Ipv6Bytes) -> Self {
        Self {
            addr,
            ..Self::default()
        }
    }
}

/// Key of `LB6_AFFINITY`; see [`crate::AffinityKey`]. Exactly one of
/// `client_addr` and `client_netns` is non-zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Affinity6Key {
    pub service_id: u32,
    pub client_addr: Ipv6Bytes,
    pub _pad: u32,
    pub client_netns: u64,
}

/// Key of `LB6_SOCK_REVNAT`; see [`crate::SockRevNatKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNat6Key {
    pub cookie: u64,
    pub backend_addr: Ipv6Bytes,
    /// Network byte order.
    pub backend_port: u16,
    pub _pad: [u8; 6],
}

/// Value of `LB6_SOCK_REVNAT`; see [`crate::SockRevNatEntry`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockRevNat6Entry {
    pub service_addr: Ipv6Bytes,
    pub service_port: u16,
    pub _pad: u16,
    pub service_id: u32,
}

/// Key of `CT6_TCP` and `CT6_OTHER`; see [`crate::CtKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Ct6Key {
    pub src_addr: Ipv6Bytes,
    pub dst_addr: Ipv6Bytes,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// One of [`crate::ct_dir`].
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Value of `CT6_TCP` and `CT6_OTHER`; the fields mean what they mean in
/// [`crate::CtEntry`], including the atomically ORed `state` word.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Ct6Entry {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub client_addr: Ipv6Bytes,
    pub service_addr: Ipv6Bytes,
    pub backend_addr: Ipv6Bytes,
    pub client_port: u16,
    pub service_port: u16,
    pub backend_port: u16,
    pub proto: u8,
    pub _pad0: u8,
    /// One of [`crate::ct_state`]; starts the aligned word the datapath
    /// ORs state and flag bits into (with `flags`, padding and
    /// `service_id`).
    pub state: u8,
    /// Bits of [`crate::ct_flags`].
    pub flags: u8,
    pub _pad: [u8; 2],
    pub service_id: u32,
    /// Id in `LB6_BACKENDS`.
    pub backend_id: u32,
    pub _pad1: u32,
}

const _: () = assert!(core::mem::offset_of!(Ct6Entry, state) % 8 == 0);
const _: () =
    assert!(core::mem::offset_of!(Ct6Entry, flags) == core::mem::offset_of!(Ct6Entry, state) + 1);

impl Ct6Entry {
    #[inline(always)]
    pub fn lifetime_ns(&self, lifetimes: &CtLifetimes) -> u64 {
        lifetimes.lifetime_ns(self.proto, self.state)
    }

    #[inline(always)]
    pub fn is_expired(&self, now_ns: u64, lifetimes: &CtLifetimes) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.lifetime_ns(lifetimes)
    }

    /// Key of this flow's ORIGINAL entry (client -> service).
    #[inline(always)]
    pub fn original_key(&self) -> Ct6Key {
        Ct6Key {
            src_addr: self.client_addr,
            dst_addr: self.service_addr,
            src_port: self.client_port,
            dst_port: self.service_port,
            proto: self.proto,
            direction: ct_dir::ORIGINAL,
            _pad: [0; 2],
        }
    }

    /// Key of this flow's REPLY entry (backend -> client, or -> service
    /// address in a hairpin flow).
    #[inline(always)]
    pub fn reply_key(&self) -> Ct6Key {
        let dst_addr = if self.flags & ct_flags::HAIRPIN != 0 {
            self.service_addr
        } else {
            self.client_addr
        };
        Ct6Key {
            src_addr: self.backend_addr,
            dst_addr,
            src_port: self.backend_port,
            dst_port: self.client_port,
            proto: self.proto,
            direction: ct_dir::REPLY,
            _pad: [0; 2],
        }
    }
}

/// Key of `CT6_FRAGMENTS`: one fragmented datagram as IPv6 tells them
/// apart (RFC 8200: source, destination, identification; the upper-layer
/// protocol of the fragmentable part added so ports of different protocols
/// never mix). Value: [`crate::FragPorts`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Frag6Key {
    pub src_addr: Ipv6Bytes,
    pub dst_addr: Ipv6Bytes,
    /// Fragment header identification, network byte order.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Key of `NAT6`: a tuple as it arrives on the uplink; see
/// [`crate::NatKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Nat6Key {
    pub src_addr: Ipv6Bytes,
    pub dst_addr: Ipv6Bytes,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// One of [`crate::nat_dir`].
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Value of `NAT6`: an external IPv6 flow to a remote backend, DNATed and
/// SNATed to this node's IPv6 address; the fields mean what they mean in
/// [`crate::NatEntry`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Nat6Entry {
    pub last_seen_ns: u64,
    pub client_addr: Ipv6Bytes,
    pub frontend_addr: Ipv6Bytes,
    pub backend_addr: Ipv6Bytes,
    pub nat_addr: Ipv6Bytes,
    pub client_port: u16,
    pub frontend_port: u16,
    pub backend_port: u16,
    pub nat_port: u16,
    /// Id in `LB6_BACKENDS`.
    pub backend_id: u32,
    pub service_id: u32,
    pub proto: u8,
    /// One of [`crate::ct_state`]; plain stores.
    pub state: u8,
    pub _pad: [u8; 2],
    /// As [`crate::NatEntry::hop`].
    pub hop: crate::HopCache,
}

impl Nat6Entry {
    #[inline(always)]
    pub fn lifetime_ns(&self, lifetimes: &CtLifetimes) -> u64 {
        lifetimes.lifetime_ns(self.proto, self.state)
    }

    #[inline(always)]
    pub fn is_expired(&self, now_ns: u64, lifetimes: &CtLifetimes) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.lifetime_ns(lifetimes)
    }

    /// Client -> frontend.
    #[inline(always)]
    pub fn original_key(&self) -> Nat6Key {
        Nat6Key {
            src_addr: self.client_addr,
            dst_addr: self.frontend_addr,
            src_port: self.client_port,
            dst_port: self.frontend_port,
            proto: self.proto,
            direction: nat_dir::ORIGINAL,
            _pad: [0; 2],
        }
    }

    /// Backend -> this node's SNAT address and port: what reserves the
    /// port.
    #[inline(always)]
    pub fn reply_key(&self) -> Nat6Key {
        Nat6Key {
            src_addr: self.backend_addr,
            dst_addr: self.nat_addr,
            src_port: self.backend_port,
            dst_port: self.nat_port,
            proto: self.proto,
            direction: nat_dir::REPLY,
            _pad: [0; 2],
        }
    }
}

/// Value of `NAT6_CONFIG` (one entry, written by the agent): this node's
/// IPv6 SNAT address; all zero: none, external IPv6 connections to remote
/// backends are refused and counted. The port range is `NAT_CONFIG`'s
/// (one range, reserved once for both families).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Nat6Config {
    pub snat_addr: Ipv6Bytes,
}

/// Key of the `SOURCE_RANGES6` LPM trie: an IPv6
/// `loadBalancerSourceRanges` prefix of one service; see
/// [`crate::SourceRangeKey`] (`prefix_len` is 32 plus the prefix's own
/// length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRange6Key {
    pub prefix_len: u32,
    /// Network byte order.
    pub service_id_be: u32,
    pub addr: Ipv6Bytes,
}

/// The 4-tuple of a traced IPv6 packet; ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Trace6Tuple {
    pub src_addr: Ipv6Bytes,
    pub dst_addr: Ipv6Bytes,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Value of `TRACE6_SCRATCH` (per CPU): what an IPv6 packet's trace needs
/// from its arrival, so that the packet reads `TRACE_CONFIG` once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Trace6Scratch {
    /// The packet's tuple as parsed, before any translation.
    pub before: Trace6Tuple,
    /// Non-zero from the arrival of a packet with IPv6 tracing on to its
    /// trace, which clears it.
    pub armed: u32,
    /// `TraceConfig::addr6_a` and `addr6_b` when the packet arrived.
    pub addr_a: Ipv6Bytes,
    pub addr_b: Ipv6Bytes,
}

/// An IPv6 event on `TRACE_EVENTS`, beside the IPv4 [`crate::TraceEvent`]
/// records: the same header (through `backend_id`), with [`Self::family`]
/// where the IPv4 record has a zero byte, then the socket fields, then the
/// tuples.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceEvent6 {
    pub ts_ns: u64,
    pub ifindex: u32,
    pub hook: u8,
    pub proto: u8,
    pub decision: u8,
    /// Always [`TraceEvent6::FAMILY`].
    pub family: u8,
    pub service_id: u32,
    pub backend_id: u32,
    pub netns_cookie: u64,
    pub cgroup_id: u64,
    pub before: Trace6Tuple,
    pub after: Trace6Tuple,
}

impl TraceEvent6 {
    pub const FAMILY: u8 = 6;
}

const _: () = assert!(
    core::mem::offset_of!(TraceEvent6, family) == core::mem::offset_of!(crate::TraceEvent, _pad)
);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: #[repr(C)] and bytemuck::Pod (no padding holes, any bit
    // pattern valid), which is exactly what aya::Pod requires.
    unsafe impl aya::Pod for Service6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ReplySource6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Affinity6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevNat6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevNat6Entry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Ct6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Ct6Entry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Frag6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Nat6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Nat6Entry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Nat6Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceRange6Key {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn ipv6_layouts_have_the_sizes_the_datapath_was_verified_with() {
        assert_eq!(size_of::<Service6Key>(), 20);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(size_of::<ReplySource6>(), 20);
        assert_eq!(size_of::<Affinity6Key>(), 32);
        assert_eq!(size_of::<SockRevNat6Key>(), 32);
        assert_eq!(size_of::<SockRevNat6Entry>(), 24);
        assert_eq!(size_of::<Ct6Key>(), 40);
        assert_eq!(size_of::<Ct6Entry>(), 88);
        assert_eq!(size_of::<Frag6Key>(), 40);
        assert_eq!(size_of::<TraceEvent6>(), 112);
        assert_eq!(size_of::<Nat6Key>(), 40);
        assert_eq!(size_of::<Nat6Entry>(), 112);
        assert_eq!(size_of::<Nat6Config>(), 16);
        assert_eq!(size_of::<SourceRange6Key>(), 24);
    }

    #[test]
    fn reply_key_of_a_hairpin_flow_is_addressed_to_the_service() {
        let mut e = Ct6Entry {
            client_addr: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            service_addr: [0xfd, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
            backend_addr: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
            client_port: 1000u16.to_be(),
            backend_port: 8080u16.to_be(),
            proto: crate::IPPROTO_TCP,
            ..Default::default()
        };
        assert_eq!(e.reply_key().dst_addr, e.client_addr);
        e.flags |= ct_flags::HAIRPIN;
        let reply = e.reply_key();
        assert_eq!(reply.dst_addr, e.service_addr);
        assert_eq!(reply.src_addr, e.backend_addr);
        assert_eq!(reply.dst_port, e.client_port);
        assert_eq!(e.original_key().dst_addr, e.service_addr);
    }
}
