//! `cargo xtask vm-test`: runs the privileged end-to-end suites inside Debian's cloud
//! kernels (bullseye 5.10, bookworm 6.1, trixie 6.12) under qemu (TCG), and on the host,
//! and prints a matrix of kernel × auto mode (and why) × kernel features × test results.
//!
//! Each VM boots the Debian kernel with a tiny initramfs (busybox and the virtio modules,
//! which the cloud kernels build as modules) that mounts an ext4 disk image made from a
//! directory (`mke2fs -d`, no mounting on the host). The image holds the host's programs
//! that the tests execute (`programs::PROGRAMS`) with their shared-library closure, the
//! workspace binaries and test executables at their host paths (the tests find `tb-pod`
//! through a compile-time absolute path), and the kernel's own modules. The VM has no
//! network device; its console is the only channel out: the init script prints
//! `@@vm-test` markers around the probe and each suite, and the libtest output between
//! them is parsed here. The host column runs the same suite executables natively.
//!
//! Cost (measured under TCG on this 2-core machine, build up to date): the kernels (21–35
//! MB each) are fetched once into `~/.cache/interceptor/vm/`; a VM's image takes 3–8 s
//! to make and the kernel boots in about 2 s. The default suites (`DEFAULT_SUITES`) take
//! 90–120 s per kernel when the machine is otherwise idle (outbound ~33 s, inbound ~34 s,
//! exclusions ~32 s, iptables ~8 s, kernel_fallbacks ~8 s; about half again more with
//! another build running), so `--kernel 5.10 --no-host` takes about 2.5–4 minutes and
//! `--kernel all` about 8–16 (the host column adds under a minute). Every suite
//! (`--suites all`) takes about 10 minutes per kernel, e2e_upstream (~200 s) and
//! e2e_routing (~90 s) the longest: 37 minutes for `--kernel all`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::cmd::{self, probe, probe_any_status, run};

/// The suites run when `--suites` is not given: outbound, inbound and exclusions in both
/// modes, the iptables-specific suite, and the eBPF-with-fallbacks suite made for these
/// kernels.
const DEFAULT_SUITES: &[&str] = &[
    "e2e_outbound",
    "e2e_inbound",
    "e2e_exclusions",
    "e2e_iptables",
    "e2e_kernel_fallbacks",
];

/// Debian packages this task needs on the host, beyond what `setup` installs: qemu, the
/// image tools, kmod (the VM's modprobe is the host's), xz (6.12 compresses modules),
/// the keyring apt verifies the kernel suites with, and the programs copied into the VM.
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "e2fsprogs",
    "kmod",
    "xz-utils",
    "zstd",
    "debian-archive-keyring",
    "busybox-static",
    "iproute2",
    "iptables",
    "nftables",
    "containernetworking-plugins",
    "python3",
    "util-linux",
    "procps",
];

/// Modules loaded in the VM before the tests, when the kernel builds them as modules:
/// veth and bridge for the testbed, clsact and cls_bpf for the tc programs (netlink
/// fallback below 6.6), and what iptables (legacy and nft) needs for the nat REDIRECT
/// rules and the node's probe SNAT (xt_nat, xt_owner). A name the kernel does not have is
/// reported, not fatal.
const VM_MODULES: &[&str] = &[
    "veth",
    "bridge",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_nat",
    "nft_redir",
    "nft_ct",
    "x_tables",
    "ip_tables",
    "ip6_tables",
    "iptable_nat",
    "iptable_filter",
    "iptable_mangle",
    "ip6table_nat",
    "ip6table_filter",
    "nf_nat",
    "nf_conntrack",
    "xt_REDIRECT",
    "xt_nat",
    "xt_owner",
    "xt_mark",
    "xt_conntrack",
    "xt_comment",
    "xt_multiport",
    "xt_addrtype",
    "xt_tcpudp",
    "overlay",
];

/// Modules the initramfs loads so the kernel can see its root disk (with their
/// dependencies; those built in are skipped).
const DISK_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];

/// Parts of the Python standard library the tests' helper scripts never import; left
/// out to keep the image small.
const PYTHON_EXCLUDES: &[&str] = &[
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "dist-packages",
    "site-packages",
    "pydoc_data",
];

/// Programs of `programs::PROGRAMS` not copied into the VM: none of the suites run
/// them under the kernels (git is only for the bench's facts).
const NOT_IN_VM: &[&str] = &["git"];

/// Tools the VM's init uses itself (the host's versions, at their host paths).
const VM_TOOLS: &[&str] = &["modprobe", "dmesg", "ldconfig", "sh"];

/// Host files and directories podman needs beyond its binary (e2e_podman): its
/// container monitor and the containers configuration. Copied when present.
const PODMAN_FILES: &[&str] = &[
    "/usr/bin/conmon",
    "/etc/containers",
    "/usr/share/containers",
];

/// Marks the harness's own lines in the console (and host) log.
const MARKER: &str = "@@vm-test";

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelChoice {
    #[value(name = "5.10")]
    V5_10,
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
    /// No VM: only the host column.
    None,
}

#[derive(Args, Debug)]
pub struct Options {
    /// Debian kernel(s) to boot: 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie), all,
    /// or none (the host column only).
    #[arg(long, value_enum, default_value = "all")]
    kernel: KernelChoice,
    /// Comma-separated test targets of tests/tests to run (default: e2e_outbound,
    /// e2e_inbound, e2e_exclusions, e2e_iptables, e2e_kernel_fallbacks); `all` for every
    /// test target of tests/tests.
    #[arg(long, value_delimiter = ',')]
    suites: Vec<String>,
    /// Filter passed to libtest (runs only the tests whose name contains it).
    #[arg(long)]
    filter: Option<String>,
    /// Do not run the suites on the host kernel (the fourth column).
    #[arg(long)]
    no_host: bool,
    /// Skip setup and the build: use what target/release holds.
    #[arg(long)]
    no_build: bool,
    /// Minutes one suite may run (in a VM or on the host) before it is killed.
    #[arg(long, default_value_t = 30)]
    suite_timeout_minutes: u64,
    /// Shell command run in each VM before the suites (for diagnosis: its output goes
    /// to the console log), e.g. `--vm-command 'bpftool -j cgroup show /sys/fs/cgroup; echo rc=$?'`.
    #[arg(long)]
    vm_command: Option<String>,
    /// Memory of each VM in MiB.
    #[arg(long, default_value_t = 4096)]
    memory_mib: u32,
}

/// A Debian kernel the matrix covers.
struct DebianKernel {
    label: &'static str,
    suite: &'static str,
}

const KERNELS: &[DebianKernel] = &[
    DebianKernel {
        label: "5.10",
        suite: "bullseye",
    },
    DebianKernel {
        label: "6.1",
        suite: "bookworm",
    },
    DebianKernel {
        label: "6.12",
        suite: "trixie",
    },
];

