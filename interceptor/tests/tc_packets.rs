//! The tc programs fed crafted packets through `BPF_PROG_TEST_RUN` (root): truncated
//! headers, bad IHL, fragments, IPv6, non-TCP, SYN+RST, IP options, a full flow map.
//! Never a rewritten non-TCP packet, never a wrong checksum, never a drop of a packet
//! that is not ours; a new flow that cannot be recorded is dropped (fail closed).
use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use interceptor_common::{counters, maps, InboundFlow, InboundKey, INBOUND_PORT};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
const NETNS: u64 = 4242;

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
    let map: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(maps::COUNTERS).expect("map")).expect("typed");
    map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
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
    let ipv6_before = counter(&ebpf, counters::IPV6_PASSED);
    for program in ["intercept_tc_ingress", "intercept_tc_egress"] {
        for (what, packet) in &cases {
            let (verdict, out) = run(&ebpf, program, packet);
            assert_eq!(verdict, TC_ACT_OK, "{program}: {what} dropped");
            assert_eq!(&out, packet, "{program}: {what} changed");
        }
    }
    assert!(inbound_records(&ebpf).is_empty());
    assert!(counter(&ebpf, counters::IPV6_PASSED) >= ipv6_before + 4);
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
