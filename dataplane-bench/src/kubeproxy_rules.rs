//! kube-proxy's rule layouts for the same services, written the way
//! kube-proxy writes them: iptables-restore input (KUBE-SERVICES ->
//! KUBE-SVC-* -> KUBE-SEP-* with `statistic --mode random`), and an `nft -f`
//! transaction for its nftables mode (`service-ips` verdict map -> service
//! chain -> `numgen random mod N vmap` -> endpoint chain doing dnat).
//! ClusterIP services, with `--cluster-cidr` set (pod sources are not
//! masqueraded), as on the bench's topology; services with a nodePort also
//! get kube-proxy's NodePort rules for policy Cluster (KUBE-NODEPORTS ->
//! KUBE-EXT-* masquerade mark -> the service chain; nftables:
//! `service-nodeports` verdict map on the `nodeport-ips`, matched by
//! address alone as its nftables mode does with its default
//! `--nodeport-addresses`, the node's primary IPs; no `fib daddr type
//! local`, which it writes only for `--nodeport-addresses 0.0.0.0/0`).
//!
//! Either family: kube-proxy runs one proxier per family, writing the same
//! layout with ip6tables and an `ip6 kube-proxy` table for IPv6. Every
//! function writes the family of the services it is given.

use std::{fmt::Write as _, net::IpAddr};

use dataplane_agent::control::model::{BackendAddr, IpFamily};

use crate::scenario::{cluster_cidr, Svc};

/// What differs between kube-proxy's IPv4 and IPv6 proxiers' rules.
#[derive(Clone, Copy)]
struct Family {
    family: IpFamily,
    /// A single address's prefix length.
    host: u8,
    /// `nft` table (family and name) and the address's expression and type.
    nft_table: &'static str,
    nft_ip: &'static str,
    nft_addr_type: &'static str,
}

impl Family {
    fn of(family: IpFamily) -> Self {
        match family {
            IpFamily::Ipv4 => Self {
                family,
                host: 32,
                nft_table: "ip kube-proxy",
                nft_ip: "ip",
                nft_addr_type: "ipv4_addr",
            },
            IpFamily::Ipv6 => Self {
                family,
                host: 128,
                nft_table: "ip6 kube-proxy",
                nft_ip: "ip6",
                nft_addr_type: "ipv6_addr",
            },
        }
    }

    /// The family of `svcs` (IPv4 for none).
    fn of_services(svcs: &[Svc]) -> Self {
        Self::of(svcs.first().map_or(IpFamily::Ipv4, Svc::family))
    }

    fn cluster_cidr(self) -> &'static str {
        cluster_cidr(self.family)
    }
}

static IPTABLES_RESTORE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Chooses the iptables-restore binary (legacy or nf_tables backend).
pub fn set_iptables_restore(program: &str) {
    let _ = IPTABLES_RESTORE.set(program.to_owned());
}

pub fn iptables_restore() -> &'static str {
    IPTABLES_RESTORE
        .get()
        .map_or("iptables-legacy-restore", String::as_str)
}

/// The restore binary of `family` with the chosen backend:
/// `ip6tables-legacy-restore` beside `iptables-legacy-restore`.
pub fn iptables_restore_of(family: IpFamily) -> String {
    match family {
        IpFamily::Ipv4 => iptables_restore().to_owned(),
        IpFamily::Ipv6 => iptables_restore().replacen("iptables", "ip6tables", 1),
    }
}

/// 16 characters of base32 as kube-proxy's chain names carry (it hashes
/// with SHA-256; any stable hash of the same length does here).
fn chain_hash(s: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        s.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let (a, b) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x8422_2325_cbf2_9ce4));
    (0..16)
        .map(|i| {
            let v = if i < 8 {
                a >> (i * 5)
            } else {
                b >> ((i - 8) * 5)
            };
            ALPHABET[(v & 31) as usize] as char
        })
        .collect()
}

fn svc_chain(svc: &Svc) -> String {
    format!(
        "KUBE-SVC-{}",
        chain_hash(&format!("{}tcp", svc.port_name()))
    )
}

fn ext_chain(svc: &Svc) -> String {
    format!(
        "KUBE-EXT-{}",
        chain_hash(&format!("{}tcp", svc.port_name()))
    )
}

fn sep_chain(svc: &Svc, ep: &BackendAddr) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!("{}tcp{}:{}", svc.port_name(), ep.ip, ep.port))
    )
}

