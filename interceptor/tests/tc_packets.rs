//! The tc programs fed crafted packets through `BPF_PROG_TEST_RUN` (root): truncated
//! headers, bad IHL, fragments, non-TCP, SYN+RST, IP options, a full flow map; IPv6 with
//! extension headers walked, fragments and unwalked headers passed and counted,
//! link-local destinations never steered.
//! Never a rewritten non-TCP packet, never a wrong checksum, never a drop of a packet
//! that is not ours; a new flow that cannot be recorded is dropped (fail closed).
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use interceptor::datapath::ebpf::ip6_key;
use interceptor_common::{
    counters, counters6, maps, InboundFlow, InboundKey, InboundKey6, Ipv6, INBOUND_PORT,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
const NETNS: u64 = 4242;
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6, 0, 0, 0, 0, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6, 1, 0, 0, 0, 0, 7);
/// A link-local address put in POD_BY_IP6 on purpose: tc must still never steer it.
const LINK_LOCAL6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);

/// Root is needed to load programs; under `CI=true` a non-root run fails, never skips.
fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "the tc packet tests need root, and CI=true forbids skipping them"
    );
    eprintln!("skipping: not root");
    false
}

/// The object loaded with fresh (unpinned) maps, the tc programs loaded, and one pod.
fn load(inbound_capacity: u32) -> Ebpf {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(maps::INBOUND_FLOWS, inbound_capacity)
        .map_max_entries(maps::INBOUND_FLOWS6, inbound_capacity)
        .load(interceptor::datapath::ebpf::object())
        .expect("the object loads");
    for name in ["intercept_tc_ingress", "intercept_tc_egress"] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .expect("program")
            .try_into()
            .expect("classifier");
        prog.load().expect("the verifier accepts it");
    }
    let mut pods: HashMap<&mut MapData, u32, u64> =
        HashMap::try_from(ebpf.map_mut(maps::POD_BY_IP).expect("map")).expect("typed");
    pods.insert(u32::from_ne_bytes(POD.octets()), NETNS, 0)
        .expect("pod");
    let mut pods6: HashMap<&mut MapData, Ipv6, u64> =
        HashMap::try_from(ebpf.map_mut(maps::POD_BY_IP6).expect("map")).expect("typed");
    for ip in [POD6, LINK_LOCAL6] {
        pods6.insert(ip6_key(ip), NETNS, 0).expect("pod6");
    }
    ebpf
}

