//! The kernel floor of eBPF mode, read from the eBPF object itself: every program
//! section, helper call and map type the object uses, each with the kernel that
//! introduced it. A change that uses something newer than the floor fails here unless
//! the probe names it (as a required feature, which raises the floor the agent reports,
//! or as an optional one with a fallback).
use std::collections::BTreeMap;

use aya::sys::BpfHelper;
use interceptor::datapath::probe::{parse_version, Probe};
use object::{Object, ObjectSection, ObjectSymbol};

/// The oldest kernel the DaemonSet targets (Ubuntu 20.04): what the audit reports on.
const TARGET_FLOOR: &str = "5.4";

/// Program sections: kernel, and the probe feature that covers them when newer than
/// the target floor.
fn section_kernel(section: &str) -> Option<(&'static str, Option<&'static str>)> {
    Some(match section {
        "cgroup/connect4" | "cgroup/connect6" => ("4.17", None),
        "cgroup/getpeername4" | "cgroup/getpeername6" => {
            ("5.8", Some("attach type cgroup/getpeername4"))
        }
        "cgroup/getsockopt" => ("5.3", None),
        "sockops" => ("4.13", None),
        "sk_msg" => ("4.17", None),
        "classifier" | "tc" => ("4.1", None),
        _ => return None,
    })
}

/// Helpers by id: name, kernel where our program types have it, covering probe feature.
fn helper_kernel(id: u32) -> Option<(&'static str, &'static str, Option<&'static str>)> {
    let known: &[(BpfHelper, &str, &str, Option<&str>)] = &[
        (
            BpfHelper::BPF_FUNC_map_lookup_elem,
            "map_lookup_elem",
            "3.19",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_map_update_elem,
            "map_update_elem",
            "3.19",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_map_delete_elem,
            "map_delete_elem",
            "3.19",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_trace_printk,
            "trace_printk",
            "4.1",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_ktime_get_ns,
            "ktime_get_ns",
            "4.1",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_get_smp_processor_id,
            "get_smp_processor_id",
            "4.1",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_skb_store_bytes,
            "skb_store_bytes",
            "4.1",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_l3_csum_replace,
            "l3_csum_replace",
            "4.1",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_l4_csum_replace,
            "l4_csum_replace",
            "4.1",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_skb_load_bytes,
            "skb_load_bytes",
            "4.5",
            None,
        ),
        (BpfHelper::BPF_FUNC_csum_diff, "csum_diff", "4.6", None),
        (
            BpfHelper::BPF_FUNC_perf_event_output,
            "perf_event_output",
            "4.4",
            None,
        ),
        // In sock_addr and sock_ops programs (it came to tc in 4.12).
        (
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "get_socket_cookie",
            "5.0",
            Some("helper get_socket_cookie in sock_addr"),
        ),
        (
            BpfHelper::BPF_FUNC_sock_ops_cb_flags_set,
            "sock_ops_cb_flags_set",
            "4.16",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_sock_hash_update,
            "sock_hash_update",
            "4.18",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_msg_redirect_hash,
            "msg_redirect_hash",
            "4.18",
            None,
        ),
        (
            BpfHelper::BPF_FUNC_sk_lookup_tcp,
            "sk_lookup_tcp",
            "4.20",
            None,
        ),
        (BpfHelper::BPF_FUNC_sk_release, "sk_release", "4.20", None),
        (
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "get_netns_cookie",
            "5.7",
            Some("helper get_netns_cookie in sock_addr"),
        ),
        (
            BpfHelper::BPF_FUNC_ringbuf_output,
            "ringbuf_output",
            "5.8",
            None,
        ),
        (BpfHelper::BPF_FUNC_sk_assign, "sk_assign", "5.7", None),
    ];
    known
        .iter()
        .find(|(helper, ..)| *helper as u32 == id)
        .map(|(_, name, since, feature)| (*name, *since, *feature))
}

/// Map types by id (`bpf_map_type`): name, kernel.
fn map_kernel(kind: u32) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        1 => ("hash", "3.19"),
        2 => ("array", "3.19"),
        4 => ("perf event array", "4.3"),
        5 => ("per-CPU hash", "4.6"),
        6 => ("per-CPU array", "4.6"),
        9 => ("LRU hash", "4.10"),
        11 => ("LPM trie", "4.11"),
        18 => ("SOCKHASH", "4.18"),
        27 => ("ring buffer", "5.8"),
        _ => return None,
    })
}

/// Each map of the object by symbol name, with its `bpf_map_type` id.
fn map_types(file: &object::File) -> BTreeMap<String, u32> {
    let maps = file.section_by_name("maps").expect("maps section");
    let data = maps.data().expect("maps data");
    file.symbols()
        .filter(|symbol| symbol.section_index() == Some(maps.index()))
        .map(|symbol| {
            let at = symbol.address() as usize;
            let kind = u32::from_le_bytes(data[at..at + 4].try_into().expect("map def"));
            (symbol.name().unwrap_or_default().to_owned(), kind)
        })
        .collect()
}

