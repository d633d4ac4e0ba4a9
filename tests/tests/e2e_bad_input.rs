//! Bad input and lifecycle edges end to end: malformed CNI calls, garbage on the agent's
//! unix socket, a broken manifest next to a good one, repeated and stray DELs, what a
//! stopped or crashed agent leaves behind, and two nodes side by side whose pods have the
//! same addresses. After every bad input the agent must still be ready and still
//! intercept a freshly added pod.
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Node, ECHO_CLUSTER_IP, ECHO_SERVICE_PORT, ECHO_TARGET_PORT};
use interceptor_testbed::{CniError, CniOutput, Pod, ServerProcess, Testbed};
use serde_json::Value;

/// Where Debian installs bpftool; the program and map checks need it.
const BPFTOOL: &str = "/usr/sbin/bpftool";
/// `MAX_MESSAGE_BYTES` of the plugin/agent protocol.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Programs the agent attaches to its cgroup.
const ATTACH_TYPES: [&str; 6] = [
    "cgroup_inet4_connect",
    "cgroup_inet4_getpeername",
    "cgroup_inet6_connect",
    "cgroup_inet6_getpeername",
    "cgroup_sock_ops",
    "cgroup_getsockopt",
];
/// Links the agent pins so that interception outlives it (fail closed).
const LINK_PINS: [&str; 5] = [
    "link_intercept_connect4",
    "link_intercept_getpeername4",
    "link_intercept_connect6",
    "link_intercept_getpeername6",
    "link_intercept_sock_ops",
];
/// What the agent pins under its bpffs directory.
const PINS: [&str; 29] = [
    "intercept_connect4",
    "intercept_getpeername4",
    "intercept_connect6",
    "intercept_getpeername6",
    "intercept_sock_ops",
    "intercept_getsockopt",
    "intercept_tc_ingress",
    "intercept_tc_egress",
    "intercept_sk_msg",
    "ENROLLED_NETNS",
    "POD_BY_IP",
    "ORIG_DST_BY_COOKIE",
    "ORIG_DST_BY_FLOW",
    "INBOUND_FLOWS",
    "PORT_EXCLUSIONS",
    "OUT_EXCLUDED_CIDRS",
    "OUT_INCLUDED_CIDRS",
    "SCOPE_FLAGS",
    "SOCK_PAIRS",
    "SETTINGS",
    "COUNTERS",
    "ENROLLED_NETNS6",
    "POD_BY_IP6",
    "ORIG_DST6_BY_COOKIE",
    "ORIG_DST6_BY_FLOW",
    "INBOUND_FLOWS6",
    "OUT_EXCLUDED_CIDRS6",
    "OUT_INCLUDED_CIDRS6",
    "COUNTERS6",
];

fn service_addr() -> String {
    format!("{ECHO_CLUSTER_IP}:{ECHO_SERVICE_PORT}")
}

/// `CNI_ARGS` for a pod, as kubelet's runtimes write it.
fn pod_args(namespace: &str, name: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}")
}

/// `pod_cni_env` in the form `cni_raw` takes.
fn overrides(env: &[(String, String)]) -> Vec<(&str, Option<&str>)> {
    env.iter()
        .map(|(k, v)| (k.as_str(), Some(v.as_str())))
        .collect()
}

/// Asserts a failed plugin call that printed a CNI error object with `code` on stdout
/// (and said so on stderr); returns the object.
fn expect_cni_error(out: &CniOutput, code: u64) -> Value {
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "expected a non-zero exit, got {}; stdout: {}; stderr: {}",
        out.status,
        out.stdout,
        out.stderr
    );
    let err = out
        .json()
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {:?}", out.stdout));
    assert_eq!(err["code"], code, "{err}; stderr: {}", out.stderr);
    assert!(err["cniVersion"].is_string(), "{err}");
    assert!(err["details"].is_string(), "{err}");
    let msg = err["msg"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "{err}");
    assert!(
        out.stderr.contains(&format!("code {code}: {msg}")),
        "the error is not logged on stderr: {:?}",
        out.stderr
    );
    err
}

fn msg(err: &Value) -> &str {
    err["msg"].as_str().unwrap_or_default()
}

/// `/readyz` answers 200 and the agent process has not exited.
fn assert_agent_alive(node: &mut Node) {
    let (status, body) = node.tb.admin_get("/readyz").expect("GET /readyz");
    assert_eq!(status, 200, "{body}");
    let exited = node
        .agent
        .as_mut()
        .expect("agent handle")
        .try_wait()
        .expect("try_wait");
    assert_eq!(exited, None, "agent exited; log:\n{}", node.agent_log());
}

fn pod_rows(dump: &Value) -> Vec<Value> {
    dump["pods"].as_array().cloned().unwrap_or_default()
}

