//! Offline validation of `deploy/` against the Kubernetes 1.33 schemas (the
//! typed k8s-openapi objects): every document deserializes into its kind's
//! type and serializes back to the same JSON, so a misspelled or unknown
//! field (which k8s-openapi would silently drop) or a missing required one
//! (which it would default) is an error. Then what the agent needs: the
//! ClusterRole's verbs, the DaemonSet's node wiring, its args through the
//! agent's own CLI.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use clap::Parser as _;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of every manifest in deploy/: (file, document).
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .map(|e| e.expect("deploy/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("reading a manifest");
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
            if !value.is_null() {
                docs.push((name.clone(), value));
            }
        }
    }
    docs
}

/// Paths where `original` and `round_trip` differ.
fn differences(path: &str, original: &Value, round_trip: &Value, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => differences(&format!("{path}.{k}"), v, w, out),
                    None => out.push(format!("{path}.{k}: unknown field")),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k}: required field missing"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), v, w, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} reads back as {b}")),
    }
}

fn round_trip<K: DeserializeOwned + serde::Serialize>(doc: &Value) -> Result<K, String> {
    let typed: K = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut diffs = Vec::new();
    differences("", doc, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(typed)
    } else {
        Err(diffs.join("; "))
    }
}

/// Checks one document against the schema of its kind.
fn validate(doc: &Value) -> Result<(), String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or("");
    let kind = doc["kind"].as_str().unwrap_or("");
    match (api_version, kind) {
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(doc).map(drop),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(doc).map(drop)
        }
        _ => Err(format!("no schema for {api_version} {kind}")),
    }
}

fn the<K: DeserializeOwned + serde::Serialize>(kind: &str) -> K {
    let docs: Vec<Value> = documents()
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(docs.len(), 1, "one {kind} in deploy/");
    round_trip(&docs[0]).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn every_manifest_matches_the_kubernetes_schema() {
    let docs = documents();
    let kinds: BTreeSet<&str> = docs
        .iter()
        .filter_map(|(_, d)| d["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "ServiceAccount"
        ]
        .into(),
        "what deploy/ holds"
    );
    for (file, doc) in &docs {
        if let Err(e) = validate(doc) {
            panic!("{file}: {} {}: {e}", doc["kind"], doc["metadata"]["name"]);
        }
    }
}

#[test]
fn the_validator_catches_misspelled_unknown_missing_and_mistyped_fields() {
    let daemonset = documents()
        .into_iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    assert_eq!(validate(&daemonset), Ok(()));

    let mut misspelled = daemonset.clone();
    let pod = misspelled["spec"]["template"]["spec"]
        .as_object_mut()
        .unwrap();
    let value = pod.remove("hostNetwork").unwrap();
    pod.insert("hostNetwrok".into(), value);
    let error = validate(&misspelled).unwrap_err();
    assert!(
        error.contains(".spec.template.spec.hostNetwrok: unknown field"),
        "{error}"
    );

    let mut nested = daemonset.clone();
    nested["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["ad"] =
        serde_json::json!(["SYS_ADMIN"]);
    assert!(validate(&nested).unwrap_err().contains("capabilities.ad"));

    let mut missing = daemonset.clone();
    missing["spec"].as_object_mut().unwrap().remove("selector");
    assert!(
        validate(&missing)
            .unwrap_err()
            .contains(".spec.selector: required field missing"),
        "a DaemonSet without a selector"
    );

    let mut mistyped = daemonset.clone();
    mistyped["spec"]["template"]["spec"]["hostNetwork"] = serde_json::json!("yes");
    assert!(validate(&mistyped).is_err());

    let mut unknown_kind = daemonset;
    unknown_kind["kind"] = serde_json::json!("Daemonset");
    assert!(validate(&unknown_kind).unwrap_err().contains("no schema"));
}

#[test]
fn the_cluster_role_grants_exactly_list_and_watch_on_what_the_agent_watches() {
    let role: ClusterRole = the("ClusterRole");
    let granted: BTreeSet<(String, String, String)> = role
        .rules
        .iter()
        .flatten()
        .flat_map(|rule| {
            assert!(
                rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
                "{rule:?}"
            );
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            let verbs = rule.verbs.clone();
            groups.into_iter().flat_map(move |g| {
                let verbs = verbs.clone();
                resources.clone().into_iter().flat_map(move |r| {
                    let g = g.clone();
                    verbs
                        .clone()
                        .into_iter()
                        .map(move |v| (g.clone(), r.clone(), v))
                })
            })
        })
        .collect();
    // What the kube source's watchers do (list, then watch), and nothing else.
    let needed: BTreeSet<(String, String, String)> = [
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
    ]
    .into_iter()
    .map(|(g, r, v)| (g.into(), r.into(), v.into()))
    .collect();
    assert_eq!(granted, needed);

    let binding: ClusterRoleBinding = the("ClusterRoleBinding");
    let account: ServiceAccount = the("ServiceAccount");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
}

/// The agent's command line, as the binary parses it.
#[derive(Debug, clap::Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    Run(dataplane_agent::run::Options),
}

#[test]
fn the_daemonset_runs_the_agent_on_every_node_with_what_it_needs() {
    let ds: DaemonSet = the("DaemonSet");
    let account: ServiceAccount = the("ServiceAccount");
    assert_eq!(ds.metadata.namespace, account.metadata.namespace);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name, account.metadata.name);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations.iter().flatten().any(|t| t.key.is_none()
            && t.operator.as_deref() == Some("Exists")
            && t.effect.is_none()),
        "tolerates every taint"
    );
    assert_eq!(pod.containers.len(), 1);
    let agent = &pod.containers[0];

    // Capabilities rather than privilege.
    let security = agent.security_context.clone().unwrap();
    assert_ne!(security.privileged, Some(true));
    let caps = security.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
    assert_eq!(
        added,
        ["BPF", "NET_ADMIN", "PERFMON"].map(String::from).into()
    );

    // The node's bpffs, where the agent pins.
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/sys/fs/bpf")
        })
        .expect("a hostPath volume for /sys/fs/bpf");
    assert!(agent
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.name == volume.name && m.mount_path == "/sys/fs/bpf"));

    // NODE_NAME from the downward API.
    let env = agent.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );

    // The API server directly, not through the `kubernetes` service IP
    // (which host-network processes cannot use without kube-proxy).
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        let source = env
            .iter()
            .find(|e| e.name == var)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.config_map_key_ref.as_ref())
            .unwrap_or_else(|| panic!("{var} from a ConfigMap"));
        assert_ne!(source.optional, Some(true), "{var} must not fall back");
    }

    // The args parse with the agent's CLI, after the kubelet's $(VAR)
    // expansion.
    let mut argv = vec!["dataplane-agent".to_string()];
    argv.extend(
        agent
            .args
            .iter()
            .flatten()
            .map(|a| a.replace("$(NODE_NAME)", "node-7")),
    );
    let Command::Run(options) = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .command;
    assert_eq!(options.node_name.as_deref(), Some("node-7"));
    assert!(
        options.manifests.is_none() && options.kubeconfig.is_none(),
        "in-cluster API"
    );
    assert!(options.bpffs.starts_with("/sys/fs/bpf"));
    assert!(!options.pod_ifaces.is_empty());

    // Probes on the healthz port the agent serves.
    let port = options.healthz_bind_address.port();
    for probe in [&agent.liveness_probe, &agent.readiness_probe] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an httpGet probe");
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port.into())
        );
    }

    // The image's binary is what the container runs.
    let containerfile =
        std::fs::read_to_string(deploy_dir().join("Containerfile")).expect("deploy/Containerfile");
    let command = agent.command.clone().unwrap_or_default();
    assert_eq!(command.len(), 1);
    assert!(
        containerfile.contains(&format!("COPY dataplane-agent {}", command[0])),
        "the Containerfile installs {}",
        command[0]
    );
}

