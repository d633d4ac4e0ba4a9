//! IPv6 outbound interception on the real kernel (root): the programs attached through
//! `EbpfDatapath::attach` to a cgroup this test makes, a network namespace of its own
//! with IPv4 and IPv6 addresses on a veth whose both ends it holds, the pod enrolled in
//! both families, and this test process moved into the cgroup (a socket belongs to the
//! cgroup of the process that made it, and the accepted socket to its listener's), its
//! sockets made inside the netns. Every connect stays inside that netns.
//!
//! Checked: a native IPv6 connect lands on `[pod]:15001`, `IP6T_SO_ORIGINAL_DST` on the
//! accepted socket and `getpeername` on the client answer the original destination; a
//! dual-stack socket's connect to `::ffff:a.b.c.d` lands on the pod's IPv4 listener and
//! `SO_ORIGINAL_DST` answers it there; `::1`, `fe80::` and excluded destinations
//! (IPv6 CIDR, IPv4 CIDR through a mapped address, port) go where they were sent; the
//! proxy's marked sockets are skipped; a pod without an IPv6 address has its IPv6 left
//! alone. Inbound, from a second netns (the veth's other end, not enrolled): tc steers
//! an IPv6 SYN to `[::]:15003` and restores the replies, `IP6T_SO_ORIGINAL_DST` answers
//! from the tc record, sock_ops marks it accepted and forgets it at close; a marked
//! (proxy) socket's connect to the pod goes to its 15003, answered from connect6's
//! record; an IPv4 client on that dual-stack listener is answered through `SOL_IP`;
//! unenrolling removes the IPv6 entries; an IPv6-only pod has only its IPv6 steered.
use std::io::{ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData};
use interceptor::config::MeshConfig;
use interceptor::datapath::ebpf::{
    ip6_key, is_our_pin, EbpfDatapath, EbpfOptions, KernelSupport, PROG_CONNECT6,
};
use interceptor::datapath::{probe, Datapath, PodDatapath};
use interceptor::inpod::PodNetns;
use interceptor_common::{
    inbound_state, maps, rules, FlowKey, InboundFlow, InboundKey, InboundKey6, OrigDst,
    INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK,
};

/// Fixed names, so a run that was killed leaves nothing the next one does not remove.
const NETNS: &str = "icpt-test-connect6";
/// The other end of the pod's veth: a client from outside the pod.
const PEER_NETNS: &str = "icpt-test-connect6-c";
const CGROUP: &str = "interceptor-test-connect6";
const PIN_DIR: &str = "/sys/fs/bpf/interceptor-test-connect6";
const IFNAME: &str = "veth6";

const POD4: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x66, 0, 0, 0, 0, 0, 2);
/// Destinations that are redirected (nothing listens there; nothing has to).
const SERVICE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x66, 0, 0, 0, 0, 0, 0x99);
const SERVICE4: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 99);
/// Addresses on the pod interface, reached directly when a rule excludes them.
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 5);
const OTHER4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 5);
const LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x66, 0, 0, 0, 0, 0, 7);
const PEER4: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 7);

/// The tests share fixed names, a cgroup and this process's membership of it: one at a
/// time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Root is needed; under `CI=true` a non-root run fails, never skips.
fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "the connect6 tests need root, and CI=true forbids skipping them"
    );
    eprintln!("skipping: not root");
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_in_netns(args: &str) {
    let mut all = vec!["-n", NETNS];
    all.extend(args.split_whitespace());
    ip(&all);
}

/// This process's cgroup v2 path (`0::/path` in /proc/self/cgroup) under `root`.
fn own_cgroup(root: &Path) -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 entry");
    root.join(rel.trim_start_matches('/'))
}

/// Everything the test made, removed on every exit path (panics included).
struct Fixture {
    datapath: Option<EbpfDatapath>,
    netns: Option<Arc<PodNetns>>,
    peer: Option<Arc<PodNetns>>,
    cookie: u64,
    cgroup: PathBuf,
    home_cgroup: PathBuf,
    /// Released after `drop` has removed everything (fields drop after it), so the next
    /// test never meets this one's leftovers.
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Out of the test cgroup first, so it can be removed.
        let _ = std::fs::write(
            self.home_cgroup.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        if let Some(datapath) = self.datapath.take() {
            let _ = datapath.teardown();
        }
        // The netns files go before the lock does, so the next test starts clean.
        self.netns = None;
        self.peer = None;
        remove_leftovers(&self.cgroup);
    }
}