fn pod_row(dump: &Value, key: &str) -> Option<Value> {
    pod_rows(dump).into_iter().find(|p| p["pod"] == key)
}

/// Polls `f` every 100 ms until it gives `Some`, for at most `timeout`.
fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts an echo server on the endpoint port of `server`.
fn echo_server(node: &Node, server: &Pod) -> ServerProcess {
    node.tb
        .spawn_server(
            server,
            &["echo", "--listen", "0.0.0.0:9000", "--greeting", "hi"],
        )
        .expect("echo server")
}

/// One client connection from `client` to the echo Service; asserts it went through the
/// proxy to `server` and returns the client's local address.
fn assert_intercepted(node: &Node, client: &Pod, server: &Pod) -> String {
    let report = node
        .tb
        .run_client(
            client,
            &[
                "--connect",
                &service_addr(),
                "--send-bytes",
                "2048",
                "--expect-greeting",
            ],
        )
        .expect("client runs");
    assert_eq!(
        report.error,
        None,
        "client failed: {report:?}\nagent log:\n{}",
        node.agent_log()
    );
    assert_eq!(report.greeting.as_deref(), Some("hi"), "{report:?}");
    assert!(report.echoed_all(), "{report:?}");
    let local = report.local.expect("client local address");
    let record = wait_until(Duration::from_secs(5), "a connection record", || {
        node.connections_from(&local).into_iter().next()
    });
    assert_eq!(record["original_dst"], service_addr(), "{record}");
    assert_eq!(record["target"]["pod"], "demo/server", "{record}");
    assert_eq!(
        record["target"]["addr"],
        format!("{}:{ECHO_TARGET_PORT}", server.ip),
        "{record}"
    );
    local
}

/// Reserved addresses in the host-local IPAM store of the testbed.
fn ipam_reservations(tb: &Testbed) -> usize {
    let dir = tb
        .state_dir()
        .join("ipam")
        .join(interceptor_testbed::NETWORK_NAME);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.parse::<Ipv4Addr>().is_ok())
        .count()
}

/// Names of the testbed's pod network namespaces that exist.
fn pod_netns(tb: &Testbed) -> Vec<String> {
    let prefix = format!("itb-{}-", tb.id());
    std::fs::read_dir("/var/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix) && n != tb.node_netns())
                .collect()
        })
        .unwrap_or_default()
}

/// veth ends left in the node netns (one per pod on the bridge).
fn node_veths(tb: &Testbed) -> usize {
    let out = Command::new("ip")
        .args(["-n", tb.node_netns(), "-o", "link", "show", "type", "veth"])
        .output()
        .expect("ip link");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// bpftool, when installed.
fn bpftool() -> Option<&'static str> {
    if Path::new(BPFTOOL).is_file() {
        Some(BPFTOOL)
    } else {
        eprintln!("{BPFTOOL} not installed: skipping the kernel-side assertion");
        None
    }
}

fn bpftool_json(bpftool: &str, args: &[&str]) -> Value {
    let out = Command::new(bpftool)
        .arg("-j")
        .args(args)
        .output()
        .expect("running bpftool");
    assert!(out.status.success(), "bpftool {args:?}: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("bpftool {args:?} output ({e}): {stdout}"))
}

/// Attach types of the programs attached directly to `cgroup`, sorted.
fn attached_programs(bpftool: &str, cgroup: &Path) -> Vec<String> {
    common::cgroup_attach_types(bpftool, cgroup)
}

fn expected_attach_types() -> Vec<String> {
    let mut v: Vec<String> = ATTACH_TYPES.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Entries of the pinned enrolled-netns map.
fn enrolled_map_len(bpftool: &str, tb: &Testbed) -> usize {
    let pin = tb.bpffs_dir().join("ENROLLED_NETNS");
    let dump = bpftool_json(
        bpftool,
        &["map", "dump", "pinned", pin.to_str().expect("utf-8")],
    );
    dump.as_array().expect("map dump: an array").len()
}

/// The agent's cgroup links hold the programs: with the agent gone nothing is attached.
fn assert_no_programs_attached(tb: &Testbed) {
    if let Some(bpftool) = bpftool() {
        let left = attached_programs(bpftool, tb.cgroup_path());
        assert!(left.is_empty(), "programs still attached: {left:?}");
    }
}

/// Whether a live process with this pid runs the interceptor binary.
fn interceptor_process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "interceptor")
}

/// One request on the agent's socket: writes `request`, optionally half-closes, and
/// reads everything until the agent closes. Returns the response text.
fn socket_exchange(socket: &Path, request: &[u8], half_close: bool) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect to the agent socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream.write_all(request).expect("writing the request");
    if half_close {
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // The agent closed with part of an oversized request unread.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "reading the answer to {:?}: {e}; got so far {:?}",
                String::from_utf8_lossy(&request[..request.len().min(80)]),
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    String::from_utf8(buf).expect("UTF-8 answer")
}

