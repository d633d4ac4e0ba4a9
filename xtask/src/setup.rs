//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks for building and
//! testing the interceptor, and is quick when nothing is missing.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd::{self, probe, probe_any_status, run};

/// Debian packages the testbed and e2e tests use (DESIGN.md §7); `programs::PROGRAMS`
/// says which program comes from which.
pub const PACKAGES: &[&str] = &[
    "iptables",
    "nftables",
    "iproute2",
    "containernetworking-plugins",
    "haproxy",
    "iperf3",
    "sockperf",
    "bpftool",
    "runc",
    "busybox-static",
    "podman",
    // e2e_tls: certificates and TLS backends (`openssl req`, `openssl s_server`).
    "openssl",
];

const BPFFS: &str = "/sys/fs/bpf";

/// bpf-linker release known to build against the nightly's LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> Result<()> {
    // Work out the root-only items first, so a non-root run fails before spending
    // minutes on a bpf-linker build it could not finish setting up anyway.
    let missing_packages = missing_packages();
    let bpffs_mounted = bpffs_mounted()?;
    if (!missing_packages.is_empty() || !bpffs_mounted) && !is_root() {
        let mut needs: Vec<String> = missing_packages.iter().map(|p| p.to_string()).collect();
        if !bpffs_mounted {
            needs.push(format!("bpffs at {BPFFS}"));
        }
        bail!(
            "setup must run as root to install {}; re-run `cargo xtask setup` as root",
            needs.join(", ")
        );
    }

    nightly()?;
    bpf_linker()?;
    packages(&missing_packages)?;
    if bpffs_mounted {
        println!("ok bpffs at {BPFFS}");
    } else {
        println!("installing bpffs at {BPFFS}");
        fs::create_dir_all(BPFFS).with_context(|| format!("cannot create {BPFFS}"))?;
        run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    }
    Ok(())
}

/// Effective uid 0, read from /proc so xtask needs no libc binding.
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            uids.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

fn rustup() -> Command {
    Command::new("rustup")
}

/// The nightly toolchain with rust-src: aya-build compiles the eBPF crate with
/// `-Z build-std`, which needs the core sources. cargo-fuzz needs nightly too.
pub fn nightly() -> Result<()> {
    let toolchains = probe(rustup().args(["toolchain", "list"]))
        .context("cannot run `rustup toolchain list`; is rustup installed?")?;
    // Only the floating `nightly-<host>` counts: aya-build asks for plain `+nightly`,
    // which a dated `nightly-2025-…` toolchain does not satisfy.
    let has_nightly = toolchains.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or("");
        name.strip_prefix("nightly-")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    if !has_nightly {
        println!("installing nightly toolchain (with rust-src)");
        return run(rustup().args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    println!("ok nightly toolchain");

    let components =
        probe(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))
            .context("cannot list the nightly toolchain's components")?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        println!("ok rust-src (nightly)");
        Ok(())
    } else {
        println!("installing rust-src (nightly)");
        run(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))
    }
}

fn cache_dir() -> Result<PathBuf> {
    Ok(cmd::home()?.join(".cache/interceptor"))
}

/// bpf-linker, built against the nightly rustc's own libLLVM: the bitcode rustc emits
/// must be read by the same LLVM major, so a nightly that moves to a new LLVM needs a
/// rebuild. The major it was built for is recorded next to the LLVM prefix.
fn bpf_linker() -> Result<()> {
    let major = nightly_llvm_major()?;
    let cache = cache_dir()?;
    let prefix = cache.join("llvm-prefix");
    let record = cache.join("bpf-linker.llvm");
    // Always refresh the prefix (a few symlinks): the installed binary finds libLLVM
    // through its RUNPATH, which is this prefix, so a missing soname link breaks it.
    link_llvm_prefix(&prefix)?;

    let built_for = recorded_llvm_major(&record)?;
    let works = probe(Command::new("bpf-linker").arg("--version")).is_some();
    if works && built_for == Some(major) {
        println!("ok bpf-linker (LLVM {major})");
        return Ok(());
    }
    let why = match (works, built_for) {
        (false, _) => "missing or does not start".to_owned(),
        (true, Some(old)) => format!("built for LLVM {old}"),
        (true, None) => "built for an unknown LLVM".to_owned(),
    };
    println!("installing bpf-linker (LLVM {major}; {why})");
    let mut install = cmd::cargo();
    install
        // Outside the workspace so its .cargo/config.toml cannot affect the install.
        .current_dir(cmd::home()?)
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"));
    run(&mut install)?;
    fs::create_dir_all(&cache)?;
    fs::write(&record, format!("{major}\n"))
        .with_context(|| format!("cannot write {}", record.display()))?;
    if probe(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker was installed but `bpf-linker --version` still fails");
    }
    Ok(())
}

