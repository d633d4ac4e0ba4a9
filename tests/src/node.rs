//! Nodes of a testbed: node "a", which every testbed has, and the ones
//! [`crate::Testbed::add_node`] adds. Each node is a network namespace with its own bridge
//! and pod subnet (`10.244.<k>.0/24` by default; see [`PodSubnets`] for larger ones),
//! conflist, host-local data, cgroup, bpffs dir and state dir, so an agent can run on each. Node `k > 0` is joined to node a by a veth pair
//! (`itbl<k>` in a, `itbl0` in node k; `192.168.255.<4k+1>/30` and `<4k+2>/30`), with
//! routes for the other nodes' pod subnets through a and forwarding on. Nothing routes
//! out of the testbed: there is no default route anywhere.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::netns;

/// Most nodes a testbed can have (the link /30s must fit in 192.168.255.0/24).
pub(crate) const MAX_NODES: usize = 64;
/// Longest extra node name (it ends up in netns, cgroup and bpffs names).
const MAX_NAME_LEN: usize = 8;

/// A node of a testbed. [`NodeId::A`] is the node every testbed starts with; the others
/// come from [`crate::Testbed::add_node`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) usize);

impl NodeId {
    /// The first node, the one every function without `_on` works on.
    pub const A: NodeId = NodeId(0);

    /// `k`: the node's pod subnet is the `k`-th block of [`PodSubnets`]
    /// (`10.244.<k>.0/24` by default).
    pub fn index(self) -> usize {
        self.0
    }
}

/// What the testbed made for one node.
#[derive(Debug)]
pub struct TestbedNode {
    pub(crate) id: NodeId,
    pub(crate) name: String,
    pub(crate) netns: String,
    pub(crate) cgroup_path: PathBuf,
    pub(crate) state_dir: PathBuf,
    pub(crate) bpffs_dir: PathBuf,
    pub(crate) conflist_path: PathBuf,
    pub(crate) conflist: Value,
    pub(crate) plugin_types: Vec<String>,
    /// The testbed's pod subnet layout (every node of a testbed has the same).
    pub(crate) subnets: PodSubnets,
}

impl TestbedNode {
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// "a" for the first node, else the name given to `add_node`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node netns: `itb-<id>-node` for node a, `itb-<id>-node-<name>` for the others.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The node's cgroup: `interceptor-tb-<id>` for a, `interceptor-tb-<id>-<name>` for
    /// the others (siblings under the cgroup2 root, so one node's agent never sees the
    /// other node's pods).
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup_path
    }

    /// The testbed's state dir for node a, `<state>/nodes/<name>` for the others.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `/sys/fs/bpf/interceptor-tb-<id>` for a, `...-<name>` for the others.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// The agent's `--state-dir`, `<node state>/agent`.
    pub fn agent_state_dir(&self) -> PathBuf {
        self.state_dir.join("agent")
    }

    /// The socket this node's interceptor-cni is configured to call.
    pub fn agent_socket(&self) -> PathBuf {
        self.agent_state_dir().join("cni.sock")
    }

    /// Where the agent's stdout and stderr go, `<node state>/agent.log`.
    pub fn agent_log_path(&self) -> PathBuf {
        self.state_dir.join("agent.log")
    }

    pub fn conflist_path(&self) -> &Path {
        &self.conflist_path
    }

    pub fn conflist(&self) -> &Value {
        &self.conflist
    }

    /// Plugin `type`s in chain order.
    pub fn plugin_types(&self) -> &[String] {
        &self.plugin_types
    }

    /// `10.244.<k>.0/24` by default, the `k`-th block of the testbed's [`PodSubnets`].
    pub fn pod_subnet(&self) -> String {
        self.subnets.subnet(self.id)
    }

    /// `10.244.<k>.1` by default: the first address of the pod subnet, the bridge's.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnets.gateway(self.id)
    }

    /// `fd00:10:244:<k>::/64` on a dual-stack testbed.
    pub fn pod_subnet6(&self) -> Option<String> {
        self.subnets.subnet6(self.id)
    }

    /// `fd00:10:244:<k>::1` on a dual-stack testbed.
    pub fn gateway6(&self) -> Option<Ipv6Addr> {
        self.subnets.gateway6(self.id)
    }

    /// How many pods the node's subnet has addresses for.
    pub fn pod_capacity(&self) -> usize {
        self.subnets.pod_capacity()
    }
}