/// Exactly one JSON line, then the agent closed.
fn one_response(text: &str) -> Value {
    assert!(text.ends_with('\n'), "answer is not one line: {text:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "expected one answer line: {text:?}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("answer is not JSON ({e}): {text:?}"))
}

fn assert_socket_error(answer: &Value, code: u64, needle: &str) {
    assert_eq!(answer["result"], "error", "{answer}");
    assert_eq!(answer["code"], code, "{answer}");
    let msg = answer["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "{needle:?} not in {answer}");
}

#[test]
fn malformed_config_on_stdin_is_a_decoding_error_and_harms_nothing() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("bad-stdin", &[]);
    let server = node.pod("demo", "server");
    let env = node.tb.pod_cni_env(&server);
    let env = overrides(&env);
    let before = node.config_dump();

    let cases: [(&[u8], &str); 6] = [
        (b"{not json", "key must be a string at line 1 column 2"),
        (b"", "EOF while parsing"),
        (
            br#"{"cniVersion":"1.0.0","name":"itb","type":"interceptor-cni""#,
            "EOF while parsing",
        ),
        (b"null", "invalid type: null"),
        (b"\xff\xfe{}", "expected value at line 1 column 1"),
        (br#"{"cniVersion": 1}"#, "invalid type: integer"),
    ];
    for (stdin, why) in cases {
        let out = node.tb.cni_raw("ADD", 1, &env, stdin).expect("plugin runs");
        let err = expect_cni_error(&out, 6);
        let msg = msg(&err);
        assert!(
            msg.contains("network configuration") && msg.contains(why),
            "stdin {:?}: {msg:?} does not name the problem ({why:?})",
            String::from_utf8_lossy(stdin)
        );
    }

    // The agent never heard of any of it: same pods, same sandbox, still ready.
    assert_agent_alive(&mut node);
    let after = node.config_dump();
    assert_eq!(after["pods"], before["pods"]);
    let row = pod_row(&after, "demo/server").expect("server row");
    assert_eq!(row["container_id"], server.container_id.as_str());
    assert_eq!(row["enrolled"], true);

    // A normal pod is still added and intercepted.
    let client = node.pod("demo", "client");
    let _echo = echo_server(&node, &server);
    assert_intercepted(&node, &client, &server);
}

#[test]
fn add_without_netns_is_invalid_environment() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("no-netns", &[]);
    let server = node.pod("demo", "server");
    // A real chain result as prevResult: only the environment is wrong.
    let stdin = serde_json::to_vec(&node.tb.plugin_config(1, Some(&server.cni_result))).unwrap();
    let args = pod_args("demo", "client");

    // Unset, and set but empty (runtimes do that on DEL): both mean "no netns".
    for netns in [None, Some("")] {
        let env = [("CNI_NETNS", netns), ("CNI_ARGS", Some(args.as_str()))];
        let out = node
            .tb
            .cni_raw("ADD", 1, &env, &stdin)
            .expect("plugin runs");
        let err = expect_cni_error(&out, 4);
        assert!(msg(&err).contains("CNI_NETNS"), "{err}");
    }

    // A netns path that does not exist gets past the plugin; the agent refuses it and
    // names the path.
    let missing = format!("/var/run/netns/itb-{}-no-such-netns", node.tb.id());
    let env = [
        ("CNI_NETNS", Some(missing.as_str())),
        ("CNI_ARGS", Some(args.as_str())),
    ];
    let out = node
        .tb
        .cni_raw("ADD", 1, &env, &stdin)
        .expect("plugin runs");
    let err = expect_cni_error(&out, 3);
    assert!(msg(&err).contains(&missing), "{err}");
    // A path that exists but is no network namespace: the agent fails to enter it.
    let not_netns = node.tb.state_dir().join("label");
    let not_netns = not_netns.to_str().expect("utf-8");
    let env = [
        ("CNI_NETNS", Some(not_netns)),
        ("CNI_ARGS", Some(args.as_str())),
    ];
    let out = node
        .tb
        .cni_raw("ADD", 1, &env, &stdin)
        .expect("plugin runs");
    let err = expect_cni_error(&out, 5);
    assert!(msg(&err).contains(not_netns), "{err}");

    // The failed ADDs left nothing behind, and the pod can still come up for real.
    assert_agent_alive(&mut node);
    assert_eq!(pod_row(&node.config_dump(), "demo/client"), None);
    let client = node.pod("demo", "client");
    let row = pod_row(&node.config_dump(), "demo/client").expect("client row");
    assert_eq!(row["enrolled"], true, "{row}");
    let _echo = echo_server(&node, &server);
    assert_intercepted(&node, &client, &server);
}

