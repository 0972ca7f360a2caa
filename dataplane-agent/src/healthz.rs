//! `/healthz` as kube-proxy serves it: 503 until the first full sync has
//! reached the maps, then 200 with the time of the last sync.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::Context as _;
use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde::Serialize;

#[derive(Debug, Default, Clone)]
pub struct Health(Arc<Mutex<Option<SystemTime>>>);

impl Health {
    pub fn synced(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
    }

    fn last_synced(&self) -> Option<SystemTime> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HealthBody {
    last_updated: Option<String>,
    current_time: String,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn healthz(State(health): State<Health>) -> (StatusCode, Json<HealthBody>) {
    let last = health.last_synced();
    let status = if last.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(HealthBody {
            last_updated: last.map(rfc3339),
            current_time: rfc3339(SystemTime::now()),
        }),
    )
}

pub async fn serve(addr: SocketAddr, health: Health) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding healthz on {addr}"))?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .with_state(health);
    axum::serve(listener, app).await.context("serving healthz")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40Z");
    }

    #[tokio::test]
    async fn unhealthy_until_first_sync() {
        let health = Health::default();
        assert_eq!(
            healthz(State(health.clone())).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.synced();
        assert_eq!(healthz(State(health)).await.0, StatusCode::OK);
    }
}