pub fn run_vm_test(options: Options) -> Result<()> {
    let started = Instant::now();
    let suites: Vec<String> = if options.suites.is_empty() {
        DEFAULT_SUITES.iter().map(|s| s.to_string()).collect()
    } else {
        options.suites.clone()
    };
    let kernels: Vec<&DebianKernel> = KERNELS
        .iter()
        .filter(|k| match options.kernel {
            KernelChoice::All => true,
            KernelChoice::None => false,
            KernelChoice::V5_10 => k.label == "5.10",
            KernelChoice::V6_1 => k.label == "6.1",
            KernelChoice::V6_12 => k.label == "6.12",
        })
        .collect();

    if !options.no_build {
        crate::setup::setup()?;
    }
    install_packages(HOST_PACKAGES)?;
    if !options.no_build {
        crate::build()?;
    }
    let executables = test_executables()?;
    let suites: Vec<String> = if suites == ["all"] {
        executables.keys().cloned().collect()
    } else {
        suites
    };
    let unknown: Vec<&String> = suites
        .iter()
        .filter(|s| !executables.contains_key(*s))
        .collect();
    if !unknown.is_empty() {
        let known: Vec<&String> = executables.keys().collect();
        bail!("no test target named {unknown:?}; the test targets are {known:?}");
    }
    let out_dir = crate::target_dir().join("vm-test");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let suite_timeout = Duration::from_secs(options.suite_timeout_minutes * 60);
    let plan = Plan {
        suites: suites.clone(),
        executables,
        filter: options.filter.clone(),
        suite_timeout,
        bin_dir: crate::target_dir().join("release"),
        snapshot: out_dir.join("work/snapshot"),
        vm_command: options.vm_command.clone(),
    };
    plan.take_snapshot()?;

    // Fetch every kernel first: a registry problem shows before an hour of VM time.
    let mut fetched = Vec::new();
    for kernel in &kernels {
        fetched.push((kernel, fetch_kernel(kernel)?));
    }

    let mut columns = Vec::new();
    if !options.no_host {
        columns.push(run_on_host(&plan, &out_dir)?);
    }
    for (kernel, files) in &fetched {
        let column = run_in_vm(kernel, files, &plan, &out_dir, options.memory_mib)
            .unwrap_or_else(|e| Column::broken(kernel.label, format!("{e:#}")));
        print_column_failures(&column);
        columns.push(column);
    }
    // Kernels as columns, oldest first, the host last.
    columns.sort_by_key(|c| c.is_host);

    let matrix = render_matrix(&columns, &plan, started.elapsed());
    let matrix_path = out_dir.join("matrix.md");
    fs::write(&matrix_path, &matrix)
        .with_context(|| format!("writing {}", matrix_path.display()))?;
    println!("\n{matrix}");
    println!("(written to {})", matrix_path.display());
    let failing: Vec<&str> = columns
        .iter()
        .filter(|c| !c.all_passed())
        .map(|c| c.label.as_str())
        .collect();
    if !failing.is_empty() {
        bail!("vm-test: failures on {}", failing.join(", "));
    }
    Ok(())
}

/// What to run in every column.
struct Plan {
    suites: Vec<String>,
    /// Test target name → its executable.
    executables: BTreeMap<String, PathBuf>,
    filter: Option<String>,
    suite_timeout: Duration,
    bin_dir: PathBuf,
    /// Copies of our binaries and the test executables taken after the build, under
    /// their host paths: every VM runs the same build even when target/release changes
    /// meanwhile (others build in this tree during an hour-long run).
    snapshot: PathBuf,
    vm_command: Option<String>,
}

impl Plan {
    /// Our binaries (those built) and the executables of the planned suites.
    fn workspace_files(&self) -> Vec<PathBuf> {
        ["interceptor", "interceptor-cni", "tb-pod"]
            .iter()
            .map(|name| self.bin_dir.join(name))
            .filter(|path| path.is_file())
            .chain(self.suites.iter().map(|s| self.executables[s].clone()))
            .collect()
    }

    fn take_snapshot(&self) -> Result<()> {
        if self.snapshot.exists() {
            fs::remove_dir_all(&self.snapshot)?;
        }
        for path in self.workspace_files() {
            let copy = self.snapshot_of(&path);
            fs::create_dir_all(copy.parent().unwrap_or(&self.snapshot))?;
            fs::copy(&path, &copy).with_context(|| format!("copying {}", path.display()))?;
        }
        Ok(())
    }

    fn snapshot_of(&self, path: &Path) -> PathBuf {
        self.snapshot.join(path.strip_prefix("/").unwrap_or(path))
    }

    fn libtest_args(&self) -> Vec<String> {
        // One test at a time: under TCG parallel tests mostly fight over two slow CPUs
        // and run into each other's timeouts.
        let mut args = vec!["--test-threads=1".to_owned()];
        args.extend(self.filter.clone());
        args
    }
}

// ---------------------------------------------------------------------------------
// Host packages and the build
// ---------------------------------------------------------------------------------

/// Installs whichever of `packages` dpkg does not report installed (setup's helpers,
/// with this task's own list).
fn install_packages(packages: &[&'static str]) -> Result<()> {
    let missing = crate::setup::missing_from(packages);
    if missing.is_empty() {
        println!("ok vm-test packages ({})", packages.join(", "));
        return Ok(());
    }
    println!("installing {}", missing.join(", "));
    crate::setup::apt_install(&missing)
}

/// Builds the test executables and returns the integration-test targets of
/// tests/tests by name (`e2e_outbound` → `target/release/deps/e2e_outbound-<hash>`).
fn test_executables() -> Result<BTreeMap<String, PathBuf>> {
    let mut cargo = cmd::cargo();
    cargo.args([
        "test",
        "--release",
        "--workspace",
        "--no-run",
        "--message-format=json",
    ]);
    println!("+ cargo test --release --workspace --no-run --message-format=json");
    let output = cargo
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        bail!("cargo test --no-run failed ({})", output.status);
    }
    let tests_dir = cmd::workspace_root().join("tests/tests");
    let mut executables = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(name), Some(executable), Some(src)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
            message["target"]["src_path"].as_str(),
        ) else {
            continue;
        };
        let is_test = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        if is_test && Path::new(src).starts_with(&tests_dir) {
            executables.insert(name.to_owned(), PathBuf::from(executable));
        }
    }
    Ok(executables)
}

// ---------------------------------------------------------------------------------
// Kernels from the Debian registry
// ---------------------------------------------------------------------------------

fn vm_cache_dir() -> Result<PathBuf> {
    Ok(cmd::home()?.join(".cache/interceptor/vm"))
}

/// A kernel package fetched and unpacked in the cache.
struct KernelFiles {
    /// `uname -r` of the kernel, e.g. `5.10.0-32-cloud-amd64`.
    release: String,
    vmlinuz: PathBuf,
    /// `…/lib/modules/<release>` (or `…/usr/lib/modules/<release>` from trixie on).
    modules: PathBuf,
}

/// apt with a private sources list, list and cache directories for one Debian suite,
/// so the host's apt configuration and state stay untouched.
fn private_apt(program: &str, state: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg("-q")
        .arg(format!(
            "-oDir::Etc::SourceList={}",
            state.join("sources.list").display()
        ))
        .arg(format!(
            "-oDir::Etc::SourceParts={}",
            state.join("parts").display()
        ))
        .arg(format!(
            "-oDir::State::Lists={}",
            state.join("lists").display()
        ))
        .arg(format!("-oDir::Cache={}", state.join("cache").display()))
        // The private directories are root's; apt's unprivileged `_apt` user cannot
        // write them (apt would warn and fall back to root anyway).
        .arg("-oAPT::Sandbox::User=root");
    cmd
}