const NAT_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
];
const FILTER_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
    "KUBE-FIREWALL",
];

/// The jumps from the built-in chains kube-proxy adds (with `iptables -I`)
/// once at start, outside its restores.
fn builtin_jumps(out: &mut String, table: &str) {
    let lines: &[&str] = match table {
        "filter" => &[
            "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
            "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
            "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
            "-A INPUT -j KUBE-FIREWALL",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
            "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
            "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A OUTPUT -j KUBE-FIREWALL",
        ],
        _ => &[
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        ],
    };
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
}

fn filter_table(out: &mut String, f: Family, with_builtin_jumps: bool) {
    out.push_str("*filter\n");
    for c in FILTER_CHAINS {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    if with_builtin_jumps {
        builtin_jumps(out, "filter");
    }
    if f.family == IpFamily::Ipv4 {
        // route_localnet exists for IPv4 only; so does this guard.
        out.push_str("-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n");
    }
    out.push_str(concat!(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        "COMMIT\n",
    ));
}

fn kube_services_rule(out: &mut String, svc: &Svc) {
    let f = Family::of(svc.family());
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/{} --dport {} -j {}",
        svc.port_name(),
        svc.ip,
        f.host,
        svc.port,
        svc_chain(svc)
    );
}

fn service_chains(out: &mut String, svc: &Svc) {
    let f = Family::of(svc.family());
    let name = svc.port_name();
    let chain = svc_chain(svc);
    let _ = writeln!(
        out,
        "-A {chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/{} --dport {} ! -s {} -j KUBE-MARK-MASQ",
        svc.ip,
        f.host,
        svc.port,
        f.cluster_cidr()
    );
    let n = svc.backends.len();
    for (i, ep) in svc.backends.iter().enumerate() {
        let sep = sep_chain(svc, ep);
        let left = n - i;
        if left > 1 {
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment \"{name} -> {ep}\" -m statistic --mode random --probability {:.10} -j {sep}",
                1.0 / left as f64
            );
        } else {
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment \"{name} -> {ep}\" -j {sep}"
            );
        }
    }
    for ep in &svc.backends {
        let sep = sep_chain(svc, ep);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {name} -s {}/{} -j KUBE-MARK-MASQ",
            ep.ip, f.host
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {ep}"
        );
    }
}

/// The NodePort rules of `svc` (policy Cluster: every source masqueraded).
fn nodeport_rules(out: &mut String, svc: &Svc) {
    let Some(node_port) = svc.node_port else {
        return;
    };
    let name = svc.port_name();
    let ext = ext_chain(svc);
    let _ = writeln!(
        out,
        "-A KUBE-NODEPORTS -m comment --comment {name} -m tcp -p tcp --dport {node_port} -j {ext}"
    );
    let _ = writeln!(
        out,
        "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
    );
    let _ = writeln!(out, "-A {ext} -j {}", svc_chain(svc));
}

fn nat_header(out: &mut String) {
    out.push_str("*nat\n");
    for c in NAT_CHAINS {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
}

fn nat_common_rules(out: &mut String) {
    out.push_str(concat!(
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    ));
}

/// The jump to KUBE-NODEPORTS for every local address (no
/// `--nodeport-addresses`); the IPv6 proxier leaves out ::1, where
/// NodePorts never work (the IPv4 one keeps 127.0.0.0/8 by default,
/// `localhostNodePorts`).
fn nodeports_last(out: &mut String, f: Family) {
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL{} -j KUBE-NODEPORTS",
        match f.family {
            IpFamily::Ipv4 => "",
            IpFamily::Ipv6 => " ! -d ::1/128",
        }
    );
}

