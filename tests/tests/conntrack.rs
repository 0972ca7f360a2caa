//! Conntrack behaviours of the upstream e2e suite (`conntrack.go`) that are
//! not about endpoint changes (those are in `changes.rs`).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

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

/// TCP segments from `from` with `payload` that reach netns `ns`'s stack
/// within `window` (a raw socket sees every TCP packet delivered locally),
/// counted once `ready` is signalled.
fn count_delivered(
    ns: &str,
    from: Ipv4Addr,
    payload: &'static [u8],
    window: Duration,
    ready: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<usize> {
    use nix::sys::socket::{
        recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
        SockType,
    };
    use std::os::fd::AsRawFd as _;
    dataplane_lab::netns::spawn_in_netns(ns, move || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Tcp,
        )
        .expect("raw TCP socket");
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )
        .expect("receive timeout");
        ready.send(()).unwrap();
        let deadline = std::time::Instant::now() + window;
        let mut count = 0;
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < deadline {
            let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
                continue;
            };
            let packet = &buf[..n];
            let header = usize::from(packet[0] & 0x0f) * 4;
            let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            if source == from && packet[header..].ends_with(payload) {
                count += 1;
            }
        }
        count
    })
    .expect("sniffer thread")
}

/// Upstream: "proxy implementation should not be vulnerable to the invalid
/// conntrack state bug". A backend's segment far outside the TCP window
/// (which netfilter marks INVALID, and kube-proxy once let through without
/// its reverse translation) must not reach the client from the backend's
/// own address: the client's stack would answer it with a RST to the
/// backend, which can kill the connection. Dropped or translated, either
/// is fine; the connection keeps working.
#[test]
fn proxy_implementation_should_not_be_vulnerable_to_the_invalid_conntrack_state_bug() {
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
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sniffer = count_delivered(
        &c.lab.pod_ns("client"),
        backend.ip(),
        b"boom",
        Duration::from_millis(1500),
        ready_tx,
    );
    ready_rx.recv().expect("the sniffer runs");
    for _ in 0..3 {
        let boom = boom.clone();
        c.in_pod("web-a", move || traffic::send_raw_tcp(client_ip, &boom))
            .expect("sending the out-of-window segment");
    }
    let untranslated = sniffer.join().expect("sniffer");
    assert_eq!(
        untranslated,
        0,
        "out-of-window segments reached the client from the backend's address\n{}",
        c.logs()
    );
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