/// kube-proxy's container command line as kubeadm writes its DaemonSet.
const KUBEADM_KUBE_PROXY_COMMAND: &[&str] = &[
    "/usr/local/bin/kube-proxy",
    "--config=/var/lib/kube-proxy/config.conf",
    "--hostname-override=$(NODE_NAME)",
];

#[test]
fn the_kube_proxy_swap_patch_runs_the_agent_with_kube_proxys_command_line() {
    let text = std::fs::read_to_string(deploy_dir().join("kube-proxy-swap/patch.yaml"))
        .expect("deploy/kube-proxy-swap/patch.yaml");
    let patch: Value = serde_norway::from_str(&text).expect("the patch is YAML");
    let pod = &patch["spec"]["template"]["spec"];

    // One container, kube-proxy's, with our image and nothing else of its
    // own changed: command, args, ConfigMap and RBAC stay kube-proxy's.
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container: k8s_openapi::api::core::v1::Container =
        round_trip(&containers[0]).unwrap_or_else(|e| panic!("container: {e}"));
    assert_eq!(container.name, "kube-proxy");
    assert!(container.command.is_none() && container.args.is_none());
    let ds: DaemonSet = the("DaemonSet");
    let ours = &ds.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(container.image, ours.image, "the image daemonset.yaml runs");

    // The node's bpffs, where the agent pins.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let volume: k8s_openapi::api::core::v1::Volume =
        round_trip(&volumes[0]).unwrap_or_else(|e| panic!("volume: {e}"));
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/bpf")
    );
    assert!(container
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.name == volume.name && m.mount_path == "/sys/fs/bpf"));

    // kube-proxy's command line parses as the agent's `run` (the binary
    // inserts `run` when called as kube-proxy), with the pod interfaces
    // from the patch's environment.
    let pod_ifaces = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "DATAPLANE_POD_IFACES")
        .and_then(|e| e.value.clone())
        .expect("DATAPLANE_POD_IFACES");
    let mut argv = vec!["kube-proxy".to_string(), "run".to_string()];
    argv.extend(
        KUBEADM_KUBE_PROXY_COMMAND[1..]
            .iter()
            .map(|a| a.replace("$(NODE_NAME)", "node-7")),
    );
    argv.push(format!("--pod-ifaces={pod_ifaces}"));
    let Command::Run(options) = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .command;
    assert_eq!(options.node_name.as_deref(), Some("node-7"));
    assert_eq!(
        options.config.as_deref(),
        Some(Path::new("/var/lib/kube-proxy/config.conf"))
    );
    assert_eq!(options.pod_ifaces, ["veth*", "cali*"]);

    // The image answers to kube-proxy's path.
    let containerfile =
        std::fs::read_to_string(deploy_dir().join("Containerfile")).expect("deploy/Containerfile");
    assert!(
        containerfile.contains(&format!(
            "COPY dataplane-agent {}",
            KUBEADM_KUBE_PROXY_COMMAND[0]
        )),
        "the Containerfile installs the agent as {}",
        KUBEADM_KUBE_PROXY_COMMAND[0]
    );
}