/// `iptables-restore --noflush` input of a full sync from nothing.
pub fn iptables_full(svcs: &[Svc]) -> String {
    let mut out = String::with_capacity(svcs.len() * 2_000);
    filter_table(&mut out, Family::of_services(svcs), true);
    nat_header(&mut out);
    for svc in svcs {
        let _ = writeln!(out, ":{} - [0:0]", svc_chain(svc));
        if svc.node_port.is_some() {
            let _ = writeln!(out, ":{} - [0:0]", ext_chain(svc));
        }
        for ep in &svc.backends {
            let _ = writeln!(out, ":{} - [0:0]", sep_chain(svc, ep));
        }
    }
    builtin_jumps(&mut out, "nat");
    nat_common_rules(&mut out);
    for svc in svcs {
        kube_services_rule(&mut out, svc);
    }
    nodeports_last(&mut out, Family::of_services(svcs));
    for svc in svcs {
        nodeport_rules(&mut out, svc);
    }
    for svc in svcs {
        service_chains(&mut out, svc);
    }
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's partial sync (MinimizeIPTablesRestore, the default since
/// 1.27) after service `which` changed from `before` to `after`: the filter
/// table and KUBE-SERVICES are rewritten whole, plus the changed service's
/// chains; endpoint chains no longer used are deleted.
pub fn iptables_partial(before: &[Svc], after: &[Svc], which: usize) -> String {
    let mut out = String::with_capacity(after.len() * 200);
    filter_table(&mut out, Family::of_services(after), false);
    nat_header(&mut out);
    let svc = &after[which];
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(svc));
    for ep in &svc.backends {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(svc, ep));
    }
    // Chains to delete are declared (which flushes them) first: -X only
    // deletes an empty chain.
    let stale: Vec<String> = before[which]
        .backends
        .iter()
        .filter(|ep| !svc.backends.contains(ep))
        .map(|ep| sep_chain(&before[which], ep))
        .collect();
    for chain in &stale {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    nat_common_rules(&mut out);
    for s in after {
        kube_services_rule(&mut out, s);
    }
    nodeports_last(&mut out, Family::of_services(after));
    service_chains(&mut out, svc);
    for chain in &stale {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

fn nft_svc_chain(svc: &Svc) -> String {
    format!(
        "service-{}-{}/{}/tcp/http",
        &chain_hash(&format!("{}tcp", svc.port_name()))[..8],
        svc.name.namespace,
        svc.name.name
    )
}

fn nft_ext_chain(svc: &Svc) -> String {
    format!(
        "external-{}-{}/{}/tcp/http",
        &chain_hash(&format!("{}tcp", svc.port_name()))[..8],
        svc.name.namespace,
        svc.name.name
    )
}

fn nft_ep_chain(svc: &Svc, ep: &BackendAddr) -> String {
    // An IPv6 address's colons are not allowed in a chain name.
    format!(
        "endpoint-{}-{}/{}/tcp/http__{}/{}",
        &chain_hash(&format!("{}tcp{ep}", svc.port_name()))[..8],
        svc.name.namespace,
        svc.name.name,
        ep.ip.to_string().replace(':', "."),
        ep.port
    )
}

fn nft_service(out: &mut String, svc: &Svc) {
    let f = Family::of(svc.family());
    let (t, ip) = (f.nft_table, f.nft_ip);
    let chain = nft_svc_chain(svc);
    for ep in &svc.backends {
        let ep_chain = nft_ep_chain(svc, ep);
        let _ = writeln!(out, "add chain {t} {ep_chain}");
        let _ = writeln!(out, "flush chain {t} {ep_chain}");
        let _ = writeln!(
            out,
            "add rule {t} {ep_chain} {ip} saddr {} jump mark-for-masquerade",
            ep.ip
        );
        // `ep` prints as kube-proxy writes it: `[addr]:port` for IPv6.
        let _ = writeln!(out, "add rule {t} {ep_chain} meta l4proto tcp dnat to {ep}");
    }
    let _ = writeln!(out, "add chain {t} {chain}");
    let _ = writeln!(out, "flush chain {t} {chain}");
    let _ = writeln!(
        out,
        "add rule {t} {chain} {ip} daddr {} tcp dport {} {ip} saddr != {} jump mark-for-masquerade",
        svc.ip,
        svc.port,
        f.cluster_cidr()
    );
    if !svc.backends.is_empty() {
        let targets: Vec<String> = svc
            .backends
            .iter()
            .enumerate()
            .map(|(i, ep)| format!("{i} : goto {}", nft_ep_chain(svc, ep)))
            .collect();
        let _ = writeln!(
            out,
            "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
            svc.backends.len(),
            targets.join(" , ")
        );
    }
}

/// `nft -f` transaction of a full sync from nothing.
pub fn nft_full(svcs: &[Svc]) -> String {
    let mut out = String::with_capacity(svcs.len() * 2_500);
    let f = Family::of_services(svcs);
    let (t, ip, addr) = (f.nft_table, f.nft_ip, f.nft_addr_type);
    let _ = write!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}
add chain {t} mark-for-masquerade
add rule {t} mark-for-masquerade mark set mark or 0x4000
add chain {t} masquerading
add rule {t} masquerading mark and 0x4000 == 0 return
add rule {t} masquerading mark set mark xor 0x4000
add rule {t} masquerading masquerade fully-random
add map {t} service-ips {{ type {addr} . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}
add set {t} cluster-ips {{ type {addr} ; comment \"Active ClusterIPs\" ; }}
add chain {t} services
add rule {t} services {ip} daddr . meta l4proto . th dport vmap @service-ips
add chain {t} cluster-ips-check
add rule {t} cluster-ips-check {ip} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"
add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}
add rule {t} filter-forward ct state new jump cluster-ips-check
add chain {t} filter-output {{ type filter hook output priority -110 ; }}
add rule {t} filter-output ct state new jump cluster-ips-check
add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add rule {t} nat-prerouting jump services
add chain {t} nat-output {{ type nat hook output priority -100 ; }}
add rule {t} nat-output jump services
add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}
add rule {t} nat-postrouting jump masquerading
"
    );
    let node_ports = svcs.iter().any(|s| s.node_port.is_some());
    if node_ports {
        let _ = write!(
            out,
            "add set {t} nodeport-ips {{ type {addr} ; comment \"IPs that accept NodePort traffic\" ; }}
add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}
add rule {t} services {ip} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
"
        );
    }
    for svc in svcs {
        nft_service(&mut out, svc);
        if svc.node_port.is_some() {
            let ext = nft_ext_chain(svc);
            let _ = writeln!(out, "add chain {t} {ext}");
            let _ = writeln!(out, "flush chain {t} {ext}");
            let _ = writeln!(out, "add rule {t} {ext} jump mark-for-masquerade");
            let _ = writeln!(out, "add rule {t} {ext} goto {}", nft_svc_chain(svc));
        }
    }
    for svc in svcs {
        if let Some(node_port) = svc.node_port {
            let _ = writeln!(
                out,
                "add element {t} service-nodeports {{ tcp . {node_port} : goto {} }}",
                nft_ext_chain(svc)
            );
        }
    }
    for svc in svcs {
        let _ = writeln!(out, "add element {t} cluster-ips {{ {} }}", svc.ip);
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} . tcp . {} : goto {} }}",
            svc.ip,
            svc.port,
            nft_svc_chain(svc)
        );
    }
    out
}