/// Run `name` on `packet`: the verdict and the packet as the program left it.
fn run(ebpf: &Ebpf, name: &str, packet: &[u8]) -> (u32, Vec<u8>) {
    let prog: &SchedClassifier = ebpf
        .program(name)
        .expect("program")
        .try_into()
        .expect("classifier");
    let mut out = vec![0u8; packet.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn inbound_records(ebpf: &Ebpf) -> Vec<(InboundKey, InboundFlow)> {
    let map: HashMap<&MapData, InboundKey, InboundFlow> =
        HashMap::try_from(ebpf.map(maps::INBOUND_FLOWS).expect("map")).expect("typed");
    map.iter().filter_map(Result::ok).collect()
}

fn counter(ebpf: &Ebpf, index: u32) -> u64 {
    counter_in(ebpf, maps::COUNTERS, index)
}

fn counter6(ebpf: &Ebpf, index: u32) -> u64 {
    counter_in(ebpf, maps::COUNTERS6, index)
}

fn counter_in(ebpf: &Ebpf, name: &str, index: u32) -> u64 {
    let map: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(name).expect("map")).expect("typed");
    map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

fn inbound_records6(ebpf: &Ebpf) -> Vec<(InboundKey6, InboundFlow)> {
    let map: HashMap<&MapData, InboundKey6, InboundFlow> =
        HashMap::try_from(ebpf.map(maps::INBOUND_FLOWS6).expect("map")).expect("typed");
    map.iter().filter_map(Result::ok).collect()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// An Ethernet + IPv4 (`options` after the 20-byte header) + TCP packet with correct
/// checksums.
fn tcp4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, options: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend(src.1.to_be_bytes());
    tcp.extend(dst.1.to_be_bytes());
    tcp.extend(1u32.to_be_bytes());
    tcp.extend(0u32.to_be_bytes());
    tcp.extend([5 << 4, flags]);
    tcp.extend(64240u16.to_be_bytes());
    tcp.extend([0, 0, 0, 0]);
    tcp.extend(b"payload!");
    let mut pseudo = Vec::new();
    pseudo.extend(src.0.octets());
    pseudo.extend(dst.0.octets());
    pseudo.extend([0, 6]);
    pseudo.extend((tcp.len() as u16).to_be_bytes());
    let csum = fold(sum16(&pseudo) + sum16(&tcp));
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    ipv4(src.0, dst.0, 6, options, &tcp)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: &[u8], l4: &[u8]) -> Vec<u8> {
    let ihl = (20 + options.len()) / 4;
    let mut ip = vec![0x40 | ihl as u8, 0];
    ip.extend(((ihl * 4 + l4.len()) as u16).to_be_bytes());
    ip.extend([0, 1, 0x40, 0, 64, proto, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    ip.extend(options);
    let csum = fold(sum16(&ip));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut packet = ethernet(0x0800);
    packet.extend(ip);
    packet.extend(l4);
    packet
}

fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut eth = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    eth.extend(ethertype.to_be_bytes());
    eth
}

/// Whether the TCP checksum of an Ethernet + IPv4 + TCP packet is right.
fn tcp_checksum_ok(packet: &[u8]) -> bool {
    let ip = &packet[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let tcp = &ip[ihl..total];
    let mut pseudo = Vec::new();
    pseudo.extend(&ip[12..20]);
    pseudo.extend([0, 6]);
    pseudo.extend((tcp.len() as u16).to_be_bytes());
    fold(sum16(&pseudo) + sum16(tcp)) == 0
}

fn port_at(packet: &[u8], offset_in_tcp: usize) -> u16 {
    let ihl = usize::from(packet[14] & 0x0f) * 4;
    let at = 14 + ihl + offset_in_tcp;
    u16::from_be_bytes([packet[at], packet[at + 1]])
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const RST: u8 = 0x04;

#[test]
fn a_syn_is_steered_and_its_reply_restored_with_right_checksums() {
    if !privileged() {
        return;
    }
    let ebpf = load(16);
    for options in [&[][..], &[1, 1, 1, 0][..], &[7, 7, 4, 1, 2, 3, 4, 0][..]] {
        let syn = tcp4((CLIENT, 40000), (POD, 9000), SYN, options);
        let (verdict, out) = run(&ebpf, "intercept_tc_ingress", &syn);
        assert_eq!(verdict, TC_ACT_OK, "options {options:?}");
        assert_eq!(port_at(&out, 2), INBOUND_PORT, "options {options:?}");
        assert!(tcp_checksum_ok(&out), "options {options:?}");
        assert_eq!(out.len(), syn.len());
        let reply = tcp4((POD, INBOUND_PORT), (CLIENT, 40000), SYN | ACK, options);
        let (verdict, out) = run(&ebpf, "intercept_tc_egress", &reply);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            port_at(&out, 0),
            9000,
            "the reply leaves from the dialled port"
        );
        assert!(tcp_checksum_ok(&out));
    }
    let records = inbound_records(&ebpf);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].1.orig_port, 9000);
}

#[test]
fn packets_that_are_not_ours_pass_untouched() {
    if !privileged() {
        return;
    }
    let ebpf = load(16);
    let syn = tcp4((CLIENT, 40001), (POD, 9000), SYN, &[]);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "UDP to the pod",
            ipv4(
                CLIENT,
                POD,
                17,
                &[],
                &[0x9c, 0x40, 0x23, 0x28, 0, 12, 0, 0, 1, 2, 3, 4],
            ),
        ),
        (
            "ICMP to the pod",
            ipv4(CLIENT, POD, 1, &[], &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]),
        ),
        (
            "TCP to another address",
            tcp4((CLIENT, 40001), (CLIENT, 9000), SYN, &[]),
        ),
        // (BPF_PROG_TEST_RUN refuses an IPv4 frame shorter than a whole IP header, so
        // the shortest cases here cut the TCP header.)
        ("TCP ports only", syn[..14 + 20 + 4].to_vec()),
        ("TCP header cut short", syn[..14 + 20 + 6].to_vec()),
        ("ARP", {
            let mut p = ethernet(0x0806);
            p.extend([0u8; 28]);
            p
        }),
    ];
    let mut ihl_small = syn.clone();
    ihl_small[14] = 0x44;
    cases.push(("IHL below 5", ihl_small));
    let mut ihl_past = syn.clone();
    ihl_past[14] = 0x4f;
    cases.push(("IHL past the packet", ihl_past[..14 + 40].to_vec()));
    let mut fragment = syn.clone();
    fragment[14 + 6] = 0x00;
    fragment[14 + 7] = 0x10;
    cases.push(("a later fragment", fragment));
    let mut version6 = syn.clone();
    version6[14] = 0x65;
    cases.push(("IPv4 ethertype with version 6", version6));
    let mut ipv6 = ethernet(0x86dd);
    ipv6.extend([0x60, 0, 0, 0, 0, 20, 6, 64]);
    ipv6.extend([0u8; 32]);
    ipv6.extend(&syn[14 + 20..14 + 40]);
    cases.push(("IPv6 TCP", ipv6.clone()));
    let mut ipv6_ext = ethernet(0x86dd);
    ipv6_ext.extend([0x60, 0, 0, 0, 0, 28, 0, 64]);
    ipv6_ext.extend([0u8; 32]);
    ipv6_ext.extend([6, 0, 1, 4, 0, 0, 0, 0]);
    ipv6_ext.extend(&syn[14 + 20..14 + 40]);
    cases.push(("IPv6 with a hop-by-hop header", ipv6_ext));
    for program in ["intercept_tc_ingress", "intercept_tc_egress"] {
        for (what, packet) in &cases {
            let (verdict, out) = run(&ebpf, program, packet);
            assert_eq!(verdict, TC_ACT_OK, "{program}: {what} dropped");
            assert_eq!(&out, packet, "{program}: {what} changed");
        }
    }
    assert!(inbound_records(&ebpf).is_empty());
    assert!(inbound_records6(&ebpf).is_empty());
}

