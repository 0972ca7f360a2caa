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