#[test]
fn unknown_pod_is_refused_and_leaves_nothing() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("ghost", &[]);
    let err = node
        .tb
        .add_pod("demo", "ghost")
        .expect_err("a pod the agent does not know must not start");
    let cni = err
        .downcast_ref::<CniError>()
        .unwrap_or_else(|| panic!("not a CNI error: {err:#}"));
    assert_eq!(cni.plugin, "interceptor-cni", "{cni}");
    assert_eq!(cni.command, "ADD", "{cni}");
    assert_eq!(cni.code, 3, "{cni}");
    assert!(cni.msg.contains("demo/ghost"), "{cni}");
    assert!(
        cni.exit_code.is_some_and(|c| c != 0),
        "exit code {:?}",
        cni.exit_code
    );

    // The runtime's teardown (DEL of the chain) and the netns removal ran: no netns, no
    // veth on the bridge, no address reserved, no row in the agent.
    assert!(node.tb.pods().is_empty());
    assert_eq!(pod_netns(&node.tb), Vec::<String>::new());
    assert_eq!(node_veths(&node.tb), 0);
    assert_eq!(ipam_reservations(&node.tb), 0);
    let dump = node.config_dump();
    assert!(pod_rows(&dump).is_empty(), "{}", dump["pods"]);
    if let Some(bpftool) = bpftool() {
        assert_eq!(enrolled_map_len(bpftool, &node.tb), 0);
    }

    // Known pods still work, with the ghost's address back in the pool.
    assert_agent_alive(&mut node);
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    assert_eq!(ipam_reservations(&node.tb), 2);
    let _echo = echo_server(&node, &server);
    assert_intercepted(&node, &client, &server);
}

#[test]
fn garbage_on_the_agent_socket_gets_an_error_line() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("garbage", &[]);
    let socket = node.tb.agent_socket();

    let answer = one_response(&socket_exchange(&socket, b"hello\n", false));
    assert_socket_error(&answer, 6, "malformed request");

    // Over the cap, without a newline: refused after the cap, not read forever.
    let big = vec![b'x'; 70_000];
    let answer = one_response(&socket_exchange(&socket, &big, false));
    assert_socket_error(&answer, 6, "exceeds");
    assert_socket_error(&answer, 6, &MAX_MESSAGE_BYTES.to_string());

    // Well-formed JSON that is not a request, and a request missing its fields.
    for request in [
        &br#"{"command":"REBOOT"}"#[..],
        br#"{"command":"ADD","podName":"client"}"#,
        br#"[1,2,3]"#,
    ] {
        let mut line = request.to_vec();
        line.push(b'\n');
        let answer = one_response(&socket_exchange(&socket, &line, false));
        assert_socket_error(&answer, 6, "malformed request");
    }
    // Nothing at all, then EOF.
    let answer = one_response(&socket_exchange(&socket, b"", true));
    assert_socket_error(&answer, 6, "malformed request");

    // A silent client does not hold up the next one.
    let silent = UnixStream::connect(&socket).expect("connect");
    let started = Instant::now();
    let answer = one_response(&socket_exchange(
        &socket,
        b"{\"command\":\"STATUS\"}\n",
        false,
    ));
    assert_eq!(answer["result"], "ok", "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "STATUS took {:?} behind a silent connection",
        started.elapsed()
    );
    // The last request may come without a newline if the client half-closes.
    let answer = one_response(&socket_exchange(&socket, b"{\"command\":\"STATUS\"}", true));
    assert_eq!(answer["result"], "ok", "{answer}");
    drop(silent);

    assert_agent_alive(&mut node);
    assert!(pod_rows(&node.config_dump()).is_empty());
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let _echo = echo_server(&node, &server);
    assert_intercepted(&node, &client, &server);
}

