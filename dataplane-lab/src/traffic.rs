//! Backend servers that answer with their pod's name, and clients that
//! report which backend answered and from what address.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;
const TIMEOUT: Duration = Duration::from_secs(3);

/// Serves forever on the calling thread's netns: TCP 8080 answers each line
/// with `name`, UDP 5353 answers each datagram with `name`.
pub fn serve(name: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", TCP_PORT))?;
    let udp = UdpSocket::bind(("0.0.0.0", UDP_PORT))?;
    let udp_name = name.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(udp_name.as_bytes(), peer);
        }
    });
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            // One answer per request until the client closes; an HTTP GET
            // (curl in the lab) gets a proper HTTP answer and a close.
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
                if stream.write_all(format!("{name}\n").as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
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
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
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

pub fn udp_request(to: SocketAddr) -> Outcome {
    match UdpConn::open(to) {
        Ok(conn) => conn.request(),
        Err(e) => classify(e),
    }
}