#[test]
fn syn_rst_and_a_stray_ack_leave_no_record_and_no_drop() {
    if !privileged() {
        return;
    }
    let ebpf = load(16);
    let syn_rst = tcp4((CLIENT, 40002), (POD, 9000), SYN | RST, &[]);
    let (verdict, out) = run(&ebpf, "intercept_tc_ingress", &syn_rst);
    assert_eq!(verdict, TC_ACT_OK);
    assert!(tcp_checksum_ok(&out));
    assert!(
        inbound_records(&ebpf).is_empty(),
        "a reset leaves nothing behind"
    );
    // An ACK of a flow tc never saw start (made before enrollment) is not rewritten.
    let ack = tcp4((CLIENT, 40003), (POD, 9000), ACK, &[]);
    let (verdict, out) = run(&ebpf, "intercept_tc_ingress", &ack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, ack);
}

#[test]
fn a_new_flow_that_cannot_be_recorded_is_dropped_and_counted() {
    if !privileged() {
        return;
    }
    let ebpf = load(1);
    let first = tcp4((CLIENT, 41000), (POD, 9000), SYN, &[]);
    assert_eq!(run(&ebpf, "intercept_tc_ingress", &first).0, TC_ACT_OK);
    let second = tcp4((CLIENT, 41001), (POD, 9000), SYN, &[]);
    let (verdict, _) = run(&ebpf, "intercept_tc_ingress", &second);
    assert_eq!(verdict, TC_ACT_SHOT, "a full map must refuse, never pass");
    assert_eq!(counter(&ebpf, counters::INBOUND_RECORD_FAILED), 1);
    // What is not a new flow of an enrolled pod still passes.
    let udp = ipv4(
        CLIENT,
        POD,
        17,
        &[],
        &[0x9c, 0x40, 0x23, 0x28, 0, 12, 0, 0, 1, 2, 3, 4],
    );
    assert_eq!(run(&ebpf, "intercept_tc_ingress", &udp).0, TC_ACT_OK);
}

/// A TCP segment (20-byte header, 8 bytes of payload) with its checksum over the IPv6
/// pseudo-header.
fn tcp6_segment(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend(src.1.to_be_bytes());
    tcp.extend(dst.1.to_be_bytes());
    tcp.extend(1u32.to_be_bytes());
    tcp.extend(0u32.to_be_bytes());
    tcp.extend([5 << 4, flags]);
    tcp.extend(64240u16.to_be_bytes());
    tcp.extend([0, 0, 0, 0]);
    tcp.extend(b"payload!");
    let csum = fold(sum16(&pseudo6(src.0, dst.0, tcp.len())) + sum16(&tcp));
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    tcp
}

