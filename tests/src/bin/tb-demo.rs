//! `cargo xtask demo`: one node of the local testbed, the agent on `examples/`, a client
//! pod reaching the `echo` Service through the kernel redirect and the proxy, and a pod
//! outside the mesh left alone. Prints what happened, then cleans everything up.
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use interceptor_testbed::{bin_path, Testbed, ADMIN_ADDR};

const SERVICE: &str = "10.96.0.10:80";
const CONNECTIONS: usize = 4;

fn main() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("the demo builds network namespaces and attaches eBPF programs: run it as root");
    }
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut tb = Testbed::builder("demo")
        .build()
        .context("building the testbed")?;
    println!(
        "== testbed {}: node netns {}, cgroup {}",
        tb.id(),
        tb.node_netns(),
        tb.cgroup_path().display()
    );

    let agent = tb
        .start_agent(&examples, &["--bpf-debug"])
        .context("starting the agent")?;
    println!(
        "== agent pid {} ready on {ADMIN_ADDR} (inside the node netns), manifests {}",
        agent.pid(),
        examples.display()
    );

    let v1 = tb.add_pod("demo", "server-v1")?;
    let v2 = tb.add_pod("demo", "server-v2")?;
    let client = tb.add_pod("demo", "client")?;
    let outsider = tb.add_pod("legacy", "outsider")?;
    for pod in [&v1, &v2, &client, &outsider] {
        println!(
            "   pod {}/{} ip {} (CNI chain: bridge + host-local + interceptor-cni)",
            pod.namespace, pod.name, pod.ip
        );
    }
    let _s1 = tb.spawn_server(
        &v1,
        &["echo", "--listen", "0.0.0.0:9000", "--greeting", "hello-v1"],
    )?;
    let _s2 = tb.spawn_server(
        &v2,
        &["echo", "--listen", "0.0.0.0:9000", "--greeting", "hello-v2"],
    )?;

    // Follow the kernel programs' trace lines about the client while it connects.
    let mut trace_cmd = Command::new(bin_path("interceptor"));
    trace_cmd
        .args(["trace", "--pod", "demo/client", "--admin-addr", ADMIN_ADDR])
        .args(["--max-lines", &(2 * CONNECTIONS).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut trace = tb.spawn_in(tb.node_netns(), false, trace_cmd)?;
    std::thread::sleep(Duration::from_millis(300));

    println!("\n== demo/client -> echo Service {SERVICE}, {CONNECTIONS} connections");
    for i in 0..CONNECTIONS {
        let report = tb.run_client(
            &client,
            &[
                "--connect",
                SERVICE,
                "--send-bytes",
                "1024",
                "--seed",
                &i.to_string(),
                "--expect-greeting",
            ],
        )?;
        println!(
            "   #{i}: greeting {:?}, sent {} B, echoed {} B, checksums {}, error {:?}",
            report.greeting.as_deref().unwrap_or(""),
            report.sent,
            report.received,
            if report.sent_sha256 == report.received_sha256 {
                "match"
            } else {
                "DIFFER"
            },
            report.error
        );
    }

    println!("\n== what the proxy saw (/config_dump connections)");
    let (_, body) = tb.admin_get("/config_dump")?;
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    for record in dump["connections"].as_array().into_iter().flatten() {
        let target = match record["target"]["kind"].as_str() {
            Some("endpoint") => format!(
                "endpoint {} ({})",
                record["target"]["pod"].as_str().unwrap_or("?"),
                record["target"]["addr"].as_str().unwrap_or("?")
            ),
            Some("local") => format!(
                "the app in the pod ({})",
                record["target"]["addr"].as_str().unwrap_or("?")
            ),
            other => format!("{} {}", other.unwrap_or("?"), record["target"]["addr"]),
        };
        println!(
            "   {} {} from {}: original dst {} -> {target}, {} B up / {} B down, {}",
            record["direction"].as_str().unwrap_or("?"),
            record["pod"].as_str().unwrap_or("?"),
            record["client"].as_str().unwrap_or("?"),
            record["original_dst"].as_str().unwrap_or("?"),
            record["upstream_bytes"],
            record["downstream_bytes"],
            record["outcome"].as_str().unwrap_or("?"),
        );
    }
    println!("   kernel counters: {}", dump["datapath_counters"]);

    println!("\n== legacy/outsider (not enrolled) -> {SERVICE}");
    let report = tb.run_client(
        &outsider,
        &["--connect", SERVICE, "--connect-timeout-ms", "1000"],
    )?;
    println!(
        "   untouched by the mesh: {}",
        report.error.as_deref().unwrap_or("connected (unexpected!)")
    );
    let direct = format!("{}:9000", v1.ip);
    let report = tb.run_client(
        &outsider,
        &[
            "--connect",
            &direct,
            "--send-bytes",
            "100",
            "--expect-greeting",
        ],
    )?;
    println!(
        "   direct to {direct}: greeting {:?}, local {:?} (no proxy involved)",
        report.greeting.unwrap_or_default(),
        report.local
    );

    println!("\n== trace lines (interceptor trace --pod demo/client)");
    let stdout = trace.stdout.take().context("trace stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut lines = 0;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                println!("   {line}");
                lines += 1;
            }
            Err(_) => break,
        }
    }
    if lines == 0 {
        println!("   (no trace lines: is tracefs available?)");
    }
    let _ = trace.kill();
    let _ = trace.wait();

    let status = agent.stop()?;
    println!(
        "\n== agent stopped ({status}); pins in {} removed: {}",
        tb.bpffs_dir().display(),
        !tb.bpffs_dir().exists()
    );
    drop(tb);
    println!("== testbed removed (netns, cgroup, state dir)");
    Ok(())
}
