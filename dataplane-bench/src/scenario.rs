//! The synthetic cluster every part of the bench programs: `count` ClusterIP
//! services `bench/svc-N` (port 80/TCP -> 8080) with `endpoints` pods each,
//! written the same way to the eBPF maps (sync engine), to kube-proxy's
//! iptables and nftables layouts, and to Service + EndpointSlice manifests.
//! One family per cluster: the IPv6 one is the IPv4 one with IPv6
//! addresses (kube-proxy runs one proxier per family, the agent one set of
//! maps per family), so each family's figures stand on their own.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use dataplane_agent::control::model::{
    BackendAddr, Frontend, FrontendSpec, IpFamily, ObjectRef, Protocol, ServiceName,
};
use dataplane_lab::manifests::{self, Port, State, HTTP};

pub const NAMESPACE: &str = "bench";
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// The cluster's pod CIDR of `family` (kube-proxy's `--cluster-cidr`).
pub fn cluster_cidr(family: IpFamily) -> &'static str {
    match family {
        IpFamily::Ipv4 => "10.244.0.0/16",
        IpFamily::Ipv6 => "fd00:10:244::/56",
    }
}
/// Distinct fake pod IPs (10.128.0.0, fd00:10:128:: upwards) the filler
/// endpoints cycle through; below the agent's BACKENDS capacity.
const BACKEND_POOL: u32 = 200_000;

/// `base` + `offset`, in `base`'s family.
fn add(base: IpAddr, offset: u32) -> IpAddr {
    match base {
        IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) + offset).into(),
        IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) + u128::from(offset)).into(),
    }
}

/// A base address of `family`: `v4` or `v6`.
fn pick(family: IpFamily, v4: Ipv4Addr, v6: Ipv6Addr) -> IpAddr {
    match family {
        IpFamily::Ipv4 => v4.into(),
        IpFamily::Ipv6 => v6.into(),
    }
}

#[derive(Debug, Clone)]
pub struct Svc {
    pub name: ServiceName,
    pub ip: IpAddr,
    pub port: u16,
    /// Sorted, distinct.
    pub backends: Vec<BackendAddr>,
    /// `type: NodePort` with this nodePort (policy Cluster), else ClusterIP.
    pub node_port: Option<u16>,
}

impl Svc {
    /// kube-proxy's service port name, `namespace/name:port`.
    pub fn port_name(&self) -> String {
        format!("{}/{}:http", self.name.namespace, self.name.name)
    }
}

impl Svc {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.ip)
    }
}

pub fn service_ip(family: IpFamily, i: usize) -> IpAddr {
    // 10.96.0.0/12 holds a million addresses: room for any scale here.
    let base = pick(
        family,
        Ipv4Addr::new(10, 96, 0, 1),
        Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 1),
    );
    add(base, i as u32)
}

fn filler_backend(family: IpFamily, k: u32) -> BackendAddr {
    let base = pick(
        family,
        Ipv4Addr::new(10, 128, 0, 1),
        Ipv6Addr::new(0xfd00, 0x10, 0x128, 0, 0, 0, 0, 1),
    );
    BackendAddr {
        ip: add(base, k % BACKEND_POOL),
        port: TARGET_PORT,
    }
}

/// `count` services of `family` with `endpoints` fake pods each. With
/// `target` (of the same family), the LAST service (the one kube-proxy's
/// iptables layout matches last) has that one real backend instead.
pub fn services(
    family: IpFamily,
    count: usize,
    endpoints: usize,
    target: Option<BackendAddr>,
) -> Vec<Svc> {
    if let Some(t) = target {
        assert_eq!(IpFamily::of(t.ip), family, "a target of another family");
    }
    (0..count)
        .map(|i| {
            let mut backends: Vec<BackendAddr> = match target {
                Some(t) if i + 1 == count => vec![t],
                _ => (0..endpoints)
                    .map(|j| filler_backend(family, (i * endpoints + j) as u32))
                    .collect(),
            };
            backends.sort();
            backends.dedup();
            Svc {
                name: ObjectRef {
                    namespace: NAMESPACE.into(),
                    name: format!("svc-{i}").into(),
                },
                ip: service_ip(family, i),
                port: SERVICE_PORT,
                backends,
                node_port: None,
            }
        })
        .collect()
}

/// kube-proxy's default NodePort range, 30000-32767.
pub const NODE_PORT_MAX: u16 = 32767;
const NODE_PORTS: usize = 2768;

