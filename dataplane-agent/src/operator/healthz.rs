//! `/healthz` as kube-proxy serves it (port 10256): 503 until the first
//! full sync has reached the maps; then 200 while changes are applied in
//! time, and 503 when a change from the source has been waiting longer than
//! the timeout (kube-proxy: an update queued and not synced within
//! `healthzTimeout`). An idle agent with nothing to apply stays healthy.
//! The body carries `lastUpdated` and `currentTime` either way.

use std::{net::SocketAddr, time::SystemTime};

use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde::Serialize;

use crate::control::health::Health;
use crate::operator::http::{self, ServeError};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HealthBody {
    last_updated: Option<String>,
    current_time: String,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn respond(health: &Health, now: SystemTime) -> (StatusCode, Json<HealthBody>) {
    let (healthy, last) = health.status_at(now);
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(HealthBody {
            last_updated: last.map(rfc3339),
            current_time: rfc3339(now),
        }),
    )
}

async fn healthz(State(health): State<Health>) -> (StatusCode, Json<HealthBody>) {
    respond(&health, SystemTime::now())
}

pub async fn serve(addr: SocketAddr, health: Health) -> Result<(), ServeError> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .with_state(health);
    http::serve("healthz", addr, app).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000 + s)
    }

    fn status(health: &Health, now: SystemTime) -> StatusCode {
        respond(health, now).0
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(at(0)), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn unhealthy_until_first_sync() {
        let health = Health::new(Duration::from_secs(60));
        assert_eq!(status(&health, at(0)), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(respond(&health, at(0)).1.last_updated, None);
        health.synced_at(at(1));
        assert_eq!(status(&health, at(2)), StatusCode::OK);
    }

    #[test]
    fn idle_agent_stays_healthy_however_long_since_the_last_sync() {
        let health = Health::new(Duration::from_secs(60));
        health.synced_at(at(0));
        assert_eq!(status(&health, at(86_400)), StatusCode::OK);
    }

    #[test]
    fn change_waiting_past_the_timeout_makes_it_unhealthy_until_applied() {
        let health = Health::new(Duration::from_secs(60));
        health.synced_at(at(0));
        health.queued_at(at(100));
        // Later changes do not move the oldest one.
        health.queued_at(at(150));
        assert_eq!(status(&health, at(159)), StatusCode::OK, "not late yet");
        let (code, body) = respond(&health, at(161));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body.last_updated.as_deref(), Some("2026-11-18T11:06:40Z"));
        assert_eq!(body.current_time, "2026-11-18T11:09:21Z");
        health.synced_at(at(170));
        assert_eq!(status(&health, at(171)), StatusCode::OK);
    }
}
