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

#[cfg(test)]
mod tests {
    use serde_norway::Value;

    use super::*;

    fn docs(yaml: &str) -> Vec<Value> {
        yaml.split("\n---\n")
            .map(|doc| serde_norway::from_str(doc).unwrap())
            .collect()
    }

    #[test]
    fn web_service_is_a_service_and_its_endpoint_slice() {
        let pods = [PodSpec::new("web-a", 1, 11), PodSpec::new("web-b", 2, 10)];
        let docs = docs(&web_service(
            "web",
            Ipv4Addr::new(10, 96, 0, 10),
            &pods.iter().collect::<Vec<_>>(),
        ));
        assert_eq!(docs.len(), 2);
        let (svc, slice) = (&docs[0], &docs[1]);
        assert_eq!(svc["kind"], "Service");
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(svc["spec"]["ports"][0]["port"], 80);
        assert_eq!(svc["spec"]["ports"][1]["protocol"], "UDP");
        assert_eq!(slice["kind"], "EndpointSlice");
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
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
    fn web_service_without_backends_has_an_empty_slice() {
        let docs = docs(&web_service("web", Ipv4Addr::new(10, 96, 0, 10), &[]));
        assert_eq!(docs[1]["endpoints"].as_sequence().map(Vec::len), Some(0));
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