fn pseudo6(src: Ipv6Addr, dst: Ipv6Addr, len: usize) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend((len as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, 6]);
    pseudo
}

/// Ethernet + IPv6 whose first next-header is `next`, then `ext` (extension headers,
/// already chained) and `l4`.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, ext: &[u8], l4: &[u8]) -> Vec<u8> {
    let mut packet = ethernet(0x86dd);
    packet.extend([0x60, 0, 0, 0]);
    packet.extend(((ext.len() + l4.len()) as u16).to_be_bytes());
    packet.extend([next, 64]);
    packet.extend(src.octets());
    packet.extend(dst.octets());
    packet.extend(ext);
    packet.extend(l4);
    packet
}

/// An options-style extension header (hop-by-hop, destination options) of `8 * units`
/// bytes, padded with PadN, followed by `next`.
fn options_header(next: u8, units: u8) -> Vec<u8> {
    let len = usize::from(units) * 8;
    let mut header = vec![next, units - 1, 1, (len - 4) as u8];
    header.resize(len, 0);
    header
}

/// A routing header (type 4, segment routing, one segment) with `segments_left`.
fn routing_header(next: u8, segments_left: u8) -> Vec<u8> {
    let mut header = vec![next, 2, 4, segments_left, 0, 0, 0, 0];
    header.extend(CLIENT6.octets());
    header
}

const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DSTOPTS: u8 = 60;
const TCP: u8 = 6;

/// Extension header chains tc walks to TCP, as (first next-header, bytes).
fn walkable_chains() -> Vec<(&'static str, u8, Vec<u8>)> {
    vec![
        ("no extension header", TCP, vec![]),
        ("hop-by-hop", HOPOPTS, options_header(TCP, 1)),
        (
            "hop-by-hop, destination options, routing with no segments left",
            HOPOPTS,
            {
                let mut chain = options_header(DSTOPTS, 1);
                chain.extend(options_header(ROUTING, 2));
                chain.extend(routing_header(TCP, 0));
                chain
            },
        ),
        ("four headers, the most tc walks", HOPOPTS, {
            let mut chain = options_header(DSTOPTS, 1);
            chain.extend(options_header(DSTOPTS, 1));
            chain.extend(options_header(DSTOPTS, 3));
            chain.extend(options_header(TCP, 1));
            chain
        }),
    ]
}

/// Whether the TCP checksum of a packet whose TCP header starts at `l4` is right.
fn tcp6_checksum_ok(packet: &[u8], l4: usize) -> bool {
    let src: [u8; 16] = packet[22..38].try_into().expect("16 bytes");
    let dst: [u8; 16] = packet[38..54].try_into().expect("16 bytes");
    let tcp = &packet[l4..];
    fold(sum16(&pseudo6(src.into(), dst.into(), tcp.len())) + sum16(tcp)) == 0
}

fn port6_at(packet: &[u8], l4: usize, offset_in_tcp: usize) -> u16 {
    u16::from_be_bytes([packet[l4 + offset_in_tcp], packet[l4 + offset_in_tcp + 1]])
}

