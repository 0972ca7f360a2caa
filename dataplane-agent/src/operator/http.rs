//! The one small HTTP server `/healthz` and `/metrics` are served through.

use std::net::SocketAddr;

use axum::Router;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving {what} on {addr}")]
    Serve {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Serves `app` on `addr` until the task is dropped; `what` names it in
/// errors.
pub async fn serve(what: &'static str, addr: SocketAddr, app: Router) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })?;
    axum::serve(listener, app)
        .await
        .map_err(|source| ServeError::Serve { what, addr, source })
}

/// [`serve`] on an IPv6 `addr` for IPv6 only (`IPV6_V6ONLY`, whatever
/// `net.ipv6.bindv6only` says), beside the same port served on IPv4.
pub async fn serve_ipv6_only(
    what: &'static str,
    addr: SocketAddr,
    app: Router,
) -> Result<(), ServeError> {
    let bind = || -> std::io::Result<tokio::net::TcpListener> {
        let socket = tokio::net::TcpSocket::new_v6()?;
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    let listener = bind().map_err(|source| ServeError::Bind { what, addr, source })?;
    axum::serve(listener, app)
        .await
        .map_err(|source| ServeError::Serve { what, addr, source })
}