fn remove_leftovers(cgroup: &Path) {
    for netns in [NETNS, PEER_NETNS] {
        let _ = Command::new("ip").args(["netns", "del", netns]).output();
    }
    let _ = interceptor::datapath::bpffs::remove_pin_dir(Path::new(PIN_DIR), &is_our_pin);
    let _ = std::fs::remove_dir(PIN_DIR);
    // Only this test puts a process there, and a killed run's process is gone.
    let _ = std::fs::remove_dir(cgroup);
}

/// `EbpfDatapath::attach` as the agent calls it, on the test cgroup and pin dir.
fn attach(cgroup: &Path, outbound_flow_capacity: Option<u32>) -> EbpfDatapath {
    let support = KernelSupport::from_probe(&probe::probe());
    assert!(
        support.getpeername,
        "this test checks getpeername6, which needs 5.8"
    );
    EbpfDatapath::attach(
        cgroup,
        Path::new(PIN_DIR),
        EbpfOptions {
            debug: false,
            sockmap: false,
            inbound_flow_capacity: None,
            outbound_flow_capacity,
            support,
        },
    )
    .expect("attach")
}

fn setup() -> Fixture {
    setup_with(None)
}

/// [`setup`] with ORIG_DST_BY_FLOW and ORIG_DST6_BY_FLOW of this size.
fn setup_with(outbound_flow_capacity: Option<u32>) -> Fixture {
    // A test that failed poisons the lock; the next one still runs (and cleans up).
    let serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let root = interceptor::datapath::cgroup::detect_cgroup2_root().expect("a cgroup2 mount");
    let cgroup = root.join(CGROUP);
    remove_leftovers(&cgroup);
    // Made before anything else, so whatever follows is removed if a step fails.
    let mut fixture = Fixture {
        datapath: None,
        netns: None,
        peer: None,
        cookie: 0,
        cgroup: cgroup.clone(),
        home_cgroup: own_cgroup(&root),
        _serial: serial,
    };
    ip(&["netns", "add", NETNS]);
    ip(&["netns", "add", PEER_NETNS]);
    std::fs::create_dir(&cgroup).expect("creating the test cgroup");
    let netns = Arc::new(
        PodNetns::enter(&PathBuf::from(format!("/var/run/netns/{NETNS}"))).expect("netns"),
    );
    let cookie = netns.cookie();
    fixture.netns = Some(Arc::clone(&netns));
    fixture.peer = Some(Arc::new(
        PodNetns::enter(&PathBuf::from(format!("/var/run/netns/{PEER_NETNS}")))
            .expect("peer netns"),
    ));
    fixture.cookie = cookie;
    ip_in_netns("link set lo up");
    ip_in_netns(&format!(
        "link add {IFNAME} type veth peer name {IFNAME}p netns {PEER_NETNS}"
    ));
    for args in [
        "link set lo up".to_string(),
        format!("link set {IFNAME}p up"),
        format!("addr add {PEER4}/24 dev {IFNAME}p"),
        format!("-6 addr add {PEER6}/64 dev {IFNAME}p nodad"),
    ] {
        let mut all = vec!["-n", PEER_NETNS];
        all.extend(args.split_whitespace());
        ip(&all);
    }
    ip_in_netns(&format!("link set {IFNAME} up"));
    ip_in_netns(&format!("addr add {POD4}/24 dev {IFNAME}"));
    ip_in_netns(&format!("addr add {OTHER4}/32 dev {IFNAME}"));
    ip_in_netns(&format!("-6 addr add {POD6}/64 dev {IFNAME} nodad"));
    ip_in_netns(&format!("-6 addr add {OTHER6}/128 dev {IFNAME} nodad"));
    ip_in_netns(&format!("-6 addr add {LINK_LOCAL}/64 dev {IFNAME} nodad"));
    let datapath = attach(&cgroup, outbound_flow_capacity);
    assert!(
        Path::new(PIN_DIR)
            .join(format!("link_{PROG_CONNECT6}"))
            .exists(),
        "the connect6 link is pinned beside connect4's"
    );
    datapath
        .enroll(
            &PodDatapath {
                netns_cookie: cookie,
                ipv4: POD4,
                ifname: IFNAME.into(),
            },
            &netns,
        )
        .expect("enroll");
    datapath.enroll_ipv6(cookie, POD6).expect("enroll IPv6");
    assert_eq!(datapath.pod_ipv6(cookie), Some(POD6));
    fixture.datapath = Some(datapath);
    // From here on this process's new sockets belong to the test cgroup.
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .expect("joining the test cgroup");
    fixture
}

