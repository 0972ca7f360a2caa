//! Backend servers that answer with their pod's name, and clients that
//! report which backend answered and from what address.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;
const TIMEOUT: Duration = Duration::from_secs(3);

/// Serves forever on the calling thread's netns: TCP 8080 answers each line
/// with `name`, UDP 5353 answers each datagram with `name`.
pub fn serve(name: String) -> std::io::Result<()> {
    Server::bind(name)?.run();
    Ok(())
}

/// Starts a backend `name` on threads inside netns `ns` and returns once
/// its sockets are bound (no race with the first request). The threads live
/// as long as the process.
pub fn spawn_server(ns: &str, name: &str) -> anyhow::Result<()> {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let name = name.to_owned();
    crate::netns::spawn_in_netns(ns, move || match Server::bind(name) {
        Ok(server) => {
            let _ = bound_tx.send(Ok(()));
            server.run();
        }
        Err(e) => {
            let _ = bound_tx.send(Err(e));
        }
    })?;
    bound_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("server thread in {ns} died"))?
        .map_err(|e| anyhow::anyhow!("binding the server in {ns}: {e}"))
}

/// Waits until something listens on TCP [`TCP_PORT`] inside netns `ns`
/// (a server process started with `ip netns exec`).
pub fn wait_listening(ns: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let probe = || {
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], TCP_PORT)), TIMEOUT).is_ok()
    };
    while !crate::netns::in_netns(ns, probe)? {
        if Instant::now() > deadline {
            anyhow::bail!("nothing listens on port {TCP_PORT} in {ns} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A backend's bound sockets.
pub struct Server {
    name: String,
    tcp: TcpListener,
    udp: UdpSocket,
}

impl Server {
    /// Binds both families: `[::]` takes IPv4 too (as IPv4-mapped
    /// addresses, shown in their IPv4 form).
    pub fn bind(name: String) -> std::io::Result<Self> {
        Ok(Self {
            tcp: TcpListener::bind(("::", TCP_PORT))?,
            udp: UdpSocket::bind(("::", UDP_PORT))?,
            name,
        })
    }

    /// Answers forever (UDP on a thread of its own, a thread per TCP
    /// connection).
    pub fn run(self) {
        let Self { name, tcp, udp } = self;
        let udp_name = name.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(reply(&udp_name, &buf[..n], peer).as_bytes(), peer);
            }
        });
        for stream in tcp.incoming() {
            let Ok(stream) = stream else { continue };
            let name = name.clone();
            std::thread::spawn(move || answer(stream, &name));
        }
    }
}

/// The answer to one request: the backend's name, and after it the
/// client's address as it arrived when the request asks `peer?` (to show
/// whether the client's address was kept or SNATed).
fn reply(name: &str, request: &[u8], peer: SocketAddr) -> String {
    // An IPv4 client of the dual-stack socket as itself, not `::ffff:a.b.c.d`.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    if request.starts_with(PEER_REQUEST) {
        format!("{name} {peer}\n")
    } else {
        format!("{name}\n")
    }
}

const PEER_REQUEST: &[u8] = b"peer?";

/// One answer per request until the client closes; an HTTP GET (curl in
/// the lab) gets a proper HTTP answer and a close.
fn answer(mut stream: TcpStream, name: &str) {
    let peer = stream
        .peer_addr()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut buf = [0u8; 1500];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        if buf.starts_with(b"GET ") {
            let body = format!("{name}\n");
            let response = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
            break;
        }
        if stream
            .write_all(reply(name, &buf[..n], peer).as_bytes())
            .is_err()
        {
            break;
        }
    }
}

/// What a client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answered by this backend, from this address (the service's, if the
    /// reply was translated).
    Answered {
        backend: String,
        from: SocketAddr,
    },
    /// Connection refused (RST or ICMP port unreachable).
    Refused,
    /// Connection reset after it was established.
    Reset,
    Timeout,
    Other(String),
}

impl Outcome {
    pub fn backend(&self) -> Option<&str> {
        match self {
            Outcome::Answered { backend, .. } => Some(backend),
            _ => None,
        }
    }
}

fn classify(e: std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => Outcome::Reset,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Timeout,
        _ => Outcome::Other(e.to_string()),
    }
}

