//! Conntrack behaviours of the upstream e2e suite (`conntrack.go`) that are
//! not about endpoint changes (those are in `changes.rs`).

use std::net::{Ipv4Addr, SocketAddr};

use dataplane_lab::{traffic, CrossNode, Topology};
use integration_tests::{http, lab_pod, require_root, web, Cluster, WEB_IP};

/// One's-complement sum of `bytes` (RFC 1071), folded, not inverted.
fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A TCP segment `from -> to` with ACK and PSH, sequence number `seq`, and
/// `payload`, its checksum filled.
fn segment(from: SocketAddr, to: SocketAddr, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
        panic!("IPv4 only");
    };
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&from.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&64_000u16.to_be_bytes());
    tcp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&from.ip().octets());
    pseudo.extend_from_slice(&to.ip().octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let csum = !ones_sum(&pseudo);
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    tcp
}

/// Upstream: "proxy implementation should not be vulnerable to the invalid
/// conntrack state bug". A backend's segment far outside the TCP window
/// (which netfilter marks INVALID, and kube-proxy once let through without
/// its reverse translation) must still come from the service: were it
/// delivered from the backend's own address, the client's stack would
/// answer it with a RST to the backend and the connection would die.
#[test]
fn out_of_window_segment_from_the_backend_does_not_reset_the_connection() {
    require_root();
    let backend = lab_pod("web-a");
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[&backend]))],
    );
    let (step_tx, step_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let client = dataplane_lab::netns::spawn_in_netns(&c.lab.pod_ns("client"), move || {
        let mut conn = traffic::TcpConn::open(http(WEB_IP)).expect("connect");
        let local = conn.local_addr().expect("local address");
        seen_tx.send((conn.request(), Some(local))).unwrap();
        if step_rx.recv().is_ok() {
            seen_tx.send((conn.request(), None)).unwrap();
        }
    })
    .unwrap();
    let (before, local) = seen_rx.recv().unwrap();
    assert_eq!(before.backend(), Some("web-a"), "{before:?}\n{}", c.logs());
    let local = local.expect("the client's address");

    // From the backend's port to the client's, far outside any window.
    let from = SocketAddr::from((backend.ip(), traffic::TCP_PORT));
    let boom = segment(from, local, 0x8000_0000, 0x1234_5678, b"boom");
    let SocketAddr::V4(client_addr) = local else {
        unreachable!()
    };
    let client_ip: Ipv4Addr = *client_addr.ip();
    for _ in 0..3 {
        let boom = boom.clone();
        c.in_pod("web-a", move || traffic::send_raw_tcp(client_ip, &boom))
            .expect("sending the out-of-window segment");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    step_tx.send(()).unwrap();
    let (after, _) = seen_rx.recv().unwrap();
    client.join().unwrap();

    assert_eq!(
        after.backend(),
        Some("web-a"),
        "the connection still answers after the invalid segment: {after:?}\n{}",
        c.logs()
    );
}