#[test]
fn an_ipv6_syn_is_steered_and_its_reply_restored_with_right_checksums() {
    if !privileged() {
        return;
    }
    let ebpf = load(16);
    for (what, next, chain) in walkable_chains() {
        let l4 = 14 + 40 + chain.len();
        let syn = ipv6(
            CLIENT6,
            POD6,
            next,
            &chain,
            &tcp6_segment((CLIENT6, 40000), (POD6, 9000), SYN),
        );
        assert!(
            tcp6_checksum_ok(&syn, l4),
            "{what}: the test's own checksum"
        );
        let (verdict, out) = run(&ebpf, "intercept_tc_ingress", &syn);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert_eq!(port6_at(&out, l4, 2), INBOUND_PORT, "{what}");
        assert!(
            tcp6_checksum_ok(&out, l4),
            "{what}: checksum after the rewrite"
        );
        assert_eq!(out.len(), syn.len(), "{what}");
        assert_eq!(out[..l4], syn[..l4], "{what}: only the TCP header changes");
        let ack = ipv6(
            CLIENT6,
            POD6,
            next,
            &chain,
            &tcp6_segment((CLIENT6, 40000), (POD6, 9000), ACK),
        );
        let (verdict, out) = run(&ebpf, "intercept_tc_ingress", &ack);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert_eq!(
            port6_at(&out, l4, 2),
            INBOUND_PORT,
            "{what}: the flow's ACK"
        );
        assert!(tcp6_checksum_ok(&out, l4), "{what}");
        let reply = ipv6(
            POD6,
            CLIENT6,
            next,
            &chain,
            &tcp6_segment((POD6, INBOUND_PORT), (CLIENT6, 40000), SYN | ACK),
        );
        let (verdict, out) = run(&ebpf, "intercept_tc_egress", &reply);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert_eq!(
            port6_at(&out, l4, 0),
            9000,
            "{what}: the reply leaves from the dialled port"
        );
        assert!(tcp6_checksum_ok(&out, l4), "{what}");
    }
    let records = inbound_records6(&ebpf);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].0.pod_ipv6, ip6_key(POD6));
    assert_eq!(records[0].0.client_ipv6, ip6_key(CLIENT6));
    assert_eq!(records[0].0.client_port, 40000);
    assert_eq!(records[0].1.orig_port, 9000);
    assert!(inbound_records(&ebpf).is_empty(), "nothing in the IPv4 map");
    assert_eq!(counter6(&ebpf, counters6::INBOUND_REDIRECTED), 4);
    assert_eq!(counter6(&ebpf, counters6::UNPARSED_PASSED), 0);
    assert_eq!(counter(&ebpf, counters::INBOUND_REDIRECTED), 0);
    // A reset of the flow forgets it.
    let rst = ipv6(
        CLIENT6,
        POD6,
        TCP,
        &[],
        &tcp6_segment((CLIENT6, 40000), (POD6, 9000), RST | ACK),
    );
    let (verdict, out) = run(&ebpf, "intercept_tc_ingress", &rst);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(port6_at(&out, 14 + 40, 2), INBOUND_PORT);
    assert!(inbound_records6(&ebpf).is_empty());
}

#[test]
fn ipv6_packets_tc_cannot_parse_pass_untouched_and_counted() {
    if !privileged() {
        return;
    }
    let ebpf = load(16);
    let segment = tcp6_segment((CLIENT6, 40010), (POD6, 9000), SYN);
    let udp = [0x9c, 0x4a, 0x23, 0x28, 0, 12, 0, 0, 1, 2, 3, 4];
    // (what, packet, counted as unparsed)
    let mut cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "a first fragment holding the TCP header",
            ipv6(
                CLIENT6,
                POD6,
                FRAGMENT,
                &[TCP, 0, 0, 1, 0, 0, 0, 9],
                &segment,
            ),
            true,
        ),
        (
            "a fragment after hop-by-hop",
            ipv6(
                CLIENT6,
                POD6,
                HOPOPTS,
                &{
                    let mut chain = options_header(FRAGMENT, 1);
                    chain.extend([TCP, 0, 0, 1, 0, 0, 0, 9]);
                    chain
                },
                &segment,
            ),
            true,
        ),
        (
            "AH",
            ipv6(
                CLIENT6,
                POD6,
                51,
                &[
                    TCP, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
                &segment,
            ),
            true,
        ),
        (
            "ESP",
            ipv6(CLIENT6, POD6, 50, &[0, 0, 0, 1, 0, 0, 0, 1], &segment),
            true,
        ),
        (
            "a routing header with segments left",
            ipv6(CLIENT6, POD6, ROUTING, &routing_header(TCP, 1), &segment),
            true,
        ),
        (
            "five extension headers, one more than tc walks",
            ipv6(
                CLIENT6,
                POD6,
                HOPOPTS,
                &{
                    let mut chain = Vec::new();
                    for _ in 0..4 {
                        chain.extend(options_header(DSTOPTS, 1));
                    }
                    chain.extend(options_header(TCP, 1));
                    chain
                },
                &segment,
            ),
            true,
        ),
        ("UDP to the pod", ipv6(CLIENT6, POD6, 17, &[], &udp), false),
        (
            "ICMPv6 echo to the pod",
            ipv6(CLIENT6, POD6, 58, &[], &[128, 0, 0, 0, 0, 1, 0, 1]),
            false,
        ),
        (
            "UDP after hop-by-hop",
            ipv6(CLIENT6, POD6, HOPOPTS, &options_header(17, 1), &udp),
            false,
        ),
        ("no next header", ipv6(CLIENT6, POD6, 59, &[], &[]), false),
        (
            "TCP to a link-local address, even one in POD_BY_IP6",
            ipv6(
                CLIENT6,
                LINK_LOCAL6,
                TCP,
                &[],
                &tcp6_segment((CLIENT6, 40010), (LINK_LOCAL6, 9000), SYN),
            ),
            false,
        ),
        (
            "TCP to another address",
            ipv6(
                POD6,
                CLIENT6,
                TCP,
                &[],
                &tcp6_segment((POD6, 40010), (CLIENT6, 9000), SYN),
            ),
            false,
        ),
        (
            "TCP header cut short",
            ipv6(CLIENT6, POD6, TCP, &[], &segment[..6]),
            false,
        ),
        (
            "an extension header past the packet's end",
            ipv6(CLIENT6, POD6, HOPOPTS, &[TCP, 200], &[]),
            false,
        ),
    ];
    let mut version4 = ipv6(CLIENT6, POD6, TCP, &[], &segment);
    version4[14] = 0x45;
    cases.push(("IPv6 ethertype with version 4", version4, false));
    let expected: u64 = cases.iter().filter(|(_, _, counted)| *counted).count() as u64;
    let before = counter6(&ebpf, counters6::UNPARSED_PASSED);
    for (what, packet, counted) in &cases {
        let count_before = counter6(&ebpf, counters6::UNPARSED_PASSED);
        let (verdict, out) = run(&ebpf, "intercept_tc_ingress", packet);
        assert_eq!(verdict, TC_ACT_OK, "ingress: {what} dropped");
        assert_eq!(&out, packet, "ingress: {what} changed");
        assert_eq!(
            counter6(&ebpf, counters6::UNPARSED_PASSED) - count_before,
            u64::from(*counted),
            "ingress: {what}"
        );
    }
    assert_eq!(
        counter6(&ebpf, counters6::UNPARSED_PASSED) - before,
        expected
    );
    // Egress reads the same headers: replies that cannot be parsed pass as well.
    for (what, packet, _) in &cases {
        let (verdict, out) = run(&ebpf, "intercept_tc_egress", packet);
        assert_eq!(verdict, TC_ACT_OK, "egress: {what} dropped");
        assert_eq!(&out, packet, "egress: {what} changed");
    }
    assert_eq!(
        counter6(&ebpf, counters6::UNPARSED_PASSED) - before,
        2 * expected
    );
    assert!(
        inbound_records6(&ebpf).is_empty(),
        "{:?}",
        inbound_records6(&ebpf)
    );
    assert_eq!(counter6(&ebpf, counters6::INBOUND_REDIRECTED), 0);
}

