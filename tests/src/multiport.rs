//! Upstream "should serve multiport endpoints from pods", for either
//! family: two service ports with named target ports, which each endpoint
//! resolves to its own number (its slice's ports). web-a serves `web` on
//! 8080 and `alt` on 9090; web-b `web` on 9191 and `alt` on 8080.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use dataplane_lab::manifests::{self, Port};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::{lab_pod, Cluster};

const WEB_PORT: Port = Port {
    name: "web",
    protocol: "TCP",
    port: 80,
    target_port: 0,
};
const ALT_PORT: Port = Port {
    name: "alt",
    port: 81,
    ..WEB_PORT
};

/// The `multi` service on `cluster_ip` (its one family) and an
/// EndpointSlice of that family per endpoint, as one manifest file.
pub fn manifest(cluster_ip: IpAddr) -> String {
    let placeholder = Ipv4Addr::UNSPECIFIED;
    let mut service = manifests::with_cluster_ips(
        manifests::service("default", "multi", placeholder, &[WEB_PORT, ALT_PORT]),
        &[cluster_ip],
    );
    for (p, name) in service
        .spec
        .as_mut()
        .and_then(|s| s.ports.as_mut())
        .expect("ports")
        .iter_mut()
        .zip(["web-port", "alt-port"])
    {
        p.target_port = Some(IntOrString::String(name.into()));
    }
    let family = manifests::family(cluster_ip);
    let slice = |name: &str, pod: &str, web_target: u16, alt_target: u16| {
        let mut slice = manifests::endpoint_slice(
            "default",
            name,
            "multi",
            &[
                Port {
                    target_port: web_target,
                    ..WEB_PORT
                },
                Port {
                    target_port: alt_target,
                    ..ALT_PORT
                },
            ],
            vec![manifests::pod_endpoint_of(&lab_pod(pod), family)],
        );
        slice.address_type = family.into();
        slice
    };
    manifests::document(&service)
        + &manifests::document(&slice("multi-a", "web-a", 8080, 9090))
        + &manifests::document(&slice("multi-b", "web-b", 9191, 8080))
}

/// Serves the ports the lab's servers do not (web-a's `alt`, web-b's
/// `web`), then checks that each service port of `cluster_ip` reaches each
/// endpoint's own target port.
pub fn serve_and_check(c: &Cluster, cluster_ip: IpAddr) {
    listen(c, "web-a", cluster_ip, 9090, "web-a/alt");
    listen(c, "web-b", cluster_ip, 9191, "web-b/web");
    let at = |port| SocketAddr::new(cluster_ip, port);
    let names = |names: [&str; 2]| {
        names
            .map(str::to_owned)
            .into_iter()
            .collect::<BTreeSet<_>>()
    };
    c.eventually("port 80 reaches each endpoint's web port", || {
        c.tcp_backends("client", at(80), 20) == names(["web-a", "web-b/web"])
    });
    c.eventually("port 81 reaches each endpoint's alt port", || {
        c.tcp_backends("client", at(81), 20) == names(["web-a/alt", "web-b"])
    });
}

/// A TCP server on `port` in `pod` (on the unspecified address of
/// `family_of`'s family) answering every line with `answer`; listening on
/// return.
fn listen(c: &Cluster, pod: &str, family_of: IpAddr, port: u16, answer: &'static str) {
    let any: IpAddr = match family_of {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    dataplane_lab::netns::spawn_in_netns(&c.lab.pod_ns(pod), move || {
        let listener = std::net::TcpListener::bind((any, port)).expect("binding");
        bound_tx.send(()).unwrap();
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(&stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if (&stream)
                        .write_all(format!("{answer}\n").as_bytes())
                        .is_err()
                    {
                        break;
                    }
                    line.clear();
                }
            });
        }
    })
    .expect("server thread");
    bound_rx.recv().expect("the server bound its port");
}