#[test]
fn broken_manifest_keeps_the_previous_model() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("broken-yaml", &[]);
    let before = node.config_dump();
    let generation = before["source"]["generation"].as_u64().expect("generation");
    assert!(generation >= 1, "{}", before["source"]);
    assert_eq!(before["source"]["last_error"], Value::Null);

    // Line 3 has a mapping value where none is allowed.
    let broken = node.manifests.join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: v1\nkind: Namespace\nmetadata: name: broken\n",
    )
    .expect("writing broken.yaml");
    let error = wait_until(
        Duration::from_secs(5),
        "last_error naming broken.yaml:3",
        || {
            let dump = node.config_dump();
            let error = dump["source"]["last_error"].as_str()?.to_owned();
            error.contains("broken.yaml:3").then_some(error)
        },
    );
    assert!(
        error.contains(&broken.display().to_string()),
        "the error should name the file: {error}"
    );

    // The previous model is still in force.
    let dump = node.config_dump();
    assert_eq!(
        dump["source"]["generation"], generation,
        "{}",
        dump["source"]
    );
    assert_eq!(dump["model"], before["model"]);
    assert!(
        dump["model"]["pods"].get("demo/client").is_some(),
        "{}",
        dump["model"]["pods"]
    );
    assert!(dump["model"]["namespaces"].get("broken").is_none());
    assert_agent_alive(&mut node);

    // ... and pods are enrolled by it.
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let row = pod_row(&node.config_dump(), "demo/client").expect("client row");
    assert_eq!(row["enrolled"], true, "{row}");
    let _echo = echo_server(&node, &server);
    assert_intercepted(&node, &client, &server);

    // Removing the file clears the error; the model did not change, so neither does the
    // generation.
    std::fs::remove_file(&broken).expect("removing broken.yaml");
    let dump = wait_until(Duration::from_secs(5), "last_error to clear", || {
        let dump = node.config_dump();
        dump["source"]["last_error"].is_null().then_some(dump)
    });
    assert_eq!(
        dump["source"]["generation"], generation,
        "{}",
        dump["source"]
    );
    assert_eq!(dump["model"], before["model"]);
    assert_agent_alive(&mut node);
}

#[test]
fn del_is_idempotent_and_tolerates_missing_input() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("del-twice", &[]);
    let client = node.pod("demo", "client");
    let row = pod_row(&node.config_dump(), "demo/client").expect("client row");
    assert_eq!(row["enrolled"], true, "{row}");
    let bpftool = bpftool();
    if let Some(bpftool) = bpftool {
        assert_eq!(enrolled_map_len(bpftool, &node.tb), 1);
    }

    // A DEL from another sandbox of the same pod name (a stale runtime retry) keeps the
    // current one: cni_raw gives it a fresh CNI_CONTAINERID.
    let args = pod_args("demo", "client");
    let stale = serde_json::to_vec(&node.tb.plugin_config(1, None)).unwrap();
    let out = node
        .tb
        .cni_raw(
            "DEL",
            1,
            &[("CNI_NETNS", None), ("CNI_ARGS", Some(args.as_str()))],
            &stale,
        )
        .expect("plugin runs");
    assert!(out.status.success(), "{out:?}");
    let row = pod_row(&node.config_dump(), "demo/client").expect("client row kept");
    assert_eq!(row["enrolled"], true, "{row}");
    assert_eq!(row["container_id"], client.container_id.as_str());

    node.tb.del_pod(&client).expect("first DEL");
    node.tb.del_pod(&client).expect("second DEL is a no-op");

    // The runtime retrying the plugin's DEL for the same sandbox (netns gone by now).
    let env = node.tb.pod_cni_env(&client);
    let env = overrides(&env);
    let conf = serde_json::to_vec(&node.tb.plugin_config(1, Some(&client.cni_result))).unwrap();
    let out = node.tb.cni_raw("DEL", 1, &env, &conf).expect("plugin runs");
    assert!(out.status.success(), "repeated DEL failed: {out:?}");
    assert_eq!(out.stdout, "", "DEL prints nothing on success");

    // A pod that never existed, no CNI_NETNS and no prevResult.
    let never = pod_args("demo", "never-existed");
    let bare = serde_json::to_vec(&node.tb.plugin_config(1, None)).unwrap();
    let env = [("CNI_NETNS", None), ("CNI_ARGS", Some(never.as_str()))];
    let out = node.tb.cni_raw("DEL", 1, &env, &bare).expect("plugin runs");
    assert!(
        out.status.success(),
        "DEL of an unknown pod failed: {out:?}"
    );
    assert_eq!(out.stdout, "");
    // And one without any pod name at all.
    let out = node
        .tb
        .cni_raw("DEL", 1, &[("CNI_NETNS", None), ("CNI_ARGS", None)], &bare)
        .expect("plugin runs");
    assert!(out.status.success(), "DEL without CNI_ARGS failed: {out:?}");

    assert_agent_alive(&mut node);
    let dump = node.config_dump();
    let rows = pod_rows(&dump);
    assert!(rows.is_empty(), "{}", dump["pods"]);
    if let Some(bpftool) = bpftool {
        assert_eq!(
            enrolled_map_len(bpftool, &node.tb),
            0,
            "the data path still has an enrolled netns"
        );
    }

    // The same pod comes back cleanly.
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let dump = node.config_dump();
    let enrolled_rows = pod_rows(&dump)
        .iter()
        .filter(|r| r["enrolled"] == true)
        .count();
    assert_eq!(enrolled_rows, 2, "{}", dump["pods"]);
    if let Some(bpftool) = bpftool {
        assert_eq!(enrolled_map_len(bpftool, &node.tb), enrolled_rows);
    }
    let _echo = echo_server(&node, &server);
    assert_intercepted(&node, &client, &server);
}