/// The pod subnets of a testbed's nodes: node `k` gets the `k`-th block of
/// `10.244.0.0/16` ([`crate::CLUSTER_POD_CIDR`], the route every pod has) of one prefix
/// length. The default, /24, gives node `k` `10.244.<k>.0/24` ([`crate::POD_SUBNET`] for
/// node a), room for 253 pods, 64 nodes. A shorter prefix holds more pods per node and
/// allows fewer nodes: /21 gives node a `10.244.0.0/21` (2,045 pods) and node `k`
/// `10.244.<8k>.0/21`, 32 nodes. Node a's gateway stays `10.244.0.1` ([`crate::GATEWAY`])
/// and host-local hands out `10.244.0.2` upwards either way, so the first pods get the
/// same addresses. A Linux bridge takes at most 1,023 ports, so one node holds at most that
/// many pods whatever the prefix.
///
/// Dual-stack testbeds ([`PodSubnets::with_ipv6`]) also give node `k` the IPv6 subnet
/// `fd00:10:244:<k>::/64` of [`crate::CLUSTER_POD_CIDR6`] (gateway `::1`), routed between
/// the nodes like the IPv4 ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodSubnets {
    prefix_len: u8,
    ipv6: bool,
}

impl Default for PodSubnets {
    fn default() -> Self {
        PodSubnets {
            prefix_len: 24,
            ipv6: false,
        }
    }
}

impl PodSubnets {
    /// Shortest prefix: one node with all of `10.244.0.0/16`.
    pub const MIN_PREFIX_LEN: u8 = 16;
    /// Longest prefix: the default.
    pub const MAX_PREFIX_LEN: u8 = 24;

    /// Subnets of `/prefix_len` (16 to 24).
    pub fn new(prefix_len: u8) -> Result<PodSubnets> {
        if !(Self::MIN_PREFIX_LEN..=Self::MAX_PREFIX_LEN).contains(&prefix_len) {
            bail!(
                "pod subnet prefix /{prefix_len}: use /{} to /{} (blocks of 10.244.0.0/16)",
                Self::MIN_PREFIX_LEN,
                Self::MAX_PREFIX_LEN
            );
        }
        Ok(PodSubnets {
            prefix_len,
            ipv6: false,
        })
    }

    /// The same subnets plus an IPv6 one per node.
    pub fn with_ipv6(self, ipv6: bool) -> PodSubnets {
        PodSubnets { ipv6, ..self }
    }

    pub fn prefix_len(self) -> u8 {
        self.prefix_len
    }

    /// Whether the nodes have IPv6 pod subnets too.
    pub fn ipv6(self) -> bool {
        self.ipv6
    }

    /// Node `node`'s IPv6 pod subnet, `fd00:10:244:<k>::/64`, on dual-stack testbeds.
    pub fn subnet6(self, node: NodeId) -> Option<String> {
        self.ipv6.then(|| format!("fd00:10:244:{:x}::/64", node.0))
    }

    /// The bridge's IPv6 address on node `node` (`fd00:10:244:<k>::1`), dual-stack only.
    pub fn gateway6(self, node: NodeId) -> Option<Ipv6Addr> {
        let index = u16::try_from(node.0).expect("node index checked against max_nodes");
        self.ipv6
            .then(|| Ipv6Addr::new(0xfd00, 0x10, 0x244, index, 0, 0, 0, 1))
    }

    /// Most nodes: as many blocks as fit in `10.244.0.0/16`, at most [`MAX_NODES`] (the
    /// link /30s).
    pub fn max_nodes(self) -> usize {
        (1usize << (self.prefix_len - Self::MIN_PREFIX_LEN)).min(MAX_NODES)
    }

    /// Addresses host-local can give pods: the block without its network, gateway and
    /// broadcast addresses.
    pub fn pod_capacity(self) -> usize {
        (1usize << (32 - self.prefix_len)) - 3
    }

    fn base(self, node: NodeId) -> u32 {
        let index = u32::try_from(node.0).expect("node index checked against max_nodes");
        u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (index << (32 - self.prefix_len))
    }

    /// Node `node`'s pod subnet, e.g. `10.244.1.0/24`.
    pub fn subnet(self, node: NodeId) -> String {
        format!("{}/{}", Ipv4Addr::from(self.base(node)), self.prefix_len)
    }

    /// The first address of node `node`'s subnet: the bridge's, the pods' gateway.
    pub fn gateway(self, node: NodeId) -> Ipv4Addr {
        Ipv4Addr::from(self.base(node) + 1)
    }
}

#[cfg(test)]
pub(crate) fn pod_subnet(node: NodeId) -> String {
    PodSubnets::default().subnet(node)
}

#[cfg(test)]
pub(crate) fn gateway(node: NodeId) -> Ipv4Addr {
    PodSubnets::default().gateway(node)
}

fn subnet_octet(node: NodeId) -> u8 {
    u8::try_from(node.0).expect("node index checked against MAX_NODES")
}