#[test]
fn a_new_ipv6_flow_that_cannot_be_recorded_is_dropped_and_counted() {
    if !privileged() {
        return;
    }
    let ebpf = load(1);
    let syn = |port| {
        ipv6(
            CLIENT6,
            POD6,
            TCP,
            &[],
            &tcp6_segment((CLIENT6, port), (POD6, 9000), SYN),
        )
    };
    assert_eq!(run(&ebpf, "intercept_tc_ingress", &syn(41000)).0, TC_ACT_OK);
    let (verdict, _) = run(&ebpf, "intercept_tc_ingress", &syn(41001));
    assert_eq!(verdict, TC_ACT_SHOT, "a full map must refuse, never pass");
    assert_eq!(counter6(&ebpf, counters6::INBOUND_RECORD_FAILED), 1);
    // The same client port to another port of the pod: one connection on 15003 inside.
    let busy = ipv6(
        CLIENT6,
        POD6,
        TCP,
        &[],
        &tcp6_segment((CLIENT6, 41000), (POD6, 9001), SYN),
    );
    assert_eq!(run(&ebpf, "intercept_tc_ingress", &busy).0, TC_ACT_SHOT);
    assert_eq!(counter6(&ebpf, counters6::INBOUND_TUPLE_BUSY), 1);
    // An excluded port (the reserved ones are excluded by the agent; here none is, so a
    // UDP packet stands for what is not a new flow) still passes.
    let udp = ipv6(
        CLIENT6,
        POD6,
        17,
        &[],
        &[0x9c, 0x4a, 0x23, 0x28, 0, 12, 0, 0, 1, 2, 3, 4],
    );
    assert_eq!(run(&ebpf, "intercept_tc_ingress", &udp).0, TC_ACT_OK);
    assert_eq!(
        counter(&ebpf, counters::INBOUND_RECORD_FAILED),
        0,
        "IPv4 counters untouched"
    );
}
