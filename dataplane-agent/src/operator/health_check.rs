//! `healthCheckNodePort`s, answered as kube-proxy answers them, so cloud
//! load balancers steer around nodes without a local endpoint of a
//! `externalTrafficPolicy: Local` service: 200 with the JSON body naming
//! the service and its `localEndpoints` when this node has ready ones, 503
//! (same body) when it has none or only terminating ones. The count covers
//! both families (see `ClusterState::health_checks`).
//!
//! The control loop publishes the list; one listener per port follows it.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use log::{info, warn};
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};

use crate::{control::model::HealthCheck, operator::http};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    service: ServiceRef,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceRef {
    namespace: String,
    name: String,
}

type Checks = Arc<RwLock<HashMap<u16, HealthCheck>>>;

/// Status and JSON body for one check.
pub fn respond(check: &HealthCheck) -> (StatusCode, String) {
    let body = Body {
        service: ServiceRef {
            namespace: check.service.namespace.to_string(),
            name: check.service.name.to_string(),
        },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: true,
    };
    let status = if check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        serde_json::to_string(&body).expect("plain struct serializes"),
    )
}

async fn answer(State((checks, port)): State<(Checks, u16)>) -> impl IntoResponse {
    let check = checks.read().expect("not poisoned").get(&port).cloned();
    let (status, body) = match check {
        Some(check) => respond(&check),
        None => (StatusCode::SERVICE_UNAVAILABLE, String::new()),
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// Serves every health check `updates` lists, on `bind` (all addresses by
/// default) and on `bind6` too if given, until the sender is dropped.
pub async fn run(
    bind: Ipv4Addr,
    bind6: Option<Ipv6Addr>,
    mut updates: watch::Receiver<Vec<HealthCheck>>,
) {
    let checks: Checks = Arc::default();
    let mut servers: HashMap<u16, JoinHandle<()>> = HashMap::new();
    loop {
        let wanted: HashMap<u16, HealthCheck> = updates
            .borrow_and_update()
            .iter()
            .map(|c| (c.port, c.clone()))
            .collect();
        servers.retain(|port, task| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                info!("health check node port {port}: closed");
            }
            keep
        });
        for (&port, check) in &wanted {
            if servers.contains_key(&port) {
                continue;
            }
            let app = Router::new()
                .fallback(get(answer))
                .with_state((checks.clone(), port));
            let addr = SocketAddr::from((bind, port));
            let addr6 = bind6.map(|ip| SocketAddr::from((ip, port)));
            info!("health check node port {port}: serving {}", check.service);
            servers.insert(
                port,
                tokio::spawn(async move {
                    const WHAT: &str = "health check node port";
                    let ipv4 = http::serve(WHAT, addr, app.clone());
                    let ipv6 = async {
                        match addr6 {
                            Some(addr6) => http::serve_ipv6_only(WHAT, addr6, app).await,
                            None => Ok(()),
                        }
                    };
                    let (ipv4, ipv6) = tokio::join!(ipv4, ipv6);
                    for e in [ipv4.err(), ipv6.err()].into_iter().flatten() {
                        warn!("{:#}", anyhow::Error::from(e));
                    }
                }),
            );
        }
        *checks.write().expect("not poisoned") = wanted;
        if updates.changed().await.is_err() {
            break;
        }
    }
    for task in servers.into_values() {
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::model::ObjectRef;

    fn check(n: usize) -> HealthCheck {
        HealthCheck {
            port: 32000,
            service: ObjectRef {
                namespace: "default".into(),
                name: "web".into(),
            },
            local_endpoints: n,
        }
    }

    #[test]
    fn local_endpoints_answer_200_with_their_count_and_none_503() {
        let (status, body) = respond(&check(2));
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["namespace"], "default");
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 2);
        let (status, body) = respond(&check(0));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 0);
    }
}