/// One TCP connection, one request, one answer.
pub fn tcp_request(to: SocketAddr) -> Outcome {
    match TcpConn::open(to) {
        Ok(mut conn) => conn.request(),
        Err(outcome) => outcome,
    }
}

/// A TCP connection kept open for several requests (stickiness).
pub struct TcpConn {
    stream: TcpStream,
}

impl TcpConn {
    pub fn open(to: SocketAddr) -> Result<Self, Outcome> {
        let stream = TcpStream::connect_timeout(&to, TIMEOUT).map_err(classify)?;
        stream.set_read_timeout(Some(TIMEOUT)).map_err(classify)?;
        Ok(Self { stream })
    }

    /// The client's end of the connection.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    pub fn request(&mut self) -> Outcome {
        if let Err(e) = self.stream.write_all(b"hello\n") {
            return classify(e);
        }
        let mut buf = [0u8; 256];
        match self.stream.read(&mut buf) {
            Ok(0) => Outcome::Reset,
            Ok(n) => Outcome::Answered {
                backend: String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
                from: self
                    .stream
                    .peer_addr()
                    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            },
            Err(e) => classify(e),
        }
    }
}

/// A connected UDP socket: an ICMP port unreachable shows up as refused.
pub struct UdpConn {
    socket: UdpSocket,
}

impl UdpConn {
    pub fn open(to: SocketAddr) -> std::io::Result<Self> {
        let any: std::net::IpAddr = if to.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        let socket = UdpSocket::bind((any, 0))?;
        socket.connect(to)?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        Ok(Self { socket })
    }

    pub fn request(&self) -> Outcome {
        if let Err(e) = self.socket.send(b"hello") {
            return classify(e);
        }
        let mut buf = [0u8; 256];
        match self.socket.recv_from(&mut buf) {
            Ok((n, from)) => Outcome::Answered {
                backend: String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
                from,
            },
            Err(e) => classify(e),
        }
    }
}

/// Which backend answered a client, and the client address it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub backend: String,
    /// The client's address and port as the backend saw them.
    pub client: SocketAddr,
    /// Where the answer came from, as the client saw it.
    pub from: SocketAddr,
}

fn seen(answer: &[u8], from: SocketAddr) -> Result<Seen, Outcome> {
    let text = String::from_utf8_lossy(answer);
    let mut words = text.split_whitespace();
    let backend = words.next().unwrap_or_default().to_owned();
    let client = words
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| Outcome::Other(format!("answer without a peer: {text:?}")))?;
    Ok(Seen {
        backend,
        client,
        from,
    })
}

/// One TCP connection asking the backend who it saw.
pub fn tcp_seen(to: SocketAddr) -> Result<Seen, Outcome> {
    let mut conn = TcpConn::open(to)?;
    conn.stream.write_all(PEER_REQUEST).map_err(classify)?;
    let mut buf = [0u8; 256];
    match conn.stream.read(&mut buf) {
        Ok(0) => Err(Outcome::Reset),
        Ok(n) => seen(
            &buf[..n],
            conn.stream
                .peer_addr()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        ),
        Err(e) => Err(classify(e)),
    }
}

/// One UDP datagram asking the backend who it saw.
pub fn udp_seen(to: SocketAddr) -> Result<Seen, Outcome> {
    let conn = UdpConn::open(to).map_err(classify)?;
    conn.socket.send(PEER_REQUEST).map_err(classify)?;
    let mut buf = [0u8; 256];
    match conn.socket.recv_from(&mut buf) {
        Ok((n, from)) => seen(&buf[..n], from),
        Err(e) => Err(classify(e)),
    }
}

pub fn udp_request(to: SocketAddr) -> Outcome {
    match UdpConn::open(to) {
        Ok(conn) => conn.request(),
        Err(e) => classify(e),
    }
}

/// Sends `segment` (a TCP header with its checksum, and payload) in an IPv4
/// packet to `to`, from this netns's address: a peer misbehaving on
/// purpose, for tests.
pub fn send_raw_tcp(to: std::net::Ipv4Addr, segment: &[u8]) -> std::io::Result<()> {
    use nix::sys::socket::{
        sendto, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
    };
    use std::os::fd::AsRawFd as _;

    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::Tcp,
    )?;
    let addr = SockaddrIn::from(std::net::SocketAddrV4::new(to, 0));
    sendto(fd.as_raw_fd(), segment, &addr, MsgFlags::empty())?;
    Ok(())
}