/// The interface that leads to node `to`, in a node netns it is wired to.
pub fn link_name(to: NodeId) -> String {
    format!("itbl{}", to.0)
}

/// Addresses of the two ends of node `k`'s (`k >= 1`) link to node a: (a's end, node k's end),
/// `192.168.255.<4k+1>` and `<4k+2>`, both /30.
pub fn link_addrs(node: NodeId) -> (Ipv4Addr, Ipv4Addr) {
    let base = subnet_octet(node) * 4;
    (
        Ipv4Addr::new(192, 168, 255, base + 1),
        Ipv4Addr::new(192, 168, 255, base + 2),
    )
}

/// Names are short, lower-case alphanumeric or `-`, unique, and not "a"; the testbed
/// must have room for one more node (`max_nodes`).
pub(crate) fn validate_name(name: &str, existing: &[TestbedNode], max_nodes: usize) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars || name.starts_with('-') {
        bail!("node name {name:?}: use 1 to {MAX_NAME_LEN} of [a-z0-9-], not starting with '-'");
    }
    if existing.iter().any(|n| n.name == name) {
        bail!("the testbed already has a node named {name:?}");
    }
    if existing.len() >= max_nodes {
        bail!("this testbed has room for at most {max_nodes} nodes (its pod subnets)");
    }
    Ok(())
}

/// Joins `new` to node a: the veth pair, its addresses, routes both ways, routes between
/// `new` and the other extra nodes through a, and forwarding on in a and `new`. On error
/// the caller deletes `new`'s netns (which takes the veth pair and the routes through
/// it) and calls [`unroute`].
pub(crate) fn wire(a: &TestbedNode, new: &TestbedNode, others: &[&TestbedNode]) -> Result<()> {
    let in_a = link_name(new.id);
    let in_new = link_name(NodeId::A);
    let (a_addr, new_addr) = link_addrs(new.id);
    netns::ip(&[
        "-n", &a.netns, "link", "add", &in_a, "type", "veth", "peer", "name", &in_new, "netns",
        &new.netns,
    ])?;
    for (ns, dev, addr) in [(&a.netns, &in_a, a_addr), (&new.netns, &in_new, new_addr)] {
        netns::ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
        netns::ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    let new_subnet = new.pod_subnet();
    netns::ip(&[
        "-n",
        &a.netns,
        "route",
        "add",
        &new_subnet,
        "via",
        &new_addr.to_string(),
        "dev",
        &in_a,
    ])?;
    for node in std::iter::once(a).chain(others.iter().copied()) {
        netns::ip(&[
            "-n",
            &new.netns,
            "route",
            "add",
            &node.pod_subnet(),
            "via",
            &a_addr.to_string(),
            "dev",
            &in_new,
        ])?;
    }
    for other in others {
        let (a_side, _) = link_addrs(other.id);
        netns::ip(&[
            "-n",
            &other.netns,
            "route",
            "add",
            &new_subnet,
            "via",
            &a_side.to_string(),
            "dev",
            &in_new,
        ])?;
    }
    for ns in [&a.netns, &new.netns] {
        set_ip_forward(ns)?;
    }
    if new.subnets.ipv6() {
        wire6(a, new, others)?;
    }
    Ok(())
}

/// The IPv6 part of [`wire`] on dual-stack testbeds: `fd00:ffff:<k>::1/64` (in a) and
/// `::2` (in `new`) on the same veth pair, routes for the IPv6 pod subnets the same
/// ways, IPv6 forwarding on.
fn wire6(a: &TestbedNode, new: &TestbedNode, others: &[&TestbedNode]) -> Result<()> {
    let (in_a, in_new) = (link_name(new.id), link_name(NodeId::A));
    let (a_addr, new_addr) = link_addrs6(new.id);
    for (ns, dev, addr) in [(&a.netns, &in_a, a_addr), (&new.netns, &in_new, new_addr)] {
        netns::ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            dev,
            "nodad",
        ])?;
    }
    let subnet6 = |node: &TestbedNode| node.pod_subnet6().expect("a dual-stack node");
    let route = |ns: &str, subnet: &str, via: Ipv6Addr, dev: &str| {
        netns::ip(&[
            "-n",
            ns,
            "-6",
            "route",
            "add",
            subnet,
            "via",
            &via.to_string(),
            "dev",
            dev,
        ])
    };
    route(&a.netns, &subnet6(new), new_addr, &in_a)?;
    for node in std::iter::once(a).chain(others.iter().copied()) {
        route(&new.netns, &subnet6(node), a_addr, &in_new)?;
    }
    for other in others {
        let (a_side, _) = link_addrs6(other.id);
        route(&other.netns, &subnet6(new), a_side, &in_new)?;
    }
    for ns in [&a.netns, &new.netns] {
        netns::with_netns(ns, || {
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
        })
        .with_context(|| format!("turning on IPv6 forwarding in {ns}"))?;
    }
    Ok(())
}