/// The LLVM major of the nightly rustc, from `LLVM version: 22.1.4` in `rustc -vV`.
fn nightly_llvm_major() -> Result<u32> {
    // `rustup run` rather than `rustc +nightly`: the `rustc` on PATH may be the
    // toolchain binary itself, which does not understand `+toolchain`.
    let version = probe(rustup().args(["run", "nightly", "rustc", "-vV"]))
        .context("cannot run `rustc -vV` of the nightly toolchain")?;
    version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next()?.parse().ok())
        .context("no `LLVM version:` line in nightly `rustc -vV`")
}

/// Makes `<prefix>/lib/libLLVM.so` point at the nightly's libLLVM, as bpf-linker's
/// build expects, plus a link under the library's own name (its soname), which the
/// built binary looks up at run time.
fn link_llvm_prefix(prefix: &Path) -> Result<()> {
    let sysroot = probe(rustup().args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .context("cannot find the nightly sysroot")?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let names: Vec<String> = fs::read_dir(&lib)
        .with_context(|| format!("cannot read {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    // Prefer `libLLVM.so.<ver>-rust-*`: `libLLVM-<major>-rust-*.so` is only a linker
    // script on current nightlies, and a symlink to it would not load.
    let llvm = names
        .iter()
        .find(|n| n.starts_with("libLLVM.so."))
        .or_else(|| {
            names
                .iter()
                .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let target = lib.join(llvm);
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    ensure_symlink(&prefix_lib.join("libLLVM.so"), &target)?;
    ensure_symlink(&prefix_lib.join(llvm), &target)
}

fn ensure_symlink(link: &Path, target: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    match fs::remove_file(link) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot replace {}", link.display()))
        }
        _ => {}
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}

/// The LLVM major bpf-linker was built for. Without our record (installed by hand,
/// or by an older setup), fall back to the features cargo recorded for the install,
/// so a working bpf-linker is not rebuilt needlessly.
fn recorded_llvm_major(record: &Path) -> Result<Option<u32>> {
    if let Ok(text) = fs::read_to_string(record) {
        return Ok(text.trim().parse().ok());
    }
    let crates2 = cmd::cargo_home()?.join(".crates2.json");
    let Ok(json) = fs::read_to_string(crates2) else {
        return Ok(None);
    };
    let major = json.find("\"bpf-linker ").and_then(|start| {
        let entry = &json[start..];
        let features = &entry[entry.find("\"features\":[")?..];
        let features = &features[..features.find(']')?];
        let digits = &features[features.find("\"llvm-")? + "\"llvm-".len()..];
        let end = digits.find(|c: char| !c.is_ascii_digit())?;
        digits[..end].parse::<u32>().ok()
    });
    if let Some(major) = major {
        // Adopt it so later runs read the record directly.
        fs::create_dir_all(record.parent().unwrap_or(Path::new(".")))?;
        fs::write(record, format!("{major}\n"))?;
    }
    Ok(major)
}

/// Packages from [`PACKAGES`] that dpkg does not report as installed.
fn missing_packages() -> Vec<&'static str> {
    missing_from(PACKAGES)
}

/// Packages of `list` that dpkg does not report as installed.
pub fn missing_from(list: &[&'static str]) -> Vec<&'static str> {
    let out = probe_any_status(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package} ${Status}\n"])
            .args(list),
    )
    .unwrap_or_default();
    // Status is e.g. `install ok installed`; removed-but-configured is `… config-files`.
    let installed: HashSet<&str> = out
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            (words.last()? == "installed").then_some(name)
        })
        .collect();
    list.iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect()
}

fn packages(missing: &[&str]) -> Result<()> {
    for package in PACKAGES {
        let state = if missing.contains(package) {
            "installing"
        } else {
            "ok"
        };
        println!("{state} {package}");
    }
    apt_install(missing)
}

/// `apt-get install` of `missing` (nothing when empty).
pub fn apt_install(missing: &[&str]) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    // `apt-get update` is slow and needs the network: only when there are no package
    // lists at all, or when an install from the existing lists fails.
    if !apt_lists_present() {
        run(apt_get().arg("update"))?;
    }
    let install = || {
        let mut cmd = apt_get();
        cmd.args(["install", "-y", "--no-install-recommends"])
            .args(missing);
        cmd
    };
    if run(&mut install()).is_err() {
        run(apt_get().arg("update"))?;
        run(&mut install())?;
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn apt_lists_present() -> bool {
    fs::read_dir("/var/lib/apt/lists").is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
    })
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    Ok(mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    }))
}