#[test]
fn sigterm_removes_pins_socket_and_links() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("sigterm", &[]);
    let _client = node.pod("demo", "client");
    let pid = node.agent.as_ref().expect("agent").pid();
    let socket = node.tb.agent_socket();
    assert!(socket.exists(), "no CNI socket at {}", socket.display());
    for pin in PINS {
        let path = node.tb.bpffs_dir().join(pin);
        assert!(path.exists(), "{} not pinned", path.display());
    }
    if let Some(bpftool) = bpftool() {
        assert_eq!(
            attached_programs(bpftool, node.tb.cgroup_path()),
            expected_attach_types()
        );
    }

    // cleanup refuses to pull the pins from under a running agent.
    let out = common::run_cleanup(&node.tb);
    assert!(
        !out.status.success(),
        "cleanup ran under a live agent: {out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("still running"), "{stderr}");
    assert!(stderr.contains(&pid.to_string()), "{stderr}");
    assert!(node.tb.bpffs_dir().exists());
    assert!(socket.exists());
    assert_agent_alive(&mut node);

    let status = node.stop_agent();
    assert!(status.success(), "agent exit: {status}");
    assert!(
        !node.tb.bpffs_dir().exists(),
        "{} left behind",
        node.tb.bpffs_dir().display()
    );
    assert!(!socket.exists(), "{} left behind", socket.display());
    assert!(
        !node.tb.agent_state_dir().join("agent.pid").exists(),
        "pid file left behind"
    );
    assert!(
        !interceptor_process_alive(pid),
        "agent pid {pid} still runs"
    );
    let procs = std::fs::read_to_string(node.tb.cgroup_path().join("cgroup.procs")).unwrap();
    assert_eq!(procs.trim(), "", "processes left in the testbed cgroup");
    assert_no_programs_attached(&node.tb);
    let log = std::fs::read_to_string(node.tb.state_dir().join("agent.log")).unwrap();
    assert!(log.contains("SIGTERM"), "{log}");

    // What a stop keeps on purpose is the list of pods for the next agent to adopt;
    // cleanup removes it (and the emptied state dir), then has nothing left to do.
    let pods_file = node.tb.agent_state_dir().join("pods.json");
    assert!(
        pods_file.exists(),
        "the pod list is kept for the next agent"
    );
    let out = common::run_cleanup(&node.tb);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("pods.json"), "{stdout}");
    assert!(!pods_file.exists());
    let out = common::run_cleanup(&node.tb);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "nothing to clean up"
    );
}

#[test]
fn sigkill_leaves_pins_that_cleanup_removes() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("sigkill", &["--tc-attach", "tcx"]);
    // TCX links are pinned (kernel ≥ 6.6); below, tc programs are netlink filters on the
    // pods' interfaces and nothing of them is in bpffs.
    let tcx = common::agent_has_feature(&node, "bpf_link for tc (TCX)");
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let echo = echo_server(&node, &server);
    let pid = node.agent.as_ref().expect("agent").pid();
    let socket = node.tb.agent_socket();

    node.agent.take().expect("agent").kill();
    assert!(
        !interceptor_process_alive(pid),
        "agent pid {pid} still runs"
    );
    // The pins outlive the process, and so do the pinned links: connect4 keeps
    // redirecting enrolled pods to 15001, where nobody listens any more.
    for pin in PINS.iter().chain(LINK_PINS.iter()) {
        let path = node.tb.bpffs_dir().join(pin);
        assert!(path.exists(), "{} gone after SIGKILL", path.display());
    }
    let tc_links = std::fs::read_dir(node.tb.bpffs_dir())
        .expect("pin dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_tc_"))
        .count();
    assert_eq!(
        tc_links,
        if tcx { 4 } else { 0 },
        "ingress and egress tc links of both pods stay pinned (TCX: {tcx})"
    );
    assert!(socket.exists(), "socket vanished without a cleanup");
    if let Some(bpftool) = bpftool() {
        let mut kept: Vec<String> = ATTACH_TYPES
            .iter()
            .filter(|t| **t != "cgroup_getsockopt")
            .map(|t| t.to_string())
            .collect();
        kept.sort();
        assert_eq!(attached_programs(bpftool, node.tb.cgroup_path()), kept);
    }
    // Fail closed: with the agent gone, an enrolled pod's new connection is refused in
    // its own netns and never reaches the server past the mesh.
    let target = format!("{}:9000", server.ip);
    let report = node
        .tb
        .run_client(&client, &["--connect", &target, "--send-bytes", "10"])
        .expect("client");
    assert_eq!(
        report.error.as_deref(),
        Some("connection refused"),
        "{report:?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        echo.events().is_empty(),
        "the connection leaked past the mesh: {:?}",
        echo.events()
    );

    let out = common::run_cleanup(&node.tb);
    assert!(out.status.success(), "cleanup failed: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("removed {}", node.tb.bpffs_dir().display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("removed {}", socket.display())),
        "{stdout}"
    );
    assert!(!node.tb.bpffs_dir().exists(), "pins left after cleanup");
    assert!(!socket.exists(), "socket left after cleanup");
    assert!(!node.tb.agent_state_dir().join("agent.pid").exists());

    // Idempotent.
    let out = common::run_cleanup(&node.tb);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "nothing to clean up"
    );
}

