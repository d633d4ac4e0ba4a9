//! The classic sidecar baseline: inside the client pod, iptables `nat OUTPUT` REDIRECTs
//! the client's connections to the server into Debian's HAProxy (TCP mode, one thread,
//! running as uid 1500, whose own connections the rules skip), which forwards them to a
//! fixed server address. One frontend per server port, so no original-destination lookup
//! is needed.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use interceptor_testbed::{Pod, Testbed};

use super::measure::{strings, ECHO_PORT, IPERF_PORT, SOCKPERF_PORT};
use super::proc::Background;
use super::sidecar::Sidecar;

pub const HAPROXY: &str = "/usr/sbin/haproxy";
/// HAProxy drops to this uid; the REDIRECT rules skip its sockets by owner.
pub const PROXY_UID: u32 = 1500;
/// (server port, HAProxy frontend port in the client pod).
pub const FRONTENDS: [(u16, u16); 3] = [
    (SOCKPERF_PORT, 15001),
    (IPERF_PORT, 15002),
    (ECHO_PORT, 15004),
];

/// HAProxy's configuration for a server at `server`.
pub fn config(server: Ipv4Addr) -> String {
    let mut cfg = format!(
        "global\n    nbthread 1\n    uid {PROXY_UID}\n    gid {PROXY_UID}\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n"
    );
    for (server_port, local_port) in FRONTENDS {
        cfg.push_str(&format!(
            "\nfrontend f{server_port}\n    bind 0.0.0.0:{local_port}\n    default_backend b{server_port}\n\
             \nbackend b{server_port}\n    server s {server}:{server_port}\n"
        ));
    }
    cfg
}

/// The `nat OUTPUT` rule (without `-A`/`-D`) steering the client's connections to
/// `server:server_port` into HAProxy's `local_port`.
fn rule(server: Ipv4Addr, server_port: u16, local_port: u16) -> Vec<String> {
    strings(&[
        "-p",
        "tcp",
        "-d",
        &format!("{server}/32"),
        "--dport",
        &server_port.to_string(),
        "-m",
        "owner",
        "!",
        "--uid-owner",
        &PROXY_UID.to_string(),
        "-j",
        "REDIRECT",
        "--to-ports",
        &local_port.to_string(),
    ])
}

/// Starts HAProxy in the client pod, then installs the REDIRECT rules.
pub fn start(tb: &Testbed, client: &Pod, server: Ipv4Addr, dir: &Path) -> Result<Sidecar> {
    let cfg_path = dir.join(format!("haproxy-{}.cfg", client.name));
    std::fs::write(&cfg_path, config(server))
        .with_context(|| format!("writing {}", cfg_path.display()))?;
    let cfg = cfg_path.display().to_string();
    let check = Command::new(HAPROXY)
        .args(["-c", "-f", &cfg])
        .output()
        .with_context(|| format!("running {HAPROXY} -c"))?;
    if !check.status.success() {
        bail!(
            "haproxy -c rejected the configuration: {}{}",
            String::from_utf8_lossy(&check.stdout).trim(),
            String::from_utf8_lossy(&check.stderr).trim()
        );
    }
    let log = dir.join(format!("haproxy-{}.log", client.name));
    let mut proc = Background::spawn(tb, client, HAPROXY, &strings(&["-db", "-f", &cfg]), &log)?;
    let ports: Vec<u16> = FRONTENDS.iter().map(|(_, local)| *local).collect();
    proc.wait_listening(&ports, Duration::from_secs(10))?;
    let mut h = Sidecar::new("haproxy", &client.netns, proc);
    for (server_port, local_port) in FRONTENDS {
        h.redirect(rule(server, server_port, local_port))?;
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_one_frontend_per_server_port() {
        let cfg = config(Ipv4Addr::new(10, 244, 0, 3));
        assert!(cfg.contains("nbthread 1"));
        assert!(cfg.contains("uid 1500"));
        assert!(cfg.contains("mode tcp"));
        assert!(cfg.contains("bind 0.0.0.0:15001"));
        assert!(cfg.contains("server s 10.244.0.3:11111"));
        assert!(cfg.contains("server s 10.244.0.3:5201"));
        assert!(cfg.contains("server s 10.244.0.3:9000"));
    }

    #[test]
    fn rule_skips_the_proxy_uid() {
        let r = rule(Ipv4Addr::new(10, 244, 0, 3), 9000, 15004).join(" ");
        assert_eq!(
            r,
            "-p tcp -d 10.244.0.3/32 --dport 9000 -m owner ! --uid-owner 1500 -j REDIRECT --to-ports 15004"
        );
    }
}