/// `svcs` with the last of them (as many as the NodePort range holds) made
/// `type: NodePort`: the last service, the one traffic goes to, gets
/// [`NODE_PORT_MAX`], and is the last NodePort in kube-proxy's layouts.
pub fn with_node_ports(mut svcs: Vec<Svc>) -> Vec<Svc> {
    let count = svcs.len();
    for (i, svc) in svcs.iter_mut().enumerate() {
        let from_last = count - 1 - i;
        if from_last < NODE_PORTS {
            svc.node_port = Some(NODE_PORT_MAX - from_last as u16);
        }
    }
    svcs
}

/// The same services after one endpoint of service `which` was replaced by
/// a new pod (a rolling update's single step).
pub fn with_one_endpoint_changed(svcs: &[Svc], which: usize, generation: u32) -> Vec<Svc> {
    let mut changed = svcs.to_vec();
    let svc = &mut changed[which];
    let base = pick(
        svc.family(),
        Ipv4Addr::new(10, 140, 0, 1),
        Ipv6Addr::new(0xfd00, 0x10, 0x140, 0, 0, 0, 0, 1),
    );
    let new = BackendAddr {
        ip: add(base, generation),
        port: TARGET_PORT,
    };
    if svc.backends.is_empty() {
        svc.backends.push(new);
    } else {
        svc.backends[0] = new;
    }
    svc.backends.sort();
    svc.backends.dedup();
    changed
}

pub fn frontends(svc: &Svc) -> Vec<(Frontend, FrontendSpec)> {
    vec![(
        Frontend::cluster_ip(svc.ip, svc.port, Protocol::Tcp),
        FrontendSpec {
            service: svc.name.clone(),
            port_name: Some("http".into()),
            backends: svc.backends.clone(),
            draining: Vec::new(),
            affinity_timeout_s: None,
            drop_without_local_endpoints: false,
            masquerade_remote: false,
            local_ips: Vec::new(),
            source_ranges: Vec::new(),
            source_ranges6: Vec::new(),
        },
    )]
}

/// What `SyncEngine::sync_all` takes.
pub fn desired(svcs: &[Svc]) -> BTreeMap<ServiceName, Vec<(Frontend, FrontendSpec)>> {
    svcs.iter()
        .map(|s| (s.name.clone(), frontends(s)))
        .collect()
}

/// Standard Service + EndpointSlice manifests, multi-document YAML.
pub fn manifests_yaml(svcs: &[Svc]) -> String {
    svcs.iter()
        .map(|s| {
            let http = Port {
                port: s.port,
                target_port: TARGET_PORT,
                ..HTTP
            };
            // The placeholder is replaced by the service's own family's
            // address (with `ipFamilies`, as the API server writes it).
            let service = manifests::with_cluster_ips(
                manifests::service(
                    &s.name.namespace,
                    &s.name.name,
                    Ipv4Addr::UNSPECIFIED,
                    &[http],
                ),
                &[s.ip],
            );
            let service = match s.node_port {
                Some(node_port) => manifests::exposed(
                    service,
                    &manifests::Exposure {
                        type_: Some("NodePort"),
                        node_ports: vec![node_port],
                        ..Default::default()
                    },
                ),
                None => service,
            };
            manifests::manifest_per_family(&service, |_| {
                s.backends
                    .iter()
                    .map(|b| manifests::endpoint(b.ip, None, State::Ready))
                    .collect()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_services_are_written_as_ipv6_only_services_with_an_ipv6_slice() {
        let target = BackendAddr {
            ip: "fd00:10:244:1::11".parse().unwrap(),
            port: TARGET_PORT,
        };
        let svcs = services(IpFamily::Ipv6, 3, 2, Some(target));
        assert!(svcs.iter().all(|s| s.family() == IpFamily::Ipv6));
        assert_eq!(svcs[2].backends, vec![target]);
        assert!(svcs[..2]
            .iter()
            .flat_map(|s| &s.backends)
            .all(|b| b.ip.is_ipv6()));
        let yaml = manifests_yaml(&svcs);
        assert_eq!(yaml.matches("addressType: IPv6").count(), 3, "{yaml}");
        assert!(
            !yaml.contains("IPv4") && !yaml.contains("0.0.0.0"),
            "{yaml}"
        );
        assert!(yaml.contains("clusterIP: fd00:10:96::3"), "{yaml}");
    }
}