/// Kills the agent of `node` and starts a new one on the same state dir and bpffs
/// directory, without a cleanup in between.
fn restart_after_kill(node: &mut Node) {
    node.agent.take().expect("agent").kill();
    assert!(node.tb.bpffs_dir().join("ENROLLED_NETNS").exists());
    let agent = node
        .tb
        .start_agent(&node.manifests, &[])
        .expect("agent starts over leftovers");
    node.agent = Some(agent);
    assert_agent_alive(node);
}

#[test]
fn agent_restarts_over_a_killed_agents_leftovers() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("restart", &[]);
    let before = node.pod("demo", "client");
    restart_after_kill(&mut node);
    // The new agent replaced the stale pins, pid file and socket.
    if let Some(bpftool) = bpftool() {
        assert_eq!(
            attached_programs(bpftool, node.tb.cgroup_path()),
            expected_attach_types(),
            "stale or duplicate programs on the cgroup"
        );
        // Fresh maps, holding only the pod the new agent adopted from the state dir.
        assert_eq!(
            enrolled_map_len(bpftool, &node.tb),
            1,
            "stale or missing map content"
        );
    }
    // The pod of the killed agent goes away and comes back; pods added after the restart
    // are enrolled and intercepted.
    node.tb
        .del_pod(&before)
        .expect("DEL of a pod the new agent does not know");
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let _echo = echo_server(&node, &server);
    assert_intercepted(&node, &client, &server);
}

/// DESIGN.md §4 "Restart": a new agent adopts the pods the killed one was handed (from
/// its state dir), reopening their listeners and maps before it reports ready, so a
/// Service whose endpoints were added before the restart still has them.
#[test]
fn pods_added_before_a_restart_are_still_served() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("reconcile", &[]);
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    restart_after_kill(&mut node);
    let dump = node.config_dump();
    for key in ["demo/server", "demo/client"] {
        let row =
            pod_row(&dump, key).unwrap_or_else(|| panic!("{key} forgotten: {}", dump["pods"]));
        assert_eq!(row["enrolled"], true, "{row}");
    }
    let _echo = echo_server(&node, &server);
    assert_intercepted(&node, &client, &server);
}

/// A pod list torn or corrupted by a crash: the new agent adopts no pod and removes the
/// pods the previous agent left in the maps, so nobody's connections are steered to a
/// listener that no agent opened; the pods work (unintercepted, said in the log) until
/// their next CNI ADD, and the bad file is kept aside for a look.
#[test]
fn a_corrupt_pod_list_leaves_no_pod_steered_to_a_closed_listener() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("corruptpods", &[]);
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    node.agent.take().expect("agent").kill();
    let pods_file = node.tb.agent_state_dir().join("pods.json");
    std::fs::write(&pods_file, b"[{\"podNamespace\": \"demo\", tor").expect("corrupt it");
    let agent = node
        .tb
        .start_agent(&node.manifests, &[])
        .expect("agent starts over a corrupt pod list");
    node.agent = Some(agent);
    assert!(
        node.agent_log().contains("remembered pods unreadable"),
        "{}",
        node.agent_log()
    );
    assert!(pods_file.with_extension("json.corrupt").exists());
    let dump = node.config_dump();
    assert_eq!(
        dump["datapath_records"]["enrolled_netns"], 0,
        "{}",
        dump["datapath_records"]
    );
    // The client is no longer steered to 15001, where nobody listens: it reaches the
    // server's pod IP directly.
    let _echo = echo_server(&node, &server);
    let target = format!("{}:{ECHO_TARGET_PORT}", server.ip);
    let report = node
        .tb
        .run_client(&client, &["--connect", &target, "--send-bytes", "100"])
        .expect("client");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
}