/// The IPv6 addresses of the link between node a and node `to`: (a's side, `to`'s side).
pub fn link_addrs6(to: NodeId) -> (Ipv6Addr, Ipv6Addr) {
    let k = u16::try_from(to.0).expect("node index checked against MAX_NODES");
    (
        Ipv6Addr::new(0xfd00, 0xffff, k, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0xfd00, 0xffff, k, 0, 0, 0, 0, 2),
    )
}

/// Turns off duplicate address detection in `ns` (for its interfaces now and later): on
/// a testbed's private links nothing can collide, and a tentative address would fail the
/// first connections of a pod for a second or two.
pub(crate) fn no_dad(ns: &str) -> Result<()> {
    netns::with_netns(ns, || {
        for conf in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad"), "0")?;
        }
        Ok(())
    })
    .with_context(|| format!("turning off IPv6 DAD in {ns}"))
}

/// Best effort: removes the routes to `new`'s pod subnet that [`wire`] added in `others`.
pub(crate) fn unroute(new: &TestbedNode, others: &[&TestbedNode]) {
    for other in others {
        let _ = netns::ip(&["-n", &other.netns, "route", "del", &new.pod_subnet()]);
        if let Some(subnet6) = new.pod_subnet6() {
            let _ = netns::ip(&["-n", &other.netns, "-6", "route", "del", &subnet6]);
        }
    }
}

/// `net.ipv4.ip_forward=1` in `netns` only: /proc/sys/net resolves to the namespace of
/// the thread that opens it.
fn set_ip_forward(ns: &str) -> Result<()> {
    netns::with_netns(ns, || std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .with_context(|| format!("turning on ip_forward in {ns}"))
}

/// `net.ipv4.ip_forward` of `netns`, as the thread that entered it reads it.
pub fn ip_forward(ns: &str) -> Result<bool> {
    let v = netns::with_netns(ns, || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
    })?;
    Ok(v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_addresses_and_subnets() {
        assert_eq!(
            link_addrs(NodeId(1)),
            (
                Ipv4Addr::new(192, 168, 255, 5),
                Ipv4Addr::new(192, 168, 255, 6)
            )
        );
        assert_eq!(
            link_addrs(NodeId(MAX_NODES - 1)).1,
            Ipv4Addr::new(192, 168, 255, 254)
        );
        assert_eq!(pod_subnet(NodeId::A), crate::POD_SUBNET);
        assert_eq!(gateway(NodeId::A), crate::GATEWAY);
        assert_eq!(pod_subnet(NodeId(1)), "10.244.1.0/24");
        assert_eq!(gateway(NodeId(1)), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(pod_subnet(NodeId(63)), "10.244.63.0/24");
        assert_eq!(link_name(NodeId(1)), "itbl1");
    }

    #[test]
    fn larger_pod_subnets_keep_node_a_gateway_and_split_the_cluster_range() {
        let default = PodSubnets::default();
        assert_eq!(default.prefix_len(), 24);
        assert_eq!(default.pod_capacity(), 253);
        assert_eq!(default.max_nodes(), MAX_NODES);
        let wide = PodSubnets::new(21).unwrap();
        assert_eq!(wide.subnet(NodeId::A), "10.244.0.0/21");
        assert_eq!(wide.gateway(NodeId::A), crate::GATEWAY);
        assert_eq!(wide.subnet(NodeId(1)), "10.244.8.0/21");
        assert_eq!(wide.gateway(NodeId(1)), Ipv4Addr::new(10, 244, 8, 1));
        assert_eq!(wide.pod_capacity(), 2_045);
        assert_eq!(wide.max_nodes(), 32);
        assert_eq!(wide.subnet(NodeId(31)), "10.244.248.0/21");
        let whole = PodSubnets::new(16).unwrap();
        assert_eq!(whole.subnet(NodeId::A), crate::CLUSTER_POD_CIDR);
        assert_eq!(whole.max_nodes(), 1);
        assert!(PodSubnets::new(15).is_err());
        assert!(PodSubnets::new(25).is_err());
    }

    #[test]
    fn node_names() {
        assert!(validate_name("b", &[], MAX_NODES).is_ok());
        assert!(validate_name("node-2", &[], MAX_NODES).is_ok());
        for bad in ["", "B", "-b", "a/b", "waytoolongname"] {
            assert!(validate_name(bad, &[], MAX_NODES).is_err(), "{bad:?}");
        }
        assert!(
            validate_name("b", &[], 0).is_err(),
            "no room for another node"
        );
    }
}
