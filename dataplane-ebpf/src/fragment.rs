//! IPv4 fragments: the first fragment of a datagram carries its L4 header,
//! the later ones do not. The first one's ports are recorded under the
//! datagram's (source, destination, id, protocol), as Cilium's fragment map
//! does, so the later ones are looked up in conntrack and translated like
//! it (`parse` reads them back). IPv6 fragments (fragment extension
//! header) the same way, in `CT6_FRAGMENTS`.

use dataplane_common::FragPorts;

use crate::{maps::frag_insert, parse::Ipv4Flow};

/// Records the ports of a first fragment's datagram, keyed as its later
/// fragments will arrive (before any translation).
#[inline(always)]
pub fn frag4_track(flow: &Ipv4Flow) {
    frag_insert(
        &flow.frag_key(),
        &FragPorts {
            src_port: flow.src_port,
            dst_port: flow.dst_port,
        },
    );
}

/// [`frag4_track`] for an IPv6 datagram (its fragment header's id), in
/// `CT6_FRAGMENTS`.
#[inline(never)]
pub fn frag6_track(flow: &crate::parse6::Ipv6Flow) {
    crate::maps::frag6_insert(
        &flow.frag_key(),
        &FragPorts {
            src_port: flow.src_port,
            dst_port: flow.dst_port,
        },
    );
}
