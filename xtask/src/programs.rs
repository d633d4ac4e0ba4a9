//! The programs that the tests, the demo and the bench execute, each with the Debian
//! package it comes from, and the exec audit that holds them to this list: `cargo xtask
//! test|demo|bench` run their binaries with a `PATH` holding only these programs, so a
//! test that executes anything else fails on this machine exactly as it would on a fresh
//! one (where a package installed by hand is missing). Programs run by absolute path
//! (the CNI plugins in /usr/lib/cni, our own binaries) are covered by their package in
//! setup's list instead.
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Every program executed through `PATH` by a test, the demo, the bench, or what they
/// start (the agent runs iptables; `ip netns exec` runs the rest), and its package.
pub const PROGRAMS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ss", "iproute2"),
    ("bridge", "iproute2"),
    ("iptables", "iptables"),
    ("iptables-save", "iptables"),
    ("iptables-restore", "iptables"),
    ("iptables-legacy", "iptables"),
    ("iptables-legacy-save", "iptables"),
    ("iptables-legacy-restore", "iptables"),
    ("iptables-nft", "iptables"),
    ("iptables-nft-save", "iptables"),
    ("iptables-nft-restore", "iptables"),
    ("ip6tables", "iptables"),
    ("ip6tables-save", "iptables"),
    ("ip6tables-restore", "iptables"),
    ("ip6tables-legacy", "iptables"),
    ("ip6tables-legacy-save", "iptables"),
    ("ip6tables-legacy-restore", "iptables"),
    ("ip6tables-nft", "iptables"),
    ("ip6tables-nft-save", "iptables"),
    ("ip6tables-nft-restore", "iptables"),
    ("nft", "nftables"),
    ("bpftool", "bpftool"),
    ("haproxy", "haproxy"),
    ("iperf3", "iperf3"),
    ("sockperf", "sockperf"),
    ("podman", "podman"),
    ("runc", "runc"),
    ("busybox", "busybox-static"),
    ("python3", "python3"),
    // e2e_tls: certificates (`openssl req`) and the TLS backends (`openssl s_server`).
    ("openssl", "openssl"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("sysctl", "procps"),
    ("sleep", "coreutils"),
    ("true", "coreutils"),
    ("cat", "coreutils"),
    ("git", "git"),
    // The image build (`xtask::image`), which e2e_podman_node.rs runs.
    ("dpkg-query", "dpkg"),
];

/// Where programs are looked for when the audit directory is made (root's usual PATH).
const SYSTEM_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Make `<target>/exec-audit/bin` anew, holding a link to each program of [`PROGRAMS`]
/// and nothing else. Fails naming the program and its package when one is missing
/// (setup did not install it).
pub fn audit_dir(target: &Path) -> Result<PathBuf> {
    let dir = target.join("exec-audit/bin");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut missing = Vec::new();
    for (program, package) in PROGRAMS {
        match SYSTEM_DIRS
            .iter()
            .map(|d| Path::new(d).join(program))
            .find(|p| p.is_file())
        {
            Some(found) => symlink(&found, dir.join(program))
                .with_context(|| format!("linking {}", found.display()))?,
            None => missing.push(format!("{program} (package {package})")),
        }
    }
    if !missing.is_empty() {
        bail!(
            "programs the tests execute are not installed: {}; `cargo xtask setup` must \
             install their packages",
            missing.join(", ")
        );
    }
    Ok(dir)
}

/// `PATH` for the tests: the audit directory, then cargo's bin directory (nothing the
/// tests execute lives there, but cargo itself does).
pub fn audited_path(audit_dir: &Path, cargo_bin: &Path) -> Result<std::ffi::OsString> {
    std::env::join_paths([audit_dir, cargo_bin]).context("building the audited PATH")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packages a fresh machine of this project's kind already has (the `rust` image's list
    /// of installed packages): setup need not install them.
    const FRESH_IMAGE: &[&str] = &[
        "coreutils",
        "util-linux",
        "mount",
        "procps",
        "iproute2",
        "python3",
        "git",
        "e2fsprogs",
        "dpkg",
        "apt",
    ];

    /// A program whose package is neither installed by setup nor on a fresh machine
    /// would pass here (installed by hand) and fail on a fresh clone: never allowed.
    #[test]
    fn every_program_comes_from_setup_or_the_fresh_image() {
        for (program, package) in PROGRAMS {
            assert!(
                crate::setup::PACKAGES.contains(package) || FRESH_IMAGE.contains(package),
                "{program} comes from {package}, which setup does not install and a fresh \
                 machine lacks: add it to setup's PACKAGES"
            );
        }
    }

    /// The literal program names the sources execute (`Command::new("…")`, the first
    /// word of `run_in_netns` commands) are all in [`PROGRAMS`]; the audit PATH catches
    /// the rest at run time.
    #[test]
    fn every_program_named_in_the_sources_is_listed() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("root");
        let mut unlisted = Vec::new();
        for dir in [
            "tests",
            "interceptor/src",
            "interceptor/tests",
            "cni-plugin/src",
        ] {
            visit(&root.join(dir), &mut |path, text| {
                for name in literal_programs(text) {
                    if !PROGRAMS.iter().any(|(p, _)| *p == name) {
                        unlisted.push(format!("{}: {name}", path.display()));
                    }
                }
            });
        }
        assert!(unlisted.is_empty(), "not in PROGRAMS: {unlisted:?}");
    }

    fn visit(dir: &Path, f: &mut dyn FnMut(&Path, &str)) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                visit(&path, f);
            } else if path.extension().is_some_and(|e| e == "rs") {
                if let Ok(text) = fs::read_to_string(&path) {
                    f(&path, &text);
                }
            }
        }
    }

    fn literal_programs(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        for marker in ["Command::new(\"", "run_in_netns(&pod.netns, &[\""] {
            let mut rest = text;
            while let Some(at) = rest.find(marker) {
                rest = &rest[at + marker.len()..];
                if let Some(end) = rest.find('"') {
                    names.push(rest[..end].to_owned());
                }
            }
        }
        names
    }

    #[test]
    fn the_scan_finds_what_it_should() {
        let text = r#"let a = Command::new("nft"); Command::new("ip").arg("x");"#;
        assert_eq!(literal_programs(text), ["nft", "ip"]);
    }
}