/// Fetches Debian's current `linux-image-<ver>-cloud-amd64` of the kernel's suite with
/// apt (which verifies the suite's Release signature with debian-archive-keyring and
/// the package's hash against it), and unpacks it; both are cached.
fn fetch_kernel(kernel: &DebianKernel) -> Result<KernelFiles> {
    let cache = vm_cache_dir()?;
    let state = cache.join("apt").join(kernel.suite);
    for dir in ["lists/partial", "cache/archives/partial", "parts"] {
        fs::create_dir_all(state.join(dir))?;
    }
    fs::write(
        state.join("sources.list"),
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian {} main\n",
            kernel.suite
        ),
    )?;
    // apt may keep the index compressed (`…_Packages.lz4`).
    let has_lists = fs::read_dir(state.join("lists"))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("_Packages"));
    if !has_lists {
        run(private_apt("apt-get", &state).arg("update"))?;
    }
    let package = match cloud_image_package(&state) {
        Some(package) => package,
        None => {
            // Lists from an older run may name a package the mirror dropped: refresh.
            run(private_apt("apt-get", &state).arg("update"))?;
            cloud_image_package(&state).with_context(|| {
                format!(
                    "linux-image-cloud-amd64 of {} has no dependency on a linux-image package",
                    kernel.suite
                )
            })?
        }
    };
    let release = package
        .strip_prefix("linux-image-")
        .context("unexpected kernel package name")?
        .to_owned();
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = match cached_deb(&debs, &package, &state)? {
        Some(deb) => {
            println!("ok {package} (cached, hash verified)");
            deb
        }
        None => {
            println!("fetching {package} ({})", kernel.suite);
            run(private_apt("apt-get", &state)
                .current_dir(&debs)
                .args(["download", &package]))?;
            cached_deb(&debs, &package, &state)?
                .with_context(|| format!("apt-get download left no verified {package} deb"))?
        }
    };

    let unpacked = cache.join("kernels").join(&release);
    let done = unpacked.join(".unpacked");
    if !done.exists() {
        if unpacked.exists() {
            fs::remove_dir_all(&unpacked)?;
        }
        fs::create_dir_all(&unpacked)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
        fs::write(&done, "")?;
    }
    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| unpacked.join(dir).join(&release))
        .find(|p| p.is_dir())
        .with_context(|| format!("no modules directory in {}", unpacked.display()))?;
    if !vmlinuz.is_file() {
        bail!("{} is missing from {package}", vmlinuz.display());
    }
    Ok(KernelFiles {
        release,
        vmlinuz,
        modules,
    })
}

/// The concrete image package the suite's `linux-image-cloud-amd64` depends on.
fn cloud_image_package(state: &Path) -> Option<String> {
    let depends =
        probe(private_apt("apt-cache", state).args(["depends", "linux-image-cloud-amd64"]))?;
    depends.lines().find_map(|line| {
        let name = line.trim().strip_prefix("Depends:")?.trim();
        name.starts_with("linux-image-").then(|| name.to_owned())
    })
}