/// The node addresses NodePorts are served on, in kube-proxy's nftables
/// layout (its `nodeport-ips` set): each in its own family's table.
pub fn nft_nodeport_ips(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|&ip| {
            let t = Family::of(IpFamily::of(ip)).nft_table;
            format!("add element {t} nodeport-ips {{ {ip} }}\n")
        })
        .collect()
}

/// kube-proxy nftables mode's transaction after service `which` changed:
/// its chains rewritten, endpoint chains no longer used deleted.
pub fn nft_partial(before: &[Svc], after: &[Svc], which: usize) -> String {
    let mut out = String::new();
    let t = Family::of(after[which].family()).nft_table;
    nft_service(&mut out, &after[which]);
    for ep in &before[which].backends {
        if !after[which].backends.contains(ep) {
            let chain = nft_ep_chain(&before[which], ep);
            let _ = writeln!(out, "flush chain {t} {chain}");
            let _ = writeln!(out, "delete chain {t} {chain}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{services, with_node_ports, with_one_endpoint_changed};

    #[test]
    fn chain_names_are_kube_proxy_shaped_and_distinct() {
        let svcs = services(IpFamily::Ipv4, 3, 2, None);
        let a = svc_chain(&svcs[0]);
        assert_eq!(a.len(), "KUBE-SVC-".len() + 16);
        assert_ne!(a, svc_chain(&svcs[1]));
        assert!(a.len() <= 28, "iptables chain names are at most 28 chars");
    }

    #[test]
    fn full_iptables_has_one_service_rule_per_service_and_probabilities() {
        let svcs = services(IpFamily::Ipv4, 5, 3, None);
        let text = iptables_full(&svcs);
        assert_eq!(text.matches("-A KUBE-SERVICES -m comment").count(), 6);
        assert_eq!(text.matches("--probability 0.3333333333").count(), 5);
        assert_eq!(text.matches("--probability 0.5000000000").count(), 5);
        assert_eq!(text.matches("-j DNAT").count(), 15);
    }

    #[test]
    fn partial_sync_rewrites_one_service_and_deletes_its_old_endpoint() {
        let before = services(IpFamily::Ipv4, 4, 2, None);
        let after = with_one_endpoint_changed(&before, 2, 1);
        let text = iptables_partial(&before, &after, 2);
        assert_eq!(text.matches("-j DNAT").count(), 2);
        assert_eq!(text.matches("-X KUBE-SEP-").count(), 1);
        let nft = nft_partial(&before, &after, 2);
        assert_eq!(nft.matches("delete chain").count(), 1);
        assert!(nft.contains("numgen random mod 2 vmap"));
    }

    #[test]
    fn ipv6_services_get_kube_proxys_ip6tables_and_ip6_nftables_layout() {
        let svcs = services(IpFamily::Ipv6, 2, 2, None);
        let ipt = iptables_full(&svcs);
        assert!(
            !ipt.contains("/32 ") && !ipt.contains("127.0.0.0/8"),
            "{ipt}"
        );
        assert!(ipt.contains("-d fd00:10:96::2/128 --dport 80"), "{ipt}");
        assert!(
            ipt.contains("! -s fd00:10:244::/56 -j KUBE-MARK-MASQ"),
            "{ipt}"
        );
        assert!(
            ipt.contains("-j DNAT --to-destination [fd00:10:128::1]:8080"),
            "{ipt}"
        );
        let nft = nft_full(&svcs);
        assert!(
            !nft.contains(" ip kube-proxy") && !nft.contains("ipv4_addr"),
            "{nft}"
        );
        assert!(nft.contains("add table ip6 kube-proxy"), "{nft}");
        assert!(
            nft.contains("ip6 daddr fd00:10:96::1 tcp dport 80 ip6 saddr != fd00:10:244::/56"),
            "{nft}"
        );
        assert!(nft.contains("dnat to [fd00:10:128::1]:8080"), "{nft}");
        assert!(
            nft.contains("__fd00.10.128..1/8080"),
            "no colons in chain names: {nft}"
        );
        assert_eq!(
            iptables_restore_of(IpFamily::Ipv6),
            iptables_restore().replacen("iptables", "ip6tables", 1)
        );
    }

    #[test]
    fn ipv6_node_ports_get_kube_proxys_ip6tables_and_ip6_nftables_node_port_rules() {
        let target = BackendAddr {
            ip: "fd00:10:244:2::10".parse().unwrap(),
            port: crate::scenario::TARGET_PORT,
        };
        let svcs = with_node_ports(services(IpFamily::Ipv6, 3, 2, Some(target)));
        let ipt = iptables_full(&svcs);
        // Every local address but ::1, as kube-proxy's IPv6 proxier jumps.
        assert!(
            ipt.contains("-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS\n"),
            "{ipt}"
        );
        assert_eq!(
            ipt.matches("-A KUBE-NODEPORTS -m comment").count(),
            3,
            "{ipt}"
        );
        assert!(ipt.contains("--dport 32767 -j KUBE-EXT-"), "{ipt}");
        assert!(
            ipt.contains("-j DNAT --to-destination [fd00:10:244:2::10]:8080"),
            "{ipt}"
        );
        // The IPv4 proxier keeps localhost NodePorts (its default).
        let ipt4 = iptables_full(&with_node_ports(services(IpFamily::Ipv4, 1, 1, None)));
        assert!(
            ipt4.contains("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n"),
            "{ipt4}"
        );

        let node: IpAddr = "fd00:192:168:100::1".parse().unwrap();
        let nft = nft_full(&svcs) + &nft_nodeport_ips(&[node]);
        assert!(
            nft.contains("add set ip6 kube-proxy nodeport-ips { type ipv6_addr ;"),
            "{nft}"
        );
        assert!(
            nft.contains(
                "add rule ip6 kube-proxy services ip6 daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
            ),
            "{nft}"
        );
        assert!(
            nft.contains(
                "add element ip6 kube-proxy service-nodeports { tcp . 32767 : goto external-"
            ),
            "{nft}"
        );
        assert!(
            nft.ends_with("add element ip6 kube-proxy nodeport-ips { fd00:192:168:100::1 }\n"),
            "{nft}"
        );
        assert!(!nft.contains(" ip kube-proxy"), "{nft}");
    }

    #[test]
    fn node_port_addresses_go_to_their_own_familys_table() {
        let ips: [IpAddr; 2] = ["192.168.100.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        assert_eq!(
            nft_nodeport_ips(&ips),
            "add element ip kube-proxy nodeport-ips { 192.168.100.1 }\n\
             add element ip6 kube-proxy nodeport-ips { fd00::1 }\n"
        );
    }
}
