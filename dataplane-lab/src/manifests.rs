//! Services and EndpointSlices: typed k8s-openapi objects, as an API server
//! serves them, and the same objects serialized to YAML manifests the way an
//! operator writes them for the agent's manifest directory. One builder for
//! the lab, the tests, the API server double and the bench.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use anyhow::Context as _;
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::Serialize;

use crate::topology::PodSpec;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const DEFAULT_NAMESPACE: &str = "default";

/// One service port and the port its endpoints listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub name: &'static str,
    /// `TCP` or `UDP`, as Kubernetes spells it.
    pub protocol: &'static str,
    pub port: u16,
    pub target_port: u16,
}

/// `http`: TCP 80 -> 8080 (the lab servers' TCP port).
pub const HTTP: Port = Port {
    name: "http",
    protocol: "TCP",
    port: 80,
    target_port: 8080,
};

/// `dns`: UDP 53 -> 5353 (the lab servers' UDP port).
pub const DNS: Port = Port {
    name: "dns",
    protocol: "UDP",
    port: 53,
    target_port: 5353,
};

/// The ports of a lab `web` service.
pub const WEB_PORTS: [Port; 2] = [HTTP, DNS];

fn meta(namespace: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        }),
        ..Default::default()
    }
}

/// A ClusterIP service `NAMESPACE/NAME` with `ports`.
pub fn service(namespace: &str, name: &str, cluster_ip: Ipv4Addr, ports: &[Port]) -> Service {
    Service {
        metadata: meta(namespace, name, &[]),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(cluster_ip.to_string()),
            cluster_ips: Some(vec![cluster_ip.to_string()]),
            ports: Some(
                ports
                    .iter()
                    .map(|p| ServicePort {
                        name: Some(p.name.into()),
                        port: p.port.into(),
                        protocol: Some(p.protocol.into()),
                        target_port: Some(IntOrString::Int(p.target_port.into())),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A ClusterIP service `default/NAME` with the `http` and `dns` ports.
pub fn web_service(name: &str, cluster_ip: Ipv4Addr) -> Service {
    service(DEFAULT_NAMESPACE, name, cluster_ip, &WEB_PORTS)
}

/// `service` with `cluster_ips` (one per family, the primary first) as the
/// API server allocates them: `clusterIP`, `clusterIPs`, `ipFamilies`, and
/// `ipFamilyPolicy` (RequireDualStack with two, SingleStack with one).
pub fn with_cluster_ips(mut service: Service, cluster_ips: &[IpAddr]) -> Service {
    let spec = service.spec.get_or_insert_with(Default::default);
    spec.cluster_ip = cluster_ips.first().map(ToString::to_string);
    spec.cluster_ips = Some(cluster_ips.iter().map(ToString::to_string).collect());
    spec.ip_families = Some(
        cluster_ips
            .iter()
            .map(|ip| family(*ip).to_owned())
            .collect(),
    );
    spec.ip_family_policy = Some(
        if cluster_ips.len() > 1 {
            "RequireDualStack"
        } else {
            "SingleStack"
        }
        .into(),
    );
    service
}

/// The `addressType` of `ip`'s family.
pub fn family(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// How a service is reached from outside the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exposure {
    /// `NodePort` or `LoadBalancer` (with `node_ports` set), or `None` for
    /// ClusterIP.
    pub type_: Option<&'static str>,
    /// One nodePort per service port, in order.
    pub node_ports: Vec<u16>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub external_ips: Vec<Ipv4Addr>,
    pub source_ranges: Vec<String>,
    /// `externalTrafficPolicy: Local`.
    pub local: bool,
    pub health_check_node_port: Option<u16>,
}

/// `service` exposed as `exposure` says.
pub fn exposed(mut service: Service, exposure: &Exposure) -> Service {
    let spec = service.spec.get_or_insert_with(Default::default);
    if let Some(t) = exposure.type_ {
        spec.type_ = Some(t.into());
    }
    for (port, node_port) in spec.ports.iter_mut().flatten().zip(&exposure.node_ports) {
        port.node_port = Some((*node_port).into());
    }
    if !exposure.external_ips.is_empty() {
        spec.external_ips = Some(
            exposure
                .external_ips
                .iter()
                .map(|i| i.to_string())
                .collect(),
        );
    }
    if !exposure.source_ranges.is_empty() {
        spec.load_balancer_source_ranges = Some(exposure.source_ranges.clone());
    }
    if exposure.type_.is_some() {
        spec.external_traffic_policy =
            Some(if exposure.local { "Local" } else { "Cluster" }.into());
    }
    spec.health_check_node_port = exposure.health_check_node_port.map(i32::from);
    if !exposure.load_balancer_ips.is_empty() {
        service.status = Some(k8s_openapi::api::core::v1::ServiceStatus {
            load_balancer: Some(k8s_openapi::api::core::v1::LoadBalancerStatus {
                ingress: Some(
                    exposure
                        .load_balancer_ips
                        .iter()
                        .map(|ip| k8s_openapi::api::core::v1::LoadBalancerIngress {
                            ip: Some(ip.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        });
    }
    service
}

/// One endpoint's state, as the EndpointSlice controller reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Ready,
    /// Terminating but still serving (graceful shutdown).
    Terminating,
    /// Neither ready nor serving (starting, failing its probe).
    NotReady,
}

/// An endpoint: pod IP, node name (if known), state.
pub fn endpoint(ip: impl Into<IpAddr>, node: Option<&str>, state: State) -> Endpoint {
    let (ready, serving, terminating) = match state {
        State::Ready => (true, true, false),
        State::Terminating => (false, true, true),
        State::NotReady => (false, false, false),
    };
    Endpoint {
        addresses: vec![ip.into().to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        node_name: node.map(Into::into),
        ..Default::default()
    }
}

/// A ready endpoint on a lab pod (node `nodeN`).
pub fn pod_endpoint(pod: &PodSpec) -> Endpoint {
    endpoint(pod.ip(), Some(&format!("node{}", pod.node)), State::Ready)
}

/// A ready endpoint for the pod's address of `address_type` (`IPv4` or
/// `IPv6`).
pub fn pod_endpoint_of(pod: &PodSpec, address_type: &str) -> Endpoint {
    let ip: IpAddr = if address_type == "IPv6" {
        pod.ipv6().into()
    } else {
        pod.ip().into()
    };
    endpoint(ip, Some(&format!("node{}", pod.node)), State::Ready)
}

/// An IPv4 EndpointSlice `NAMESPACE/NAME` of service `service` listing the
/// target ports of `ports`.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[Port],
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(namespace, name, &[(SERVICE_NAME_LABEL, service)]),
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(
            ports
                .iter()
                .map(|p| EndpointPort {
                    name: Some(p.name.into()),
                    port: Some(p.target_port.into()),
                    protocol: Some(p.protocol.into()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// An EndpointSlice `default/NAME` of service `service` with the `http` and
/// `dns` ports.
pub fn slice(name: &str, service: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
    endpoint_slice(DEFAULT_NAMESPACE, name, service, &WEB_PORTS, endpoints)
}

/// One YAML document (`---` first), as in a multi-document manifest file.
pub fn document(object: &impl Serialize) -> String {
    let yaml = serde_norway::to_string(object).expect("k8s-openapi objects serialize");
    format!("---\n{yaml}")
}

/// A Service and the EndpointSlice (`NAME-1`) the EndpointSlice controller
/// would write for it, with `endpoints`, as one manifest file.
pub fn manifest(service: &Service, endpoints: Vec<Endpoint>) -> String {
    document(service) + &document(&slice_of(service, "IPv4", "1", endpoints))
}

/// The EndpointSlice `NAME-SUFFIX` of `service` for one address family,
/// listing its ports' target ports.
fn slice_of(
    service: &Service,
    address_type: &str,
    suffix: &str,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let name = service.metadata.name.as_deref().unwrap_or_default();
    let namespace = service
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE);
    let ports = service
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| EndpointPort {
            name: p.name.clone(),
            protocol: p.protocol.clone(),
            port: Some(match p.target_port {
                Some(IntOrString::Int(target)) => target,
                _ => p.port,
            }),
            ..Default::default()
        })
        .collect();
    EndpointSlice {
        metadata: meta(
            namespace,
            &format!("{name}-{suffix}"),
            &[(SERVICE_NAME_LABEL, name)],
        ),
        address_type: address_type.into(),
        endpoints,
        ports: Some(ports),
    }
}

/// A Service and one EndpointSlice per family of its `ipFamilies` (`NAME-1`
/// IPv4, `NAME-v6` IPv6), as the EndpointSlice controller writes them for a
/// dual-stack or IPv6 service; `endpoints` gives each family's endpoints.
pub fn manifest_per_family(
    service: &Service,
    endpoints: impl Fn(&'static str) -> Vec<Endpoint>,
) -> String {
    let families = service
        .spec
        .as_ref()
        .and_then(|s| s.ip_families.clone())
        .unwrap_or_else(|| vec!["IPv4".into()]);
    let mut out = document(service);
    for family in &families {
        let (address_type, suffix) = match family.as_str() {
            "IPv6" => ("IPv6", "v6"),
            _ => ("IPv4", "1"),
        };
        out += &document(&slice_of(
            service,
            address_type,
            suffix,
            endpoints(address_type),
        ));
    }
    out
}

/// [`web_service`] `default/NAME` and one EndpointSlice with `backends`, as
/// one manifest file.
pub fn web_manifest(name: &str, cluster_ip: Ipv4Addr, backends: &[&PodSpec]) -> String {
    manifest(
        &web_service(name, cluster_ip),
        backends.iter().map(|p| pod_endpoint(p)).collect(),
    )
}

/// Writes `content` to `dir/file` atomically (temp file + rename), so a
/// watching agent never reads half a file.
pub fn write(dir: &Path, file: &str, content: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(file))
        .with_context(|| format!("renaming into {}", dir.join(file).display()))
}

pub fn remove(dir: &Path, file: &str) -> anyhow::Result<()> {
    std::fs::remove_file(dir.join(file))
        .with_context(|| format!("removing {}", dir.join(file).display()))
}

#[cfg(test)]
mod tests {
    use serde_norway::Value;

    use super::*;

    fn docs(yaml: &str) -> Vec<Value> {
        yaml.split("---\n")
            .filter(|doc| !doc.is_empty())
            .map(|doc| serde_norway::from_str(doc).unwrap())
            .collect()
    }

    #[test]
    fn web_manifest_is_a_service_and_its_endpoint_slice() {
        let pods = [PodSpec::new("web-a", 1, 11), PodSpec::new("web-b", 2, 10)];
        let docs = docs(&web_manifest(
            "web",
            Ipv4Addr::new(10, 96, 0, 10),
            &pods.iter().collect::<Vec<_>>(),
        ));
        assert_eq!(docs.len(), 2);
        let (svc, slice) = (&docs[0], &docs[1]);
        assert_eq!(svc["kind"], "Service");
        assert_eq!(svc["apiVersion"], "v1");
        assert_eq!(svc["metadata"]["namespace"], "default");
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(svc["spec"]["ports"][0]["port"], 80);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(svc["spec"]["ports"][1]["protocol"], "UDP");
        assert_eq!(slice["kind"], "EndpointSlice");
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(slice["metadata"]["name"], "web-1");
        assert_eq!(slice["addressType"], "IPv4");
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "web"
        );
        assert_eq!(slice["ports"][0]["port"], 8080);
        assert_eq!(slice["ports"][0]["name"], "http");
        let endpoints = slice["endpoints"].as_sequence().unwrap();
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[1]["addresses"][0], "10.244.2.10");
        assert_eq!(endpoints[1]["conditions"]["ready"], true);
        assert_eq!(endpoints[1]["nodeName"], "node2");
    }

    #[test]
    fn web_manifest_without_backends_has_an_empty_slice() {
        let docs = docs(&web_manifest("web", Ipv4Addr::new(10, 96, 0, 10), &[]));
        assert_eq!(docs[1]["endpoints"].as_sequence().map(Vec::len), Some(0));
    }

    #[test]
    fn manifest_slice_lists_only_the_services_ports() {
        let svc = service("bench", "svc-0", Ipv4Addr::new(10, 96, 0, 1), &[HTTP]);
        let docs = docs(&manifest(&svc, vec![]));
        assert_eq!(docs[1]["metadata"]["namespace"], "bench");
        assert_eq!(docs[1]["ports"].as_sequence().map(Vec::len), Some(1));
        assert_eq!(docs[1]["ports"][0]["name"], "http");
    }

    #[test]
    fn dual_stack_manifest_has_a_slice_per_family() {
        let pods = [PodSpec::new("web-a", 1, 11)];
        let svc = with_cluster_ips(
            web_service("web", Ipv4Addr::new(10, 96, 0, 10)),
            &[
                "10.96.0.10".parse().unwrap(),
                "fd00:10:96::10".parse().unwrap(),
            ],
        );
        let docs = docs(&manifest_per_family(&svc, |family| {
            pods.iter().map(|p| pod_endpoint_of(p, family)).collect()
        }));
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["spec"]["clusterIPs"][1], "fd00:10:96::10");
        assert_eq!(docs[0]["spec"]["ipFamilies"][1], "IPv6");
        assert_eq!(docs[0]["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(docs[1]["addressType"], "IPv4");
        assert_eq!(docs[1]["endpoints"][0]["addresses"][0], "10.244.1.11");
        assert_eq!(docs[2]["addressType"], "IPv6");
        assert_eq!(docs[2]["metadata"]["name"], "web-v6");
        assert_eq!(docs[2]["endpoints"][0]["addresses"][0], "fd00:10:244:1::11");
    }

    #[test]
    fn write_replaces_atomically_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("dplab-manifests-{}", std::process::id()));
        write(&dir, "a.yaml", "one").unwrap();
        write(&dir, "a.yaml", "two").unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a.yaml")).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.yaml"]);
        remove(&dir, "a.yaml").unwrap();
        std::fs::remove_dir(&dir).unwrap();
    }
}
