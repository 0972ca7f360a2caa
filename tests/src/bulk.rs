//! Bulk transfers for path MTU tests: a server in a pod that streams a
//! given number of bytes, a client that counts them, and the path MTU a
//! namespace has learnt.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

/// A server on `bind` in netns `ns`: a line `down N` is answered with N
/// bytes, then the connection closes.
pub fn serve_downloads(ns: &str, bind: SocketAddr) {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    dataplane_lab::netns::spawn_in_netns(ns, move || {
        let listener = TcpListener::bind(bind).expect("binding the bulk server");
        bound_tx.send(()).expect("test waiting");
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = answer_download(stream);
            });
        }
    })
    .expect("bulk server thread");
    bound_rx.recv().expect("bulk server bound");
}

fn answer_download(stream: TcpStream) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    let n = line
        .strip_prefix("down ")
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let mut stream = stream;
    std::io::copy(&mut std::io::repeat(b'x').take(n), &mut stream).map(drop)
}

/// Asks the server at `to` for `n` bytes; how many arrived before it
/// closed. An error when nothing moves for 10 s (a stalled transfer).
pub fn download(to: SocketAddr, n: usize) -> std::io::Result<usize> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("down {n}\n").as_bytes())?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    Ok(got.len())
}

/// The path MTU netns `ns` has learnt towards `to` (`None` while it uses
/// the link's), as `ip route get` shows it.
pub fn learnt_mtu(ns: &str, to: IpAddr) -> Option<u32> {
    let out = dataplane_lab::netns::output("ip", &["-n", ns, "route", "get", &to.to_string()])
        .expect("ip route get");
    let mut words = out.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}