/// Flow records must never be evicted while their connection lives: an evicted inbound
/// record breaks the flow, an evicted outbound one changes what getpeername answers in
/// the middle of a connection (issue 13). Both maps are plain hashes (type 1), which
/// refuse new flows when full instead.
#[test]
fn flow_record_maps_are_never_lru() {
    let file = object::File::parse(interceptor::datapath::ebpf::object()).expect("ELF");
    let types = map_types(&file);
    for name in ["ORIG_DST_BY_FLOW", "INBOUND_FLOWS"] {
        assert_eq!(
            types.get(name),
            Some(&1),
            "{name} is not a plain hash: {types:?}"
        );
    }
}

/// What the object uses: item → (kernel, covering probe feature).
fn audit() -> BTreeMap<String, (&'static str, Option<&'static str>)> {
    let bytes = interceptor::datapath::ebpf::object();
    assert!(
        !bytes.is_empty(),
        "built with AYA_BUILD_SKIP: no eBPF object to audit"
    );
    let file = object::File::parse(bytes).expect("the eBPF object is ELF");
    let mut used = BTreeMap::new();
    let mut unknown = Vec::new();
    for section in file.sections() {
        let name = section.name().unwrap_or_default().to_owned();
        let is_program = section_kernel(&name).is_some();
        if let Some((since, feature)) = section_kernel(&name) {
            used.insert(format!("program section {name}"), (since, feature));
        }
        if !is_program && name != ".text" {
            continue;
        }
        let code = section.data().expect("section data");
        for insn in code.chunks_exact(8) {
            // BPF_JMP | BPF_CALL with src_reg 0: a helper call, its id in imm.
            let (opcode, src_reg) = (insn[0], insn[1] >> 4);
            if opcode != 0x85 || src_reg != 0 {
                continue;
            }
            let id = u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            match helper_kernel(id) {
                Some((helper, since, feature)) => {
                    used.insert(format!("helper {helper}"), (since, feature));
                }
                None => unknown.push(format!("helper id {id} in {name}")),
            }
        }
    }
    for (symbol, kind) in map_types(&file) {
        match map_kernel(kind) {
            Some((map, since)) => {
                used.insert(format!("map type {map}"), (since, None));
            }
            None => unknown.push(format!("map type {kind} ({symbol})")),
        }
    }
    assert!(
        unknown.is_empty(),
        "the eBPF object uses what the audit does not know: {unknown:?}; add each with the \
         kernel that introduced it"
    );
    used
}

#[test]
fn nothing_newer_than_the_floor_is_used_without_a_probed_feature() {
    let used = audit();
    let probe = interceptor::datapath::probe::probe();
    let floor = parse_version(Probe::ebpf_floor());
    let mut unprobed = Vec::new();
    let mut newest_required = (0, 0);
    for (item, (since, feature)) in &used {
        let covering = feature.and_then(|name| probe.features.iter().find(|f| f.name == name));
        let optional = covering.is_some_and(|f| !f.required);
        if !optional {
            newest_required = newest_required.max(parse_version(since));
        }
        // Anything past what the oldest target kernel has must be probed, so the agent
        // can say why a kernel does not run eBPF mode (or use its fallback).
        if parse_version(since) > parse_version(TARGET_FLOOR) && covering.is_none() {
            unprobed.push(format!("{item} (kernel {since})"));
        }
    }
    assert!(
        unprobed.is_empty(),
        "used but not probed: {unprobed:?}; probe each (required, raising the floor, or \
         optional with a fallback) in datapath/probe.rs"
    );
    assert!(
        newest_required <= floor,
        "the object needs kernel {newest_required:?} but eBPF mode claims {}: {used:?}",
        Probe::ebpf_floor()
    );
}

/// What a 5.4 kernel (Ubuntu 20.04) lacks, printed for the README's support matrix.
#[test]
fn report_what_the_oldest_target_kernel_lacks() {
    let used = audit();
    let lacking: Vec<String> = used
        .iter()
        .filter(|(_, (since, _))| parse_version(since) > parse_version(TARGET_FLOOR))
        .map(|(item, (since, feature))| {
            format!(
                "{item}: kernel {since}, probed as {:?}",
                feature.unwrap_or("-")
            )
        })
        .collect();
    println!("kernel {TARGET_FLOOR} lacks:\n  {}", lacking.join("\n  "));
    // The netns cookie helper is the one that keeps 5.4–5.6 in iptables mode.
    assert!(
        lacking.iter().any(|l| l.contains("get_netns_cookie")),
        "{lacking:?}"
    );
    assert!(
        used.contains_key("program section cgroup/connect4"),
        "{used:?}"
    );
    assert!(used.contains_key("helper get_socket_cookie"), "{used:?}");
}
