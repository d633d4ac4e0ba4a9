//! The agent under a container runtime's default open-file limit (soft 1,024): it raises
//! its soft limit to the hard one, so an enrolled pod can hold more connections through
//! the proxy than 1,024 descriptors would allow (each takes two). Its own test binary:
//! it lowers this process's limit while the agent starts.
#[macro_use]
mod common;

use std::time::Duration;

use common::Node;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

#[test]
fn the_agent_raises_its_open_file_limit_and_holds_more_than_a_thousand_connections() {
    if !common::privileged() {
        return;
    }
    let original = getrlimit(Resource::Nofile);
    let hard = original.maximum.expect("a finite hard limit");
    assert!(
        hard >= 4096,
        "the hard limit {hard} leaves no room for this test"
    );
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(1024),
            maximum: Some(hard),
        },
    )
    .expect("lowering the soft limit");
    let started = std::panic::catch_unwind(|| Node::start("nofile", &["--mode", "ebpf"]));
    setrlimit(Resource::Nofile, original).expect("restoring the limit");
    let mut node = started.expect("agent starts");

    let pid = node.agent.as_ref().expect("agent").pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3], hard.to_string(), "soft limit: {line}");
    assert!(node.agent_log().contains("open file limit raised"));

    let client = node.pod("demo", "client");
    let server = node.pod("legacy", "legacy-server");
    let _echo = node
        .tb
        .spawn_server(&server, &["--quiet", "echo", "--listen", "0.0.0.0:9000"])
        .expect("echo server");
    const HELD: u32 = 1_500;
    let target = format!("{}:9000", server.ip);
    let report = node
        .tb
        .run_tb_pod(
            &client,
            &[
                "hold",
                "--connect",
                &target,
                "--count",
                &HELD.to_string(),
                "--hold-ms",
                "500",
            ],
            Duration::from_secs(120),
        )
        .expect("hold");
    assert_eq!(report["open"], HELD, "{report}\n{}", node.agent_log());
    assert_eq!(report["errors"], 0, "{report}");
}
