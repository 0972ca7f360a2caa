//! Writing Service and EndpointSlice manifests the way an operator would.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Context as _;

use crate::topology::PodSpec;

/// A ClusterIP service `default/NAME` with an `http` TCP port 80 -> 8080 and
/// a `dns` UDP port 53 -> 5353, and one EndpointSlice with `backends`.
pub fn web_service(name: &str, cluster_ip: Ipv4Addr, backends: &[&PodSpec]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|p| {
            format!(
                "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n    nodeName: node{}\n",
                p.ip(),
                p.node
            )
        })
        .collect();
    let endpoints = if endpoints.is_empty() {
        "[]\n".to_string()
    } else {
        format!("\n{endpoints}")
    };
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {cluster_ip}
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 5353
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
- name: dns
  port: 5353
  protocol: UDP
endpoints: {endpoints}"
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