impl Fixture {
    fn datapath(&self) -> &EbpfDatapath {
        self.datapath.as_ref().expect("attached")
    }

    fn in_netns<R>(&self, f: impl FnOnce() -> R) -> R {
        self.netns
            .as_ref()
            .expect("made in setup")
            .run_blocking(f)
            .expect("entering the netns")
    }

    fn listen(&self, addr: SocketAddr) -> TcpListener {
        let listener = self
            .in_netns(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("listening on {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        listener
    }

    fn connect(&self, addr: SocketAddr) -> TcpStream {
        self.in_netns(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"))
    }

    fn in_peer<R>(&self, f: impl FnOnce() -> R) -> R {
        self.peer
            .as_ref()
            .expect("made in setup")
            .run_blocking(f)
            .expect("entering the peer netns")
    }

    /// A socket carrying the proxy's mark, connected to `addr`.
    fn connect_marked(&self, addr: SocketAddr) -> TcpStream {
        self.in_netns(|| marked_connect(addr))
            .unwrap_or_else(|e| panic!("marked connect to {addr}: {e}"))
    }
}

/// A socket carrying the proxy's mark, as its upstream sockets do, connected to `addr`
/// from the calling thread's netns.
fn marked_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_mark(PROXY_MARK)?;
    socket.connect_timeout(&addr.into(), Duration::from_secs(2))?;
    Ok(TcpStream::from(socket))
}

/// The connection waiting on `listener` (the connect has completed, so it is queued).
fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match listener.accept() {
            Ok(accepted) => return accepted,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept on {:?}: {e}", listener.local_addr()),
        }
    }
}

fn nothing_queued(listener: &TcpListener, what: &str) {
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("{what}: a connection from {peer} reached the proxy's listener"),
        Err(e) => panic!("{what}: accept: {e}"),
    }
}

/// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`, as the proxy asks it.
fn original_dst6(stream: &TcpStream) -> std::io::Result<SocketAddrV6> {
    // SAFETY: a zeroed sockaddr_in6 is valid; the kernel writes at most `len` bytes.
    unsafe {
        let mut sin6: libc::sockaddr_in6 = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc = libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IPV6,
            80,
            (&mut sin6 as *mut libc::sockaddr_in6).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        assert_eq!(len as usize, std::mem::size_of::<libc::sockaddr_in6>());
        assert_eq!(i32::from(sin6.sin6_family), libc::AF_INET6);
        Ok(SocketAddrV6::new(
            Ipv6Addr::from(sin6.sin6_addr.s6_addr),
            u16::from_be(sin6.sin6_port),
            0,
            0,
        ))
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`.
fn original_dst4(stream: &TcpStream) -> std::io::Result<SocketAddrV4> {
    // SAFETY: as above.
    unsafe {
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            80,
            (&mut sin as *mut libc::sockaddr_in).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        assert_eq!(i32::from(sin.sin_family), libc::AF_INET);
        Ok(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        ))
    }
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(ip), port)
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// Waits until `check` holds (records go when sockets reach CLOSE, asynchronously).
fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connect6_redirects_answers_and_leaves_alone_what_it_must() {
    if !privileged() {
        return;
    }
    let fixture = setup();
    let datapath = fixture.datapath();
    let proxy6 = fixture.listen(v6(POD6, OUTBOUND_PORT));
    let proxy4 = fixture.listen(v4(POD4, OUTBOUND_PORT));

    // A native IPv6 connect: on the pod's 15001, the original destination answered.
    let before = datapath.counters6();
    let client = fixture.connect(v6(SERVICE6, 8080));
    let (accepted, peer) = accept(&proxy6);
    assert_eq!(peer, client.local_addr().expect("local addr"));
    assert_eq!(
        client.local_addr().expect("local").ip(),
        IpAddr::V6(POD6),
        "the redirect targets the pod's own address, so the tuple is unique"
    );
    assert_eq!(
        original_dst6(&accepted).expect("IP6T_SO_ORIGINAL_DST"),
        SocketAddrV6::new(SERVICE6, 8080, 0, 0)
    );
    assert_eq!(
        client.peer_addr().expect("getpeername"),
        v6(SERVICE6, 8080),
        "getpeername6 hides the redirect"
    );
    // An IPv6 socket asking SOL_IP is not answered from the IPv6 record.
    assert!(original_dst4(&accepted).is_err());
    let after = datapath.counters6();
    assert_eq!(after.redirected, before.redirected + 1);
    assert_eq!(after.flows_recorded, before.flows_recorded + 1);
    assert_eq!(after.orig_dst_answered, before.orig_dst_answered + 1);
    assert_eq!(datapath.live_records6().orig_dst_by_flow, 1);
    drop(client);
    drop(accepted);
    eventually("the IPv6 flow record goes when the client closes", || {
        datapath.live_records6().orig_dst_by_flow == 0
    });

    // A dual-stack socket to an IPv4-mapped address: IPv4 on the wire, on the pod's IPv4
    // listener, answered through SOL_IP.
    let redirected4 = datapath.counters().expect("counters").redirected;
    let client = fixture.connect(SocketAddr::V6(SocketAddrV6::new(
        SERVICE4.to_ipv6_mapped(),
        8080,
        0,
        0,
    )));
    let (accepted, peer) = accept(&proxy4);
    assert_eq!(peer, v4(POD4, client.local_addr().expect("local").port()));
    assert_eq!(
        original_dst4(&accepted).expect("SO_ORIGINAL_DST"),
        SocketAddrV4::new(SERVICE4, 8080)
    );
    assert_eq!(
        client.peer_addr().expect("getpeername"),
        SocketAddr::V6(SocketAddrV6::new(SERVICE4.to_ipv6_mapped(), 8080, 0, 0)),
        "getpeername6 answers a mapped peer from the IPv4 record"
    );
    // sock_ops keyed the mapped socket's record by its IPv4 tuple (local_ip4 and
    // remote_ip4 are filled for an AF_INET6 socket with a mapped peer).
    let flows: HashMap<MapData, FlowKey, OrigDst> = HashMap::try_from(aya::maps::Map::HashMap(
        MapData::from_pin(Path::new(PIN_DIR).join(maps::ORIG_DST_BY_FLOW)).expect("pinned"),
    ))
    .expect("typed");
    let keys: Vec<FlowKey> = flows.keys().filter_map(Result::ok).collect();
    let expected = FlowKey {
        src_ipv4: u32::from_ne_bytes(POD4.octets()),
        dst_ipv4: u32::from_ne_bytes(POD4.octets()),
        src_port: client.local_addr().expect("local").port(),
        dst_port: OUTBOUND_PORT,
    };
    assert_eq!(keys, vec![expected]);
    let counters = datapath.counters().expect("counters");
    assert_eq!(counters.redirected, redirected4 + 1);
    assert_eq!(counters.ipv6.v4_mapped_redirected, 1);
    assert_eq!(
        datapath.counters6().redirected,
        after.redirected,
        "not an IPv6 redirect"
    );
    drop(client);
    drop(accepted);
    eventually(
        "the mapped flow's IPv4 record goes when the client closes",
        || datapath.live_records().orig_dst_by_flow == 0,
    );

    // A plain IPv4 connect still goes through connect4 as before (shared decision code).
    let client = fixture.connect(v4(SERVICE4, 8081));
    let (accepted, _) = accept(&proxy4);
    assert_eq!(
        original_dst4(&accepted).expect("SO_ORIGINAL_DST"),
        SocketAddrV4::new(SERVICE4, 8081)
    );
    assert_eq!(
        client.peer_addr().expect("getpeername4"),
        v4(SERVICE4, 8081)
    );
    assert_eq!(
        datapath
            .counters()
            .expect("counters")
            .ipv6
            .v4_mapped_redirected,
        1,
        "an AF_INET connect is not a mapped one"
    );
    drop(client);
    drop(accepted);

    // Loopback and link-local destinations are never steered.
    let loopback = fixture.listen(v6(Ipv6Addr::LOCALHOST, 8081));
    let client = fixture.connect(v6(Ipv6Addr::LOCALHOST, 8081));
    let _ = accept(&loopback);
    assert_eq!(
        client.peer_addr().expect("peer"),
        v6(Ipv6Addr::LOCALHOST, 8081)
    );
    nothing_queued(&proxy6, "::1");
    let ifindex = fixture.in_netns(|| nix::net::if_::if_nametoindex(IFNAME).expect("ifindex"));
    let link_local = SocketAddr::V6(SocketAddrV6::new(LINK_LOCAL, 8082, 0, ifindex));
    let listener = fixture.listen(link_local);
    let client = fixture.connect(link_local);
    let _ = accept(&listener);
    assert_eq!(
        client.peer_addr().expect("peer").ip(),
        IpAddr::V6(LINK_LOCAL)
    );
    nothing_queued(&proxy6, "fe80::2");

    // An excluded IPv6 range is left alone; without the rule the same destination is
    // redirected (so the exclusion, not something else, let it through).
    let other = fixture.listen(v6(OTHER6, 8083));
    let excluded: ipnet::Ipv6Net = "fd00:77::/64".parse().expect("net");
    datapath
        .set_rules6(rules::GLOBAL_SCOPE, &[excluded], &[])
        .expect("IPv6 rules");
    let client = fixture.connect(v6(OTHER6, 8083));
    let _ = accept(&other);
    assert_eq!(client.peer_addr().expect("peer"), v6(OTHER6, 8083));
    nothing_queued(&proxy6, "an excluded IPv6 range");
    // Per pod as well.
    datapath
        .set_rules6(rules::GLOBAL_SCOPE, &[], &[])
        .expect("IPv6 rules");
    datapath
        .set_rules6(fixture.cookie, &[excluded], &[])
        .expect("pod IPv6 rules");
    let _client = fixture.connect(v6(OTHER6, 8083));
    let _ = accept(&other);
    nothing_queued(&proxy6, "a pod's excluded IPv6 range");
    datapath
        .set_rules6(fixture.cookie, &[], &[])
        .expect("pod IPv6 rules");
    let _client = fixture.connect(v6(OTHER6, 8083));
    let (accepted, _) = accept(&proxy6);
    assert_eq!(
        original_dst6(&accepted).expect("IP6T_SO_ORIGINAL_DST"),
        SocketAddrV6::new(OTHER6, 8083, 0, 0)
    );

    // Port exclusions know no family.
    let mut config = MeshConfig {
        outbound_port_exclusion_list: vec![8083],
        ..MeshConfig::default()
    };
    datapath
        .set_rules(rules::GLOBAL_SCOPE, &config)
        .expect("rules");
    let _client = fixture.connect(v6(OTHER6, 8083));
    let _ = accept(&other);
    nothing_queued(&proxy6, "an excluded port");

    // The IPv4 ranges apply to an IPv4-mapped destination.
    config.outbound_port_exclusion_list.clear();
    config.outbound_ip_range_exclusion_list = vec!["10.77.0.0/16".parse().expect("net")];
    datapath
        .set_rules(rules::GLOBAL_SCOPE, &config)
        .expect("rules");
    let other4 = fixture.listen(v4(OTHER4, 8084));
    let client = fixture.connect(SocketAddr::V6(SocketAddrV6::new(
        OTHER4.to_ipv6_mapped(),
        8084,
        0,
        0,
    )));
    let _ = accept(&other4);
    assert_eq!(
        client.peer_addr().expect("peer"),
        SocketAddr::V6(SocketAddrV6::new(OTHER4.to_ipv6_mapped(), 8084, 0, 0))
    );
    nothing_queued(&proxy4, "an excluded IPv4 range behind a mapped address");

    // An inclusion list of IPv4 ranges only intercepts no IPv6 destination; an IPv6
    // inclusion range brings it back.
    config.outbound_ip_range_exclusion_list.clear();
    config.outbound_ip_range_inclusion_list = Some(vec!["10.0.0.0/8".parse().expect("net")]);
    datapath
        .set_rules(rules::GLOBAL_SCOPE, &config)
        .expect("rules");
    let _client = fixture.connect(v6(OTHER6, 8083));
    let _ = accept(&other);
    nothing_queued(
        &proxy6,
        "an IPv6 destination outside an IPv4-only inclusion list",
    );
    // The mesh config's lists hold both families: `set_rules` writes the IPv6 ranges too.
    config.outbound_ip_range_inclusion_list = Some(vec![
        "10.0.0.0/8".parse().expect("net"),
        "fd00:77::/64".parse().expect("net"),
    ]);
    datapath
        .set_rules(rules::GLOBAL_SCOPE, &config)
        .expect("rules");
    let _client = fixture.connect(v6(OTHER6, 8083));
    let _ = accept(&proxy6);
    // And removes them: an IPv6 exclusion in the config, then none.
    config.outbound_ip_range_inclusion_list = None;
    config.outbound_ip_range_exclusion_list = vec!["fd00:77::/64".parse().expect("net")];
    datapath
        .set_rules(rules::GLOBAL_SCOPE, &config)
        .expect("rules");
    let _client = fixture.connect(v6(OTHER6, 8083));
    let _ = accept(&other);
    nothing_queued(&proxy6, "an IPv6 range excluded in the mesh config");
    datapath
        .set_rules(rules::GLOBAL_SCOPE, &MeshConfig::default())
        .expect("rules");

    // The proxy's own (marked) sockets are never redirected.
    let _client = fixture.connect_marked(v6(OTHER6, 8083));
    let _ = accept(&other);
    nothing_queued(&proxy6, "a marked socket");

    // A pod without an IPv6 address has its IPv6 left alone; its IPv4 (mapped too)
    // still goes to the proxy.
    datapath.unenroll_ipv6(fixture.cookie);
    assert_eq!(datapath.pod_ipv6(fixture.cookie), None);
    let _client = fixture.connect(v6(OTHER6, 8083));
    let _ = accept(&other);
    nothing_queued(&proxy6, "a pod with no IPv6 address");
    let _client = fixture.connect(SocketAddr::V6(SocketAddrV6::new(
        SERVICE4.to_ipv6_mapped(),
        8080,
        0,
        0,
    )));
    let _ = accept(&proxy4);
}

#[test]
fn tc_steers_inbound_ipv6_and_a_marked_connect_reaches_15003() {
    if !privileged() {
        return;
    }
    let fixture = setup();
    let datapath = fixture.datapath();
    let inbound = fixture.listen(v6(Ipv6Addr::UNSPECIFIED, INBOUND_PORT));
    // Nothing listens on the application port: only a steered SYN gets an answer.
    let before = datapath.counters6();
    let client = fixture
        .in_peer(|| TcpStream::connect_timeout(&v6(POD6, 9000), Duration::from_secs(2)))
        .expect("a connect from the peer netns (steered to 15003, replies restored)");
    assert_eq!(client.peer_addr().expect("peer"), v6(POD6, 9000));
    let (mut accepted, peer) = accept(&inbound);
    assert_eq!(peer, client.local_addr().expect("local"));
    assert_eq!(peer.ip(), IpAddr::V6(PEER6));
    assert_eq!(
        original_dst6(&accepted).expect("IP6T_SO_ORIGINAL_DST from the tc record"),
        SocketAddrV6::new(POD6, 9000, 0, 0)
    );
    // Bytes both ways through the rewritten ports.
    accepted.write_all(b"hello").expect("write");
    let mut reply = [0u8; 5];
    let mut client_read = client.try_clone().expect("clone");
    client_read
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    client_read.read_exact(&mut reply).expect("read");
    assert_eq!(&reply, b"hello");
    let after = datapath.counters6();
    assert_eq!(after.inbound_redirected, before.inbound_redirected + 1);
    assert_eq!(after.orig_dst_answered, before.orig_dst_answered + 1);
    let flows: HashMap<MapData, InboundKey6, InboundFlow> =
        HashMap::try_from(aya::maps::Map::HashMap(
            MapData::from_pin(Path::new(PIN_DIR).join(maps::INBOUND_FLOWS6)).expect("pinned"),
        ))
        .expect("typed");
    let records: Vec<(InboundKey6, InboundFlow)> = flows.iter().filter_map(Result::ok).collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].0.client_ipv6, ip6_key(PEER6));
    assert_eq!(records[0].0.pod_ipv6, ip6_key(POD6));
    assert_eq!(records[0].1.orig_port, 9000);
    assert_eq!(
        records[0].1.state,
        inbound_state::ACCEPTED,
        "sock_ops marks the flow accepted at the listener's ESTABLISHED"
    );
    drop(client_read);
    drop(client);
    drop(accepted);
    eventually(
        "the inbound IPv6 record goes when the listener's socket closes",
        || datapath.live_records6().inbound_flows == 0,
    );

    // A half-open IPv6 record (a SYN whose handshake never completed) is swept.
    let mut flows6: HashMap<MapData, InboundKey6, InboundFlow> =
        HashMap::try_from(aya::maps::Map::HashMap(
            MapData::from_pin(Path::new(PIN_DIR).join(maps::INBOUND_FLOWS6)).expect("pinned"),
        ))
        .expect("typed");
    let spoofed = InboundKey6 {
        client_ipv6: ip6_key(Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1)),
        pod_ipv6: ip6_key(POD6),
        client_port: 40999,
        _pad: 0,
    };
    let half_open = InboundFlow {
        orig_port: 9000,
        state: inbound_state::HALF_OPEN,
        _pad: 0,
    };
    flows6
        .insert(spoofed, half_open, 0)
        .expect("a half-open record");
    assert_eq!(datapath.expire_half_open(Duration::ZERO), 1);
    assert_eq!(datapath.live_records6().inbound_flows, 0);

    // IPv4 to the same dual-stack listener: the accepted socket is AF_INET6 with a
    // mapped peer, and SOL_IP answers it from the IPv4 tc record, which sock_ops marks
    // accepted and forgets through the IPv4 keys.
    let client = fixture
        .in_peer(|| TcpStream::connect_timeout(&v4(POD4, 9000), Duration::from_secs(2)))
        .expect("an IPv4 connect from the peer netns");
    let (accepted4, peer) = accept(&inbound);
    assert_eq!(
        peer,
        SocketAddr::V6(SocketAddrV6::new(
            PEER4.to_ipv6_mapped(),
            client.local_addr().expect("local").port(),
            0,
            0
        ))
    );
    assert_eq!(
        original_dst4(&accepted4).expect("SO_ORIGINAL_DST on a mapped accepted socket"),
        SocketAddrV4::new(POD4, 9000)
    );
    assert!(
        original_dst6(&accepted4).is_err(),
        "an IPv4 connection is not answered as IPv6"
    );
    let flows4: HashMap<MapData, InboundKey, InboundFlow> =
        HashMap::try_from(aya::maps::Map::HashMap(
            MapData::from_pin(Path::new(PIN_DIR).join(maps::INBOUND_FLOWS)).expect("pinned"),
        ))
        .expect("typed");
    let records: Vec<(InboundKey, InboundFlow)> = flows4.iter().filter_map(Result::ok).collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].1.state, inbound_state::ACCEPTED);
    drop(client);
    drop(accepted4);
    eventually(
        "the IPv4 record of a mapped inbound socket goes at close",
        || datapath.live_records().inbound_flows == 0,
    );

    // The proxy dialling an enrolled pod of this node (from a netns that is not the
    // pod's): connect6 sends it to the pod's 15003 and records the destination.
    let marked = fixture
        .in_peer(|| marked_connect(v6(POD6, 9000)))
        .expect("marked connect");
    let (accepted, peer) = accept(&inbound);
    assert_eq!(peer, marked.local_addr().expect("local"));
    assert_eq!(
        original_dst6(&accepted).expect("IP6T_SO_ORIGINAL_DST from connect6's record"),
        SocketAddrV6::new(POD6, 9000, 0, 0)
    );
    assert_eq!(marked.peer_addr().expect("peer"), v6(POD6, 9000));
    let counters = datapath.counters6();
    assert_eq!(counters.same_node_inbound, after.same_node_inbound + 1);
    assert_eq!(
        counters.inbound_redirected, after.inbound_redirected,
        "tc leaves 15003 alone (a reserved port)"
    );
    drop(marked);
    drop(accepted);
    eventually("the same-node record goes at close", || {
        datapath.live_records6().orig_dst_by_flow == 0
    });

    // Unenrolling the pod removes its IPv6 entries with the IPv4 ones.
    datapath
        .unenroll(
            &PodDatapath {
                netns_cookie: fixture.cookie,
                ipv4: POD4,
                ifname: IFNAME.into(),
            },
            fixture.netns.as_ref().expect("netns"),
        )
        .expect("unenroll");
    assert_eq!(datapath.pod_ipv6(fixture.cookie), None);
    assert_eq!(datapath.live_records6().enrolled_netns, 0);
    let refused = fixture
        .in_peer(|| TcpStream::connect_timeout(&v6(POD6, 9000), Duration::from_secs(2)))
        .expect_err("an unenrolled pod's port 9000 has no listener");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

    // An IPv6-only pod: tc steers its IPv6 and leaves its IPv4 alone.
    let netns = fixture.netns.as_ref().expect("netns");
    datapath
        .enroll_ipv6_only(fixture.cookie, POD6, IFNAME, netns)
        .expect("IPv6-only enrollment");
    let client = fixture
        .in_peer(|| TcpStream::connect_timeout(&v6(POD6, 9000), Duration::from_secs(2)))
        .expect("steered to 15003 again");
    let (accepted, _) = accept(&inbound);
    assert_eq!(
        original_dst6(&accepted).expect("IP6T_SO_ORIGINAL_DST"),
        SocketAddrV6::new(POD6, 9000, 0, 0)
    );
    let refused = fixture
        .in_peer(|| TcpStream::connect_timeout(&v4(POD4, 9000), Duration::from_secs(2)))
        .expect_err("IPv4 to an IPv6-only pod is not steered");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
    drop(client);
    drop(accepted);
    datapath
        .unenroll(
            &PodDatapath {
                netns_cookie: fixture.cookie,
                ipv4: Ipv4Addr::UNSPECIFIED,
                ifname: IFNAME.into(),
            },
            netns,
        )
        .expect("unenroll an IPv6-only pod");
    assert_eq!(datapath.pod_ipv6(fixture.cookie), None);
    let refused = fixture
        .in_peer(|| TcpStream::connect_timeout(&v6(POD6, 9000), Duration::from_secs(2)))
        .expect_err("tc detached");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
}

#[test]
fn a_new_agent_reuses_the_ipv6_maps_and_forgets_unclaimed_ranges() {
    if !privileged() {
        return;
    }
    let mut fixture = setup();
    let proxy6 = fixture.listen(v6(POD6, OUTBOUND_PORT));
    let other = fixture.listen(v6(OTHER6, 8083));
    let global: ipnet::Ipv6Net = "fd00:77::/64".parse().expect("net");
    let pods: ipnet::Ipv6Net = "fd00:88::/64".parse().expect("net");
    {
        let first = fixture.datapath();
        first
            .set_rules6(rules::GLOBAL_SCOPE, &[global], &[])
            .expect("rules");
        first
            .set_rules6(fixture.cookie, &[pods], &[])
            .expect("rules");
    }
    // The first agent goes away without removing anything (a hand-over or a restart),
    // and the next one attaches on the same pins.
    drop(fixture.datapath.take());
    fixture.datapath = Some(attach(&fixture.cgroup, None));
    let next = fixture.datapath();
    assert_eq!(
        next.pod_ipv6(fixture.cookie),
        Some(POD6),
        "enrollment carried over"
    );
    let _client = fixture.connect(v6(OTHER6, 8083));
    let _ = accept(&other);
    nothing_queued(&proxy6, "a range from the reused trie");
    let _client = fixture.connect(v6(SERVICE6, 8080));
    let (accepted, _) = accept(&proxy6);
    assert_eq!(
        original_dst6(&accepted).expect("IP6T_SO_ORIGINAL_DST through the new agent"),
        SocketAddrV6::new(SERVICE6, 8080, 0, 0)
    );
    // The new agent's configuration names only the global range: the pod's goes.
    next.set_rules6(rules::GLOBAL_SCOPE, &[global], &[])
        .expect("rules");
    assert_eq!(next.forget_unclaimed_rules(), 1);
    let _client = fixture.connect(v6(OTHER6, 8083));
    let _ = accept(&other);
    nothing_queued(&proxy6, "the claimed global range");
    // A pod the new agent does not adopt loses its IPv6 entries too.
    next.retain_pods(&std::collections::HashSet::new());
    assert_eq!(next.pod_ipv6(fixture.cookie), None);
    assert_eq!(next.live_records6().enrolled_netns, 0);
}

#[test]
fn an_ipv6_flow_that_cannot_be_recorded_fails_closed() {
    if !privileged() {
        return;
    }
    let fixture = setup_with(Some(1));
    let datapath = fixture.datapath();
    let proxy6 = fixture.listen(v6(POD6, OUTBOUND_PORT));
    let _first = fixture.connect(v6(SERVICE6, 8080));
    let (accepted, _) = accept(&proxy6);
    assert_eq!(
        original_dst6(&accepted).expect("the one record that fits"),
        SocketAddrV6::new(SERVICE6, 8080, 0, 0)
    );
    // The map is full: the connection still reaches the proxy (the record is written at
    // ESTABLISHED), which finds no original destination and refuses it; it never goes
    // anywhere else.
    let _second = fixture.connect(v6(SERVICE6, 8081));
    let (accepted, _) = accept(&proxy6);
    let error = original_dst6(&accepted).expect_err("no record, no answer");
    // ENOENT from netfilter's IPv6 handler when nf_conntrack is loaded, ENOPROTOOPT
    // without it: the kernel's own answer, passed through.
    assert!(
        matches!(error.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT)),
        "{error}"
    );
    assert_eq!(datapath.counters6().record_failed, 1);
    assert_eq!(datapath.live_records6().orig_dst_by_flow, 1);
}