/// The cached deb of `package`, if its SHA256 matches the (signed) package index; a
/// mismatching file is deleted so it is fetched again.
fn cached_deb(debs: &Path, package: &str, state: &Path) -> Result<Option<PathBuf>> {
    let show = probe(private_apt("apt-cache", state).args(["show", "--no-all-versions", package]))
        .with_context(|| format!("apt-cache show {package}"))?;
    let field = |name: &str| {
        show.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    let (Some(filename), Some(sha256)) = (field("Filename:"), field("SHA256:")) else {
        bail!("apt-cache show {package} has no Filename or SHA256");
    };
    let name = filename.rsplit('/').next().unwrap_or(&filename).to_owned();
    // apt-get download escapes the epoch colon as %3a in the file name.
    let path = debs.join(name.replace(':', "%3a"));
    if !path.is_file() {
        return Ok(None);
    }
    let sum = probe(Command::new("sha256sum").arg(&path)).unwrap_or_default();
    if sum.split_whitespace().next() == Some(sha256.as_str()) {
        Ok(Some(path))
    } else {
        println!(
            "{} does not match its index hash; fetching it again",
            path.display()
        );
        fs::remove_file(&path)?;
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------
// The root filesystem image and the initramfs
// ---------------------------------------------------------------------------------

/// Copies host files into a staging directory at their own (canonical) paths, with the
/// symlinks leading to them and, for ELF files, their shared-library closure.
struct Staging {
    root: PathBuf,
}

impl Staging {
    fn new(root: PathBuf) -> Result<Staging> {
        if root.exists() {
            fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        }
        fs::create_dir_all(&root)?;
        // Debian's merged /usr: keep /bin, /sbin, /lib, /lib64 as the host has them, so
        // interpreter paths (/lib64/ld-linux-x86-64.so.2) and `#!/bin/sh` resolve.
        for top in ["bin", "sbin", "lib", "lib64"] {
            let host = Path::new("/").join(top);
            match fs::read_link(&host) {
                Ok(target) => symlink(target, root.join(top))?,
                Err(_) => fs::create_dir_all(root.join(top))?,
            }
        }
        Ok(Staging { root })
    }

    fn dest(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Copies `path` (following and recreating any symlink chain), and for an ELF file
    /// its libraries. Returns quietly when it was copied already.
    fn copy(&self, path: &Path) -> Result<()> {
        // Canonical parent: /bin/x and /usr/bin/x are one file on a merged-/usr host.
        let parent = path.parent().unwrap_or(Path::new("/"));
        let parent =
            fs::canonicalize(parent).with_context(|| format!("resolving {}", parent.display()))?;
        let name = path.file_name().context("path without a file name")?;
        let path = parent.join(name);
        let dest = self.dest(&path);
        if fs::symlink_metadata(&dest).is_ok() {
            return Ok(());
        }
        fs::create_dir_all(dest.parent().unwrap_or(&self.root))?;
        let meta =
            fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path)?;
            symlink(&target, &dest)?;
            return self.copy(&parent.join(target));
        }
        if meta.is_dir() {
            return self.copy_tree(&path, &[], true);
        }
        fs::copy(&path, &dest)
            .with_context(|| format!("copying {} into the image", path.display()))?;
        if is_elf(&path) {
            for library in shared_libraries(&path) {
                self.copy(&library)?;
            }
        }
        Ok(())
    }

    /// Copies the regular file `source` to `path` in the image, with its libraries.
    fn copy_file_as(&self, source: &Path, path: &Path) -> Result<()> {
        let dest = self.dest(path);
        fs::create_dir_all(dest.parent().unwrap_or(&self.root))?;
        fs::copy(source, &dest).with_context(|| format!("copying {}", source.display()))?;
        for library in shared_libraries(source) {
            self.copy(&library)?;
        }
        Ok(())
    }

    /// Copies a directory tree, leaving out the top-level entries named in `excludes`;
    /// `with_libraries` follows ELF files' libraries (not wanted for kernel modules).
    fn copy_tree(&self, dir: &Path, excludes: &[&str], with_libraries: bool) -> Result<()> {
        let dest = self.dest(dir);
        fs::create_dir_all(&dest)?;
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name();
            if excludes.iter().any(|e| name == *e) {
                continue;
            }
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                self.copy_tree(&path, &[], with_libraries)?;
            } else if with_libraries {
                self.copy(&path)?;
            } else if kind.is_symlink() {
                symlink(fs::read_link(&path)?, dest.join(&name))?;
            } else {
                fs::copy(&path, dest.join(&name))?;
            }
        }
        Ok(())
    }

    fn write(&self, path: &str, contents: &str, mode: u32) -> Result<()> {
        let dest = self.dest(Path::new(path));
        fs::create_dir_all(dest.parent().unwrap_or(&self.root))?;
        fs::write(&dest, contents)?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        Ok(())
    }
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// The libraries `ldd` resolves for an ELF file, the dynamic loader included (none for
/// a static binary).
fn shared_libraries(path: &Path) -> Vec<PathBuf> {
    let Some(out) = probe_any_status(Command::new("ldd").arg(path)) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|line| {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x…)`.
            let resolved = line.split("=>").last()?.split_whitespace().next()?;
            resolved.starts_with('/').then(|| PathBuf::from(resolved))
        })
        .collect()
}

/// The host's program named `name` in the system directories (not whatever a user PATH
/// holds first, e.g. a pyenv shim).
fn host_program(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Everything except the kernel's modules and the init script: the same for every
/// kernel, so it is built once per run.
fn stage_common(staging: &Staging, plan: &Plan) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let root = &staging.root;
    for dir in [
        "proc", "sys", "dev", "run", "tmp", "root", "etc", "var/lib", "var/tmp", "newroot",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    symlink("../run", root.join("var/run"))?;
    staging.write("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644)?;
    staging.write("/etc/group", "root:x:0:\n", 0o644)?;
    staging.write("/etc/hostname", "vm\n", 0o644)?;
    staging.write("/etc/hosts", "127.0.0.1 localhost\n", 0o644)?;
    staging.write(
        "/etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files\nprotocols: files\nservices: files\n",
        0o644,
    )?;
    staging.write(
        "/etc/ld.so.conf",
        "/usr/local/lib\n/usr/lib/x86_64-linux-gnu\n",
        0o644,
    )?;
    for file in ["/etc/protocols", "/etc/services", "/etc/ethertypes"] {
        if Path::new(file).exists() {
            staging.copy(Path::new(file))?;
        }
    }
    if Path::new("/etc/iproute2").is_dir() {
        staging.copy_tree(Path::new("/etc/iproute2"), &[], false)?;
    }

    let programs = crate::programs::PROGRAMS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !NOT_IN_VM.contains(name))
        .chain(VM_TOOLS.iter().copied());
    for name in programs {
        match host_program(name) {
            Some(path) => staging.copy(&path)?,
            None => notes.push(format!(
                "{name} is not installed on the host: not in the VM"
            )),
        }
    }
    for path in PODMAN_FILES.iter().map(Path::new).filter(|p| p.exists()) {
        staging.copy(path)?;
    }
    // Loaded with dlopen, so ldd does not see them: iptables' match and target
    // extensions, and the CNI plugins (run by absolute path).
    for dir in ["/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/cni"] {
        if Path::new(dir).is_dir() {
            staging.copy_tree(Path::new(dir), &[], true)?;
        }
    }
    // Python's standard library: the tests run small `python3 -c` helpers.
    if let Some(python) = host_program("python3") {
        let real = fs::canonicalize(&python)?;
        let version = real
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let stdlib = Path::new("/usr/lib").join(&version);
        if stdlib.is_dir() {
            staging.copy_tree(&stdlib, PYTHON_EXCLUDES, true)?;
        }
    }
    // Busybox for the init scripts, outside the tests' PATH (which holds only what the
    // exec audit allows).
    let busybox = host_program("busybox").context("busybox is not installed")?;
    let vm_bin = root.join("opt/vm/bin");
    fs::create_dir_all(&vm_bin)?;
    fs::copy(&busybox, vm_bin.join("busybox"))?;
    let applets = probe(Command::new(&busybox).arg("--list")).unwrap_or_default();
    for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        symlink("busybox", vm_bin.join(applet))?;
    }

    // Our binaries and the test executables, at their host paths: the tests find
    // tb-pod through its compile-time path.
    for name in ["interceptor", "interceptor-cni", "tb-pod"] {
        if !plan.bin_dir.join(name).is_file() {
            notes.push(format!(
                "{} was not built",
                plan.bin_dir.join(name).display()
            ));
        }
    }
    for path in plan.workspace_files() {
        staging.copy_file_as(&plan.snapshot_of(&path), &path)?;
    }
    Ok(notes)
}

/// The init the kernel runs after the initramfs hands over: mounts what the tests need,
/// loads the modules, runs the probe and every suite between markers, and powers off.
fn vm_init_script(plan: &Plan) -> String {
    let bin_dir = plan.bin_dir.display();
    let mut script = format!(
        r#"#!/opt/vm/bin/sh
B=/opt/vm/bin
export PATH=/usr/sbin:/usr/bin HOME=/root CI=true RUST_BACKTRACE=1 TERM=dumb
export INTERCEPTOR_BIN_DIR={bin_dir}
$B/mount -t proc proc /proc
$B/mount -t sysfs sysfs /sys
$B/mount -t devtmpfs devtmpfs /dev
$B/mkdir -p /dev/pts /dev/shm
$B/mount -t devpts devpts /dev/pts
$B/mount -t tmpfs tmpfs /dev/shm
$B/mount -t tmpfs tmpfs /run
$B/mkdir -p /run/netns /run/lock
$B/mount -t tmpfs tmpfs /tmp
$B/mount -t cgroup2 cgroup2 /sys/fs/cgroup
$B/mount -t bpf bpf /sys/fs/bpf
$B/mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
$B/mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
# Kernel messages would land in the middle of libtest's lines: keep them for the dmesg
# dump at the end.
echo "1 4 1 7" > /proc/sys/kernel/printk
$B/hostname vm
/usr/sbin/ldconfig 2>/dev/null
/usr/sbin/ip link set lo up
for m in {modules}; do
  /usr/sbin/modprobe $m 2>/dev/null || echo "{MARKER} no-module $m"
done
echo "{MARKER} kernel $($B/uname -r)"
echo "{MARKER} probe-begin"
{bin_dir}/interceptor probe --json 2>&1
echo "{MARKER} probe-end rc=$?"
"#,
        modules = VM_MODULES.join(" "),
    );
    if let Some(command) = &plan.vm_command {
        let _ = write!(
            script,
            "echo \"{MARKER} vm-command-begin\"\n(cd /root && {command}) 2>&1\necho \"{MARKER} vm-command-end rc=$?\"\n"
        );
    }
    let timeout = plan.suite_timeout.as_secs();
    let args = plan
        .libtest_args()
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    for suite in &plan.suites {
        let exe = plan.executables[suite].display();
        let _ = write!(
            script,
            r#"echo "{MARKER} suite-begin {suite}"
start=$($B/date +%s)
cd /root && $B/timeout -s KILL {timeout} {exe} {args} 2>&1
rc=$?
echo "{MARKER} suite-end {suite} rc=$rc secs=$(( $($B/date +%s) - start ))"
"#
        );
    }
    let _ = write!(
        script,
        r#"echo "{MARKER} dmesg-begin"
/usr/bin/dmesg --level=emerg,alert,crit,err,warn 2>/dev/null | $B/tail -n 200
echo "{MARKER} dmesg-end"
echo "{MARKER} done"
$B/sync
$B/poweroff -f
"#
    );
    script
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The first-stage init: loads the disk drivers, mounts the image and switches to it.
fn initramfs_init(modules: &[String]) -> String {
    let mut script = String::from(
        "#!/bin/busybox sh\n\
         B=/bin/busybox\n\
         $B mount -t proc proc /proc\n\
         $B mount -t devtmpfs devtmpfs /dev\n",
    );
    for module in modules {
        let _ = writeln!(
            script,
            "$B insmod /modules/{module} || echo \"{MARKER} insmod-failed {module}\""
        );
    }
    let _ = write!(
        script,
        r#"i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do $B sleep 0.1; i=$((i+1)); done
if ! $B mount -t ext4 /dev/vda /newroot; then
  echo "{MARKER} no-root-disk"
  $B poweroff -f
fi
$B umount /dev
$B umount /proc
exec $B switch_root /newroot /opt/vm/init
"#
    );
    script
}

/// Modules to insmod (in load order) for `wanted`: their dependency closure from
/// modules.dep, the ones built in left out.
fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let dep_file = modules_dir.join("modules.dep");
    let text =
        fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let requires = rest.split_whitespace().map(str::to_owned).collect();
        deps.insert(module_name(module), (module.to_owned(), requires));
    }
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        if let Some((path, requires)) = deps.get(name) {
            for required in requires {
                visit(&module_name(required), deps, seen, order);
            }
            order.push(path.clone());
        }
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        if !deps.contains_key(*name) {
            if builtin.lines().any(|l| module_name(l) == *name) {
                continue;
            }
            bail!("the kernel has {name} neither as a module nor built in");
        }
        visit(name, &deps, &mut seen, &mut order);
    }
    Ok(order.into_iter().map(|p| modules_dir.join(p)).collect())
}

/// `kernel/drivers/block/virtio_blk.ko.xz` → `virtio_blk` (dashes as underscores, as
/// the kernel names modules).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A module's bytes, decompressed: busybox's insmod takes plain ELF only.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {name}")),
        Some(tool) => {
            let out = Command::new(tool)
                .args(["-dc"])
                .arg(path)
                .output()
                .with_context(|| format!("running {tool} -dc {name}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {name} failed ({})", out.status);
            }
            Ok(out.stdout)
        }
    }
}

/// A cpio archive in the "newc" format the kernel unpacks as its initramfs.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.next_inode += 1;
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // checksum
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data, (0, 0));
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.bytes
    }
}

/// Adds the kernel's modules to the staging directory (replacing another kernel's),
/// writes the init, and makes the disk image and the initramfs.
fn build_vm_files(
    staging: &Staging,
    kernel: &KernelFiles,
    plan: &Plan,
    work: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let modules_root = staging.root.join("usr/lib/modules");
    if modules_root.exists() {
        fs::remove_dir_all(&modules_root)?;
    }
    let modules_dir = modules_root.join(&kernel.release);
    fs::create_dir_all(&modules_dir)?;
    copy_plain_tree(&kernel.modules, &modules_dir)?;
    // The deb ships no modules.dep (its postinst makes it).
    run(Command::new("depmod")
        .arg("-b")
        .arg(&staging.root)
        .arg(&kernel.release))?;
    staging.write("/opt/vm/init", &vm_init_script(plan), 0o755)?;

    fs::create_dir_all(work)?;
    let image = work.join("root.img");
    let used_mib = tree_size(&staging.root)? / (1024 * 1024);
    // Room for what the tests write to disk (CNI IPAM state, logs outside tmpfs).
    let size_mib = used_mib + used_mib / 4 + 512;
    let _ = fs::remove_file(&image);
    run(Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "vmroot",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(&staging.root)
        .arg(&image)
        .arg(format!("{size_mib}M")))?;

    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's output before anything is mounted.
    cpio.entry("dev/console", 0o020600, &[], (5, 1));
    let busybox = host_program("busybox").context("busybox is not installed")?;
    cpio.file("bin/busybox", 0o755, &fs::read(&busybox)?);
    let mut names = Vec::new();
    for (index, module) in module_load_order(&modules_dir, DISK_MODULES)?
        .iter()
        .enumerate()
    {
        let name = format!("{index:02}-{}.ko", module_name(&module.to_string_lossy()));
        cpio.file(&format!("modules/{name}"), 0o644, &module_bytes(module)?);
        names.push(name);
    }
    cpio.file("init", 0o755, initramfs_init(&names).as_bytes());
    let initramfs = work.join("initramfs.cpio");
    fs::write(&initramfs, cpio.finish())?;
    Ok((image, initramfs))
}

fn copy_plain_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            copy_plain_tree(&entry.path(), &dest)?;
        } else if kind.is_symlink() {
            symlink(fs::read_link(entry.path())?, &dest)?;
        } else {
            fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

fn tree_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += tree_size(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------
// Running: qemu and the host
// ---------------------------------------------------------------------------------

/// qemu, killed (by its pid) and reaped when this goes out of scope, on every path.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn run_in_vm(
    kernel: &DebianKernel,
    files: &KernelFiles,
    plan: &Plan,
    out_dir: &Path,
    memory_mib: u32,
) -> Result<Column> {
    println!(
        "\n== {} ({}): building the image",
        kernel.label, files.release
    );
    let started = Instant::now();
    let work = out_dir.join("work").join(kernel.label);
    let staging = Staging::new(out_dir.join("work/rootfs"))?;
    let notes = stage_common(&staging, plan)?;
    for note in &notes {
        println!("note: {note}");
    }
    let (image, initramfs) = build_vm_files(&staging, files, plan, &work)?;
    println!(
        "== {}: image ready in {:.0?}; booting under qemu (TCG)",
        kernel.label,
        started.elapsed()
    );

    let log_path = out_dir.join(format!("{}.log", kernel.label));
    let mut log = File::create(&log_path)?;
    let mut qemu = Command::new("setpriv");
    // If xtask itself is killed, the kernel kills qemu too (setpriv execs qemu, so the
    // pid we hold is qemu's).
    qemu.args(["--pdeathsig", "KILL", "--", "qemu-system-x86_64"])
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2"])
        .args(["-m", &memory_mib.to_string()])
        .arg("-kernel")
        .arg(&files.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            image.display()
        ))
        .args(["-nic", "none", "-display", "none", "-monitor", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let mut qemu = Qemu(child);
    let stdout = qemu.0.stdout.take().context("qemu stdout")?;
    let stderr = qemu.0.stderr.take().context("qemu stderr")?;
    let label = kernel.label.to_owned();
    let reader = thread::spawn(move || -> Vec<String> {
        let mut lines = Vec::new();
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            let _ = writeln!(log, "{line}");
            echo_progress(&label, &line);
            lines.push(line);
            buf.clear();
        }
        lines
    });
    let stderr_reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });

    // The whole VM gets every suite's timeout plus boot and probe time.
    let deadline = plan.suite_timeout * (plan.suites.len() as u32) + Duration::from_secs(600);
    let mut timed_out = false;
    loop {
        if qemu.0.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > deadline {
            timed_out = true;
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    drop(qemu);
    let lines = reader.join().unwrap_or_default();
    let qemu_errors = stderr_reader.join().unwrap_or_default();
    let mut column = parse_log(kernel.label, &lines, false);
    column.release = Some(files.release.clone());
    column.wall = started.elapsed();
    if timed_out {
        column.problems.push(format!(
            "the VM ran past its deadline ({deadline:.0?}) and was killed"
        ));
    }
    if !column.done {
        column.problems.push(format!(
            "the VM stopped before its last marker{}",
            if qemu_errors.trim().is_empty() {
                String::new()
            } else {
                format!("; qemu: {}", qemu_errors.trim())
            }
        ));
    }
    column.problems.extend(notes);
    column.log = Some(log_path);
    Ok(column)
}

/// Prints the lines that show progress (markers, test results); the rest goes to the log.
fn echo_progress(label: &str, line: &str) {
    let interesting = line.starts_with(MARKER)
        || line.starts_with("test result:")
        || (line.starts_with("test ") && (line.ends_with(" ok") || line.ends_with("FAILED")))
        || line.contains("Kernel panic");
    if interesting {
        println!("[{label}] {line}");
    }
}

fn run_on_host(plan: &Plan, out_dir: &Path) -> Result<Column> {
    println!("\n== host: running the suites natively");
    let started = Instant::now();
    let log_path = out_dir.join("host.log");
    let mut log = File::create(&log_path)?;
    // The snapshot, as in the VMs: target/release may be rebuilt (even as a stub
    // without the eBPF object) by someone else while the suites run.
    let bin_dir = plan.snapshot_of(&plan.bin_dir);
    let interceptor = bin_dir.join("interceptor");
    let uname = probe(Command::new("uname").arg("-r")).unwrap_or_default();
    writeln!(log, "{MARKER} kernel {}", uname.trim())?;
    writeln!(log, "{MARKER} probe-begin")?;
    let probe_out = Command::new(&interceptor)
        .args(["probe", "--json"])
        .stdin(Stdio::null())
        .output();
    match probe_out {
        Ok(out) => {
            log.write_all(&out.stdout)?;
            log.write_all(&out.stderr)?;
            writeln!(
                log,
                "\n{MARKER} probe-end rc={}",
                out.status.code().unwrap_or(-1)
            )?;
        }
        Err(e) => writeln!(
            log,
            "cannot run {}: {e}\n{MARKER} probe-end rc=-1",
            interceptor.display()
        )?,
    }
    // The same PATH as `cargo xtask test`: only the programs setup installs.
    let path = crate::audited_path()?;
    for suite in &plan.suites {
        writeln!(log, "{MARKER} suite-begin {suite}")?;
        println!("[host] {MARKER} suite-begin {suite}");
        let suite_started = Instant::now();
        let mut child = Command::new(plan.snapshot_of(&plan.executables[suite]))
            .args(plan.libtest_args())
            .env("CI", "true")
            .env("INTERCEPTOR_BIN_DIR", &bin_dir)
            .env("PATH", &path)
            .current_dir(cmd::workspace_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .spawn()
            .with_context(|| format!("starting {suite}"))?;
        let rc = loop {
            if let Some(status) = child.try_wait()? {
                break status.code().unwrap_or(-1);
            }
            if suite_started.elapsed() > plan.suite_timeout {
                let _ = child.kill();
                let _ = child.wait();
                break -9;
            }
            thread::sleep(Duration::from_millis(200));
        };
        let secs = suite_started.elapsed().as_secs();
        writeln!(log, "{MARKER} suite-end {suite} rc={rc} secs={secs}")?;
        println!("[host] {MARKER} suite-end {suite} rc={rc} secs={secs}");
    }
    writeln!(log, "{MARKER} done")?;
    drop(log);
    let text = fs::read_to_string(&log_path)?;
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut column = parse_log("host", &lines, true);
    column.release = Some(uname.trim().to_owned());
    column.wall = started.elapsed();
    column.log = Some(log_path);
    print_column_failures(&column);
    Ok(column)
}

// ---------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------

/// One column of the matrix: a kernel (or the host) and what ran on it.
struct Column {
    label: String,
    is_host: bool,
    release: Option<String>,
    probe: Option<Probe>,
    /// Why the probe has no result, when it has none.
    probe_problem: Option<String>,
    suites: BTreeMap<String, SuiteResult>,
    missing_modules: Vec<String>,
    /// Harness-level trouble: no boot, timeout, a missing program.
    problems: Vec<String>,
    done: bool,
    wall: Duration,
    log: Option<PathBuf>,
    dmesg: Vec<String>,
}

impl Column {
    fn broken(label: &str, problem: String) -> Column {
        let mut column = parse_log(label, &[], false);
        column.problems.push(problem);
        column
    }

    fn all_passed(&self) -> bool {
        self.problems
            .iter()
            .all(|p| p.contains("not installed on the host"))
            && self.done
            && self
                .suites
                .values()
                .all(|s| s.failed == 0 && s.rc == Some(0))
    }
}

struct Probe {
    kernel: String,
    auto_mode: String,
    reason: String,
    features: Vec<Feature>,
}

struct Feature {
    name: String,
    since: String,
    required: bool,
    supported: bool,
    fallback: Option<String>,
}

#[derive(Default)]
struct SuiteResult {
    passed: u32,
    failed: u32,
    ignored: u32,
    /// `test result:` seen: the counts are libtest's own.
    summarized: bool,
    failed_tests: Vec<String>,
    /// Test name → the lines of its captured output from the panic on.
    failure_text: BTreeMap<String, Vec<String>>,
    /// The test that was running when the suite ended without a summary.
    unfinished: Option<String>,
    rc: Option<i32>,
    secs: Option<u64>,
}

fn parse_log(label: &str, lines: &[String], is_host: bool) -> Column {
    let mut column = Column {
        label: label.to_owned(),
        is_host,
        release: None,
        probe: None,
        probe_problem: Some("the probe did not run".to_owned()),
        suites: BTreeMap::new(),
        missing_modules: Vec::new(),
        problems: Vec::new(),
        done: false,
        wall: Duration::ZERO,
        log: None,
        dmesg: Vec::new(),
    };
    let mut probe_text: Option<String> = None;
    let mut in_dmesg = false;
    let mut suite: Option<(String, Vec<String>)> = None;
    for line in lines {
        if let Some(rest) = line.strip_prefix(MARKER) {
            let mut words = rest.split_whitespace();
            match words.next() {
                Some("kernel") => {
                    column.release = words.next().map(str::to_owned);
                }
                Some("no-module") => column
                    .missing_modules
                    .extend(words.next().map(str::to_owned)),
                Some("insmod-failed") | Some("no-root-disk") => {
                    column.problems.push(format!("initramfs: {}", rest.trim()))
                }
                Some("probe-begin") => probe_text = Some(String::new()),
                Some("probe-end") => {
                    let text = probe_text.take().unwrap_or_default();
                    let (probe, problem) = parse_probe(&text, rest);
                    column.probe = probe;
                    column.probe_problem = problem;
                }
                Some("suite-begin") => {
                    if let Some(name) = words.next() {
                        suite = Some((name.to_owned(), Vec::new()));
                    }
                }
                Some("suite-end") => {
                    if let Some((name, output)) = suite.take() {
                        let mut result = parse_libtest(&output);
                        for word in words {
                            if let Some(rc) = word.strip_prefix("rc=") {
                                result.rc = rc.parse().ok();
                            } else if let Some(secs) = word.strip_prefix("secs=") {
                                result.secs = secs.parse().ok();
                            }
                        }
                        column.suites.insert(name, result);
                    }
                }
                Some("dmesg-begin") => in_dmesg = true,
                Some("dmesg-end") => in_dmesg = false,
                Some("done") => column.done = true,
                _ => {}
            }
            continue;
        }
        if let Some(text) = probe_text.as_mut() {
            text.push_str(line);
            text.push('\n');
        } else if let Some((_, output)) = suite.as_mut() {
            output.push(line.clone());
        } else if in_dmesg {
            column.dmesg.push(line.clone());
        }
    }
    // A suite whose end marker never came (the VM died or timed out in it).
    if let Some((name, output)) = suite.take() {
        column.suites.insert(name, parse_libtest(&output));
    }
    column
}

fn parse_probe(text: &str, end_marker: &str) -> (Option<Probe>, Option<String>) {
    let unavailable = |why: String| (None, Some(why));
    let Some(start) = text.find('{') else {
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        return unavailable(format!(
            "probe unavailable ({}{})",
            end_marker.trim(),
            if first.is_empty() {
                String::new()
            } else {
                format!(": {first}")
            }
        ));
    };
    let mut values = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
    let json = match values.next() {
        Some(Ok(json)) => json,
        Some(Err(e)) => return unavailable(format!("probe unavailable (output is not JSON: {e})")),
        None => return unavailable("probe unavailable (no output)".to_owned()),
    };
    let string = |v: &Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    let features = json["features"]
        .as_array()
        .map(|features| {
            features
                .iter()
                .map(|f| Feature {
                    name: string(&f["name"]),
                    since: f["since"].as_str().unwrap_or("?").to_owned(),
                    required: f["required"].as_bool().unwrap_or(true),
                    supported: f["supported"].as_bool().unwrap_or(false),
                    fallback: f["fallback"].as_str().map(str::to_owned),
                })
                .collect()
        })
        .unwrap_or_default();
    let probe = Probe {
        kernel: tidy_kernel_version(&string(&json["kernel"])),
        auto_mode: string(&json["auto_mode"]),
        reason: string(&json["reason"]),
        features,
    };
    (Some(probe), None)
}

/// `KernelVersion { major: 6, minor: 18, patch: 44 }` (a Debug rendering) → `6.18.44`;
/// anything else unchanged.
fn tidy_kernel_version(text: &str) -> String {
    let number = |key: &str| {
        let at = text.find(key)? + key.len();
        let digits: String = text[at..]
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        (!digits.is_empty()).then_some(digits)
    };
    match (number("major:"), number("minor:"), number("patch:")) {
        (Some(major), Some(minor), Some(patch)) => format!("{major}.{minor}.{patch}"),
        _ => text.to_owned(),
    }
}

/// Counts and failures from libtest's text output (`--test-threads=1`). Lines the
/// tests' child processes write to the inherited stderr can split `test x ... ok`, so a
/// result may arrive on a later line than its name; the summary, when present, wins.
fn parse_libtest(output: &[String]) -> SuiteResult {
    let mut result = SuiteResult::default();
    let mut running: Option<String> = None;
    let mut seen_ok = 0;
    let mut seen_failed = Vec::new();
    let mut seen_ignored = 0;
    let mut failure_section: Option<String> = None;
    let mut in_failure_list = false;
    let mut failures_headers = 0;
    for line in output {
        let trimmed = line.trim_end();
        if let Some(rest) = trimmed.strip_prefix("test result: ") {
            result.summarized = true;
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(count)) = (words.next(), words.next()) else {
                    continue;
                };
                let count = count
                    .trim_start_matches("FAILED.")
                    .trim_start_matches("ok.");
                let Ok(count) = count.trim().parse::<u32>() else {
                    continue;
                };
                match what {
                    "passed" => result.passed = count,
                    "failed" => result.failed = count,
                    "ignored" => result.ignored = count,
                    _ => {}
                }
            }
            in_failure_list = false;
            continue;
        }
        if trimmed == "failures:" {
            failures_headers += 1;
            // The second `failures:` heads the list of names.
            in_failure_list = failures_headers >= 2;
            failure_section = None;
            continue;
        }
        if in_failure_list {
            if let Some(name) = trimmed.strip_prefix("    ") {
                if !result.failed_tests.contains(&name.to_owned()) {
                    result.failed_tests.push(name.to_owned());
                }
            }
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("---- ") {
            failure_section = rest.strip_suffix(" stdout ----").map(str::to_owned);
            continue;
        }
        if let Some(name) = &failure_section {
            result
                .failure_text
                .entry(name.clone())
                .or_default()
                .push(trimmed.to_owned());
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("test ") {
            // `test x ... ok`, or `test x ...` when the result comes on a later line.
            let split = rest
                .split_once(" ... ")
                .or_else(|| rest.strip_suffix(" ...").map(|name| (name, "")));
            if let Some((name, outcome)) = split {
                running = Some(name.to_owned());
                if record_outcome(
                    outcome,
                    name,
                    &mut seen_ok,
                    &mut seen_failed,
                    &mut seen_ignored,
                ) {
                    running = None;
                }
                continue;
            }
        }
        if let Some(name) = running.clone() {
            if record_outcome(
                trimmed,
                &name,
                &mut seen_ok,
                &mut seen_failed,
                &mut seen_ignored,
            ) {
                running = None;
            }
        }
    }
    if !result.summarized {
        result.passed = seen_ok;
        result.failed = seen_failed.len() as u32;
        result.ignored = seen_ignored;
        result.unfinished = running;
    }
    for name in seen_failed {
        if !result.failed_tests.contains(&name) {
            result.failed_tests.push(name);
        }
    }
    result
}

/// Records `ok` / `FAILED` / `ignored` at the end of a line; true when it was one.
fn record_outcome(
    text: &str,
    name: &str,
    ok: &mut u32,
    failed: &mut Vec<String>,
    ignored: &mut u32,
) -> bool {
    let text = text.trim();
    if text == "ok" {
        *ok += 1;
    } else if text == "FAILED" {
        failed.push(name.to_owned());
    } else if text == "ignored" || text.starts_with("ignored,") {
        *ignored += 1;
    } else {
        return false;
    }
    true
}

/// The failing tests of a column with the gist of each failure, for the terminal.
fn print_column_failures(column: &Column) {
    let text = failures_text(column);
    if !text.is_empty() {
        println!("{text}");
    }
}

fn failures_text(column: &Column) -> String {
    let mut text = String::new();
    for problem in &column.problems {
        let _ = writeln!(text, "- {}: {problem}", column.label);
    }
    for (suite, result) in &column.suites {
        if let Some(test) = &result.unfinished {
            let _ = writeln!(
                text,
                "- {}: {suite} ended inside {test} (rc {:?}; killed or crashed)",
                column.label, result.rc
            );
        }
        for test in &result.failed_tests {
            let _ = writeln!(text, "- {}: {suite}::{test} FAILED", column.label);
            if let Some(lines) = result.failure_text.get(test) {
                for line in failure_gist(lines) {
                    let _ = writeln!(text, "      {line}");
                }
            }
        }
    }
    if !text.is_empty() {
        if let Some(log) = &column.log {
            let _ = writeln!(text, "  (full log: {})", log.display());
        }
    }
    text
}

/// The panic line and what follows it (the message, often the agent's error), at most
/// a dozen lines, without the terminal colours of the agent's log.
fn failure_gist(lines: &[String]) -> Vec<String> {
    let start = lines
        .iter()
        .position(|l| l.contains("panicked at"))
        .unwrap_or(0);
    lines[start..]
        .iter()
        .map(|l| strip_ansi(l))
        .filter(|l| {
            !l.trim().is_empty()
                && !l.starts_with("note: ")
                && !l.starts_with("stack backtrace:")
                && !is_backtrace_frame(l)
        })
        .take(12)
        .map(|mut l| {
            if let Some((cut, _)) = l.char_indices().nth(400) {
                l.truncate(cut);
            }
            l
        })
        .collect()
}

/// `   3: core::panicking::…` or `             at ./src/…` (RUST_BACKTRACE=1 output).
fn is_backtrace_frame(line: &str) -> bool {
    let trimmed = line.trim_start();
    let indented = trimmed.len() < line.len();
    let numbered = trimmed
        .split_once(": ")
        .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
    indented && (numbered || trimmed.starts_with("at "))
}

/// Drops ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn render_matrix(columns: &[Column], plan: &Plan, total: Duration) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    rows.push((
        "kernel".to_owned(),
        columns
            .iter()
            .map(|c| {
                let release = c.release.clone().unwrap_or_else(|| "?".to_owned());
                match &c.probe {
                    Some(p) if !p.kernel.is_empty() && !release.starts_with(&p.kernel) => {
                        format!("{release} (probe: {})", p.kernel)
                    }
                    _ => release,
                }
            })
            .collect(),
    ));
    rows.push((
        "auto mode (why)".to_owned(),
        columns
            .iter()
            .map(|c| match (&c.probe, &c.probe_problem) {
                (Some(p), _) => format!("**{}**: {}", p.auto_mode, p.reason),
                (None, Some(problem)) => problem.clone(),
                (None, None) => "probe unavailable".to_owned(),
            })
            .collect(),
    ));
    // Features in the order the first probe lists them, then any other probe's extras.
    let mut feature_names: Vec<(String, String, bool)> = Vec::new();
    let mut fallbacks: BTreeMap<String, String> = BTreeMap::new();
    for column in columns {
        for f in column.probe.iter().flat_map(|p| &p.features) {
            if !feature_names.iter().any(|(n, _, _)| *n == f.name) {
                feature_names.push((f.name.clone(), f.since.clone(), f.required));
            }
            if let Some(fallback) = &f.fallback {
                fallbacks.insert(f.name.clone(), fallback.clone());
            }
        }
    }
    for (name, since, required) in &feature_names {
        let kind = if *required { "required" } else { "optional" };
        rows.push((
            format!("feature: {name} ({since}, {kind})"),
            columns
                .iter()
                .map(|c| {
                    let Some(probe) = &c.probe else {
                        return "–".to_owned();
                    };
                    match probe.features.iter().find(|f| &f.name == name) {
                        None => "not probed".to_owned(),
                        Some(f) if f.supported => "present".to_owned(),
                        Some(f) if f.fallback.is_some() => "missing → fallback".to_owned(),
                        Some(f) if f.required => "**missing** (required)".to_owned(),
                        Some(_) => "missing".to_owned(),
                    }
                })
                .collect(),
        ));
    }
    for suite in &plan.suites {
        rows.push((
            suite.clone(),
            columns
                .iter()
                .map(|c| match c.suites.get(suite) {
                    None => "not run".to_owned(),
                    Some(r) => {
                        let mut text = format!("{} passed, {} failed", r.passed, r.failed);
                        if r.ignored > 0 {
                            let _ = write!(text, ", {} ignored", r.ignored);
                        }
                        if !r.summarized {
                            let _ = write!(
                                text,
                                " (no summary: killed in {})",
                                r.unfinished.as_deref().unwrap_or("?")
                            );
                        } else if r.rc.is_some_and(|rc| rc != 0) && r.failed == 0 {
                            let _ = write!(text, " (exit {})", r.rc.unwrap_or(-1));
                        }
                        if let Some(secs) = r.secs {
                            let _ = write!(text, " ({secs} s)");
                        }
                        text
                    }
                })
                .collect(),
        ));
    }
    rows.push((
        "modules missing".to_owned(),
        columns
            .iter()
            .map(|c| {
                if c.is_host {
                    "–".to_owned()
                } else if c.missing_modules.is_empty() {
                    "none".to_owned()
                } else {
                    c.missing_modules.join(", ")
                }
            })
            .collect(),
    ));
    rows.push((
        "wall time".to_owned(),
        columns
            .iter()
            .map(|c| format!("{:.0} s", c.wall.as_secs_f64()))
            .collect(),
    ));

    let mut out = String::new();
    let _ = writeln!(out, "# vm-test matrix\n");
    let _ = writeln!(
        out,
        "Suites: {}{}; libtest `--test-threads=1`; VMs: qemu TCG, 2 vCPUs. Total {:.0} s.\n",
        plan.suites.join(", "),
        plan.filter
            .as_ref()
            .map(|f| format!(" (filter `{f}`)"))
            .unwrap_or_default(),
        total.as_secs_f64()
    );
    let header: Vec<String> = columns
        .iter()
        .map(|c| {
            if c.is_host {
                "host".to_owned()
            } else {
                format!("Debian {}", c.label)
            }
        })
        .collect();
    let _ = writeln!(out, "| | {} |", header.join(" | "));
    let _ = writeln!(out, "|---|{}", "---|".repeat(columns.len()));
    for (name, cells) in rows {
        let cells: Vec<String> = cells.iter().map(|c| cell(c)).collect();
        let _ = writeln!(out, "| {} | {} |", cell(&name), cells.join(" | "));
    }
    if !fallbacks.is_empty() {
        let _ = writeln!(
            out,
            "\nFallbacks used when an optional feature is missing:\n"
        );
        for (name, fallback) in &fallbacks {
            let _ = writeln!(out, "- {name}: {fallback}");
        }
    }
    let failures: String = columns.iter().map(failures_text).collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## Failures\n\n```\n{}```", failures);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn libtest_summary_and_failures_are_read() {
        let output = lines(
            "running 3 tests\n\
             test ebpf::a ... ok\n\
             test ebpf::b ... agent: noise from a child\n\
             FAILED\n\
             test iptables::a ... ok\n\
             \n\
             failures:\n\
             \n\
             ---- ebpf::b stdout ----\n\
             \n\
             thread 'ebpf::b' panicked at tests/tests/e2e_outbound.rs:10:5:\n\
             agent starts: attaching tc: Invalid argument\n\
             \n\
             failures:\n    ebpf::b\n\
             \n\
             test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9.01s\n",
        );
        let result = parse_libtest(&output);
        assert!(result.summarized);
        assert_eq!((result.passed, result.failed, result.ignored), (2, 1, 0));
        assert_eq!(result.failed_tests, ["ebpf::b"]);
        let gist = failure_gist(&result.failure_text["ebpf::b"]);
        assert!(gist[1].contains("Invalid argument"), "{gist:?}");
    }

    #[test]
    fn a_killed_suite_names_the_test_it_was_in() {
        let result = parse_libtest(&lines(
            "running 2 tests\ntest ebpf::a ... ok\ntest ebpf::b ... ",
        ));
        assert!(!result.summarized);
        assert_eq!(result.passed, 1);
        assert_eq!(result.unfinished.as_deref(), Some("ebpf::b"));
    }

    #[test]
    fn console_log_is_split_into_probe_and_suites() {
        let log = lines(&format!(
            "booting\n{MARKER} no-module act_bpf\n{MARKER} kernel 5.10.0-32-cloud-amd64\n\
             {MARKER} probe-begin\n\
             {{\"kernel\": \"KernelVersion {{ major: 5, minor: 10, patch: 223 }}\", \"auto_mode\": \"iptables\", \"reason\": \"r\", \"features\": [{{\"name\": \"TCX\", \"since\": \"6.6\", \"required\": false, \"supported\": false, \"fallback\": \"netlink\"}}]}}\n\
             {MARKER} probe-end rc=0\n\
             {MARKER} suite-begin e2e_x\ntest a ... ok\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s\n\
             {MARKER} suite-end e2e_x rc=0 secs=12\n{MARKER} done\n"
        ));
        let column = parse_log("5.10", &log, false);
        let probe = column.probe.expect("probe");
        assert_eq!(probe.kernel, "5.10.223");
        assert_eq!(probe.auto_mode, "iptables");
        assert!(!probe.features[0].supported);
        assert_eq!(column.missing_modules, ["act_bpf"]);
        let suite = &column.suites["e2e_x"];
        assert_eq!((suite.passed, suite.rc, suite.secs), (1, Some(0), Some(12)));
        assert!(column.done);
    }

    #[test]
    fn a_missing_probe_subcommand_is_reported_not_fatal() {
        let (probe, problem) = parse_probe(
            "error: unrecognized subcommand 'probe'\n",
            " probe-end rc=2",
        );
        assert!(probe.is_none());
        assert!(problem.unwrap().starts_with("probe unavailable"));
    }

    #[test]
    fn backtrace_frames_are_recognised() {
        assert!(is_backtrace_frame("   3: core::panicking::assert_failed"));
        assert!(is_backtrace_frame("             at ./src/main.rs:3:5"));
        assert!(!is_backtrace_frame("  left: []"));
        assert!(!is_backtrace_frame("thread 'x' panicked at a.rs:1:2:"));
    }

    #[test]
    fn colours_are_stripped() {
        assert_eq!(strip_ansi("\u{1b}[2mx\u{1b}[0m y"), "x y");
    }

    #[test]
    fn module_names_drop_paths_and_compression() {
        assert_eq!(
            module_name("kernel/drivers/block/virtio_blk.ko.xz"),
            "virtio_blk"
        );
        assert_eq!(module_name("kernel/net/sched/sch-x.ko"), "sch_x");
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"abc");
        let bytes = cpio.finish();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
    }
}
