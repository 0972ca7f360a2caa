//! A client process for the socket-level load balancing tests: the socket
//! hooks see processes (by cgroup), not the test's threads, so the tests
//! run this inside a node's or pod's netns and the node's cgroup.
//!
//! `sockclient MODE ADDR [N]` makes N requests (default 1) and prints one
//! outcome per line (see `integration_tests::parse_outcome`):
//! - `tcp`: a new TCP connection each, the answer and `getpeername()`;
//! - `udp`: a new connected UDP socket each, the answer and its source;
//! - `udp-unconnected`: one unconnected socket, `sendto()`/`recvfrom()`;
//! - `tcp-hold` / `udp-hold`: one connection or connected socket, one
//!   request per line read on stdin, until stdin closes.

use std::{
    io::{BufRead as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use dataplane_lab::traffic::{self, Outcome, TcpConn, UdpConn};

fn line(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Answered { backend, from } => format!("answered {backend} {from}"),
        Outcome::Refused => "refused".into(),
        Outcome::Reset => "reset".into(),
        Outcome::Timeout => "timeout".into(),
        Outcome::Other(e) => format!("other {e}"),
    }
}

fn say(outcome: &Outcome) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line(outcome));
    let _ = out.flush();
}

fn io_outcome(e: &std::io::Error) -> Outcome {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Outcome::Timeout,
        std::io::ErrorKind::ConnectionReset => Outcome::Reset,
        _ => Outcome::Other(e.to_string()),
    }
}

fn unconnected(socket: &UdpSocket, to: SocketAddr) -> Outcome {
    if let Err(e) = socket.send_to(b"hello", to) {
        return io_outcome(&e);
    }
    let mut buf = [0u8; 256];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => Outcome::Answered {
            backend: String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
            from,
        },
        Err(e) => io_outcome(&e),
    }
}

fn each_stdin_line(mut request: impl FnMut() -> Outcome) {
    for input in std::io::stdin().lock().lines() {
        if input.is_err() {
            break;
        }
        say(&request());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(addr)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: sockclient tcp|udp|udp-unconnected|tcp-hold|udp-hold ADDR [N]");
        std::process::exit(2);
    };
    let to: SocketAddr = addr.parse().expect("ADDR as IP:PORT");
    let n: usize = args.get(3).map_or(1, |n| n.parse().expect("N"));
    match mode.as_str() {
        "tcp" => (0..n).for_each(|_| say(&traffic::tcp_request(to))),
        "udp" => (0..n).for_each(|_| say(&traffic::udp_request(to))),
        "udp-unconnected" => {
            let any: IpAddr = if to.is_ipv6() {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            let socket = UdpSocket::bind((any, 0)).expect("binding");
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            (0..n).for_each(|_| say(&unconnected(&socket, to)));
        }
        "tcp-hold" => match TcpConn::open(to) {
            Ok(mut conn) => each_stdin_line(|| conn.request()),
            Err(outcome) => say(&outcome),
        },
        "udp-hold" => match UdpConn::open(to) {
            Ok(conn) => each_stdin_line(|| conn.request()),
            Err(e) => say(&io_outcome(&e)),
        },
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}