#[test]
fn two_nodes_with_overlapping_pod_addresses_stay_apart() {
    if !common::privileged() {
        return;
    }
    let mut a = Node::start("overlap-a", &[]);
    let mut b = Node::start("overlap-b", &[]);
    let server_a = a.pod("demo", "server");
    let client_a = a.pod("demo", "client");
    let server_b = b.pod("demo", "server");
    let client_b = b.pod("demo", "client");
    // The point of the test: both nodes hand out the same addresses.
    assert_eq!(server_a.ip, server_b.ip);
    assert_eq!(client_a.ip, client_b.ip);
    let _echo_a = echo_server(&a, &server_a);
    let _echo_b = echo_server(&b, &server_b);

    // Different connection counts per node, so a record in the wrong agent shows.
    const RUNS_A: usize = 3;
    const RUNS_B: usize = 5;
    let barrier = std::sync::Barrier::new(2);
    let run = |node: &Node, client: &Pod, runs: usize| -> Vec<String> {
        barrier.wait();
        (0..runs)
            .map(|_| {
                let report = node
                    .tb
                    .run_client(
                        client,
                        &[
                            "--connect",
                            &service_addr(),
                            "--send-bytes",
                            "65536",
                            "--expect-greeting",
                        ],
                    )
                    .expect("client runs");
                assert_eq!(
                    report.error,
                    None,
                    "{}: {report:?}\nagent log:\n{}",
                    node.tb.label(),
                    node.agent_log()
                );
                assert!(report.echoed_all(), "{report:?}");
                report.local.expect("local address")
            })
            .collect()
    };
    let (locals_a, locals_b) = std::thread::scope(|s| {
        let ta = s.spawn(|| run(&a, &client_a, RUNS_A));
        let tb = s.spawn(|| run(&b, &client_b, RUNS_B));
        (ta.join().expect("node a"), tb.join().expect("node b"))
    });

    for (node, locals, server) in [(&a, &locals_a, &server_a), (&b, &locals_b, &server_b)] {
        let label = node.tb.label();
        let records = wait_until(
            Duration::from_secs(5),
            &format!("{} records in {label}", locals.len()),
            || {
                // Each connection is logged twice: by the client's outbound listener and
                // by the server's inbound one (same node); the outbound ones are counted.
                let records: Vec<serde_json::Value> = node.config_dump()["connections"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|r| r["direction"] == "outbound")
                    .collect();
                (records.len() >= locals.len()).then_some(records)
            },
        );
        assert_eq!(
            records.len(),
            locals.len(),
            "{label}: the agent logged connections of the other node: {records:#?}"
        );
        let mut logged: Vec<&str> = records
            .iter()
            .map(|r| r["client"].as_str().unwrap_or_default())
            .collect();
        logged.sort();
        let mut made: Vec<&str> = locals.iter().map(String::as_str).collect();
        made.sort();
        assert_eq!(logged, made, "{label}");
        for r in &records {
            assert_eq!(r["pod"], "demo/client", "{label}: {r}");
            assert_eq!(
                r["target"]["addr"],
                format!("{}:{ECHO_TARGET_PORT}", server.ip),
                "{label}: {r}"
            );
        }
        let counters = &node.config_dump()["datapath_counters"];
        assert_eq!(
            counters["redirected"].as_u64(),
            Some(locals.len() as u64),
            "{label}: {counters}"
        );
    }
    assert_agent_alive(&mut a);
    assert_agent_alive(&mut b);
}

/// The runtime may call ADD before the watch delivered the pod: the agent waits briefly.
#[test]
fn an_add_waits_briefly_for_a_pod_the_model_lacks() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("latecomer", &["--unknown-pod-wait-ms", "5000"]);
    let manifest = node.manifests.join("mesh.yaml");
    let late = format!(
        "{}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: latecomer, namespace: demo}}\nspec:\n  containers: [{{name: main, image: busybox}}]\n",
        common::MANIFESTS
    );
    let writer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(700));
        std::fs::write(manifest, late).expect("manifest");
    });
    let pod = node.pod("demo", "latecomer");
    writer.join().expect("writer");
    let dump = node.config_dump();
    let row = pod_row(&dump, "demo/latecomer").expect("row");
    assert_eq!(row["enrolled"], true, "{row}");
    assert_eq!(row["ip"], pod.ip.to_string());
}

#[test]
fn unknown_pods_can_be_admitted_unintercepted() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start(
        "admit",
        &["--unknown-pod", "admit", "--unknown-pod-wait-ms", "100"],
    );
    let _ghost = node.pod("demo", "ghost");
    let dump = node.config_dump();
    let row = pod_row(&dump, "demo/ghost").expect("row");
    assert_eq!(row["enrolled"], false, "{row}");
    assert!(
        row["reason"]
            .as_str()
            .is_some_and(|r| r.contains("admitted")),
        "{row}"
    );
    assert!(node.agent_log().contains("admitted, not intercepted"));
}
