//! `interceptor trace`: follow the kernel programs' `bpf_printk` lines in trace_pipe,
//! optionally only those about one pod.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use interceptor_common::TRACE_PREFIX;

/// Where trace_pipe may be, newest convention first.
const TRACE_PIPES: [&str; 2] = [
    "/sys/kernel/tracing/trace_pipe",
    "/sys/kernel/debug/tracing/trace_pipe",
];

/// Find trace_pipe, mounting tracefs on /sys/kernel/tracing if nothing is mounted.
pub fn locate_trace_pipe() -> anyhow::Result<PathBuf> {
    if let Some(found) = TRACE_PIPES.iter().map(PathBuf::from).find(|p| p.exists()) {
        return Ok(found);
    }
    let mountpoint = Path::new("/sys/kernel/tracing");
    nix::mount::mount(
        Some("tracefs"),
        mountpoint,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "no trace_pipe found and mounting tracefs on {} failed",
            mountpoint.display()
        )
    })?;
    eprintln!("mounted tracefs on {}", mountpoint.display());
    Ok(mountpoint.join("trace_pipe"))
}

/// Which lines to keep.
#[derive(Clone, Debug, Default)]
pub struct TraceFilter {
    /// Substrings of which one must appear (the pod's netns cookie); empty: all.
    pub any_of: Vec<String>,
}

impl TraceFilter {
    pub fn matches(&self, line: &str) -> bool {
        line.contains(TRACE_PREFIX)
            && (self.any_of.is_empty() || self.any_of.iter().any(|needle| line.contains(needle)))
    }
}

/// The filter for one pod, from the agent's `/config_dump`.
pub fn pod_filter(config_dump: &serde_json::Value, pod: &str) -> anyhow::Result<TraceFilter> {
    let pods = config_dump["pods"]
        .as_array()
        .context("config_dump has no pods list")?;
    let Some(entry) = pods.iter().find(|p| p["pod"] == pod) else {
        bail!("pod {pod} is not known to the agent");
    };
    // Every line names the netns cookie, which is unique for the life of the kernel; IPs
    // are not (pod addresses are reused, and parallel testbeds overlap).
    let Some(cookie) = entry["netns_cookie"].as_u64() else {
        bail!("pod {pod} is not enrolled: the programs print nothing about it");
    };
    Ok(TraceFilter {
        any_of: vec![format!("netns={cookie} ")],
    })
}

/// The line with every `ipx:<hex>` (how the programs print an address on kernels
/// before 5.13, whose `bpf_trace_printk` has no `%pI4`) written as a dotted IPv4 address,
/// so lines read the same on every kernel.
pub fn dotted(line: &str) -> String {
    const MARK: &str = "ipx:";
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        let after = &rest[at + MARK.len()..];
        let digits = after
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(after.len());
        match u32::from_str_radix(&after[..digits], 16) {
            Ok(ip) if digits > 0 && digits <= 8 => {
                out.push_str(&std::net::Ipv4Addr::from(ip).to_string())
            }
            _ => out.push_str(&rest[at..at + MARK.len() + digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// Copy matching lines to `out` until the pipe ends or `max_lines` were written.
pub fn follow(
    pipe: &Path,
    filter: &TraceFilter,
    max_lines: Option<usize>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let file = std::fs::File::open(pipe).with_context(|| format!("opening {}", pipe.display()))?;
    let mut written = 0;
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("reading {}", pipe.display()))?;
        if filter.matches(&line) {
            writeln!(out, "{}", dotted(line.trim()))?;
            out.flush()?;
            written += 1;
            if max_lines.is_some_and(|max| written >= max) {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_addresses_of_older_kernels_are_shown_dotted() {
        assert_eq!(
            dotted("x icpt: connect4 netns=7 orig=ipx:a60000a:80 -> proxy 15001"),
            "x icpt: connect4 netns=7 orig=10.96.0.10:80 -> proxy 15001"
        );
        assert_eq!(
            dotted("icpt: tc inbound netns=7 port=9000 -> 15003 from ipx:af40003"),
            "icpt: tc inbound netns=7 port=9000 -> 15003 from 10.244.0.3"
        );
        // Lines of newer kernels and anything that is not an address stay as they are.
        let plain = "icpt: established netns=7 port=4000 orig=10.96.0.10";
        assert_eq!(dotted(plain), plain);
        assert_eq!(dotted("ipx:zz ipx:123456789"), "ipx:zz ipx:123456789");
    }

    #[test]
    fn pod_filter_uses_cookie_and_ip() {
        let dump = serde_json::json!({"pods": [
            {"pod": "demo/client", "netns_cookie": 4101, "ip": "10.244.0.5"},
            {"pod": "legacy/outsider", "netns_cookie": null, "ip": "10.244.0.6"}
        ]});
        let filter = pod_filter(&dump, "demo/client").unwrap();
        assert!(filter
            .matches("curl-1 [000] icpt: connect4 netns=4101 orig=10.96.0.10:80 -> proxy 15001"));
        assert!(filter.matches("x icpt: established netns=4101 port=40000 orig=10.96.0.10"));
        assert!(!filter.matches("x icpt: established netns=4102 port=40000 orig=10.96.0.10"));
        assert!(!filter.matches("x icpt: connect4 netns=41010 orig=1.2.3.4:80"));
        assert!(!filter.matches("unrelated netns=4101 line"));
        assert!(pod_filter(&dump, "demo/nobody").is_err());
    }
}
