//! `cargo xtask`: setup, build, test and demo tasks for the interceptor workspace.

mod fuzz;
mod programs;
mod vm;

use std::env;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use xtask::{cmd, image, setup};

#[derive(Parser)]
#[command(about = "Development tasks for the interceptor workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (nightly + rust-src, bpf-linker, Debian packages,
    /// bpffs); fast when nothing is missing. Needs root to install packages or mount bpffs.
    Setup,
    /// Build the whole workspace in release mode (the eBPF object is built by
    /// interceptor/build.rs and embedded).
    Build,
    /// Setup, build, then run the unit tests and the privileged end-to-end tests.
    /// Arguments after `--` are passed to `cargo test` (e.g. `-- -p interceptor -- --nocapture`).
    Test {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, then run the testbed demo (target/release/tb-demo).
    Demo {
        /// Arguments passed to tb-demo.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the node agent's OCI image (`interceptor`, `interceptor-cni`, and the
    /// iptables and nftables packages with their dependencies from this machine's Debian
    /// installation, `FROM scratch`) with podman, saved as an OCI archive:
    /// target/interceptor-image.oci.tar, image localhost/interceptor:<version>.
    Image {
        /// Use the release binaries already in target/release instead of building them.
        #[arg(long)]
        no_build: bool,
        /// Where to write the OCI archive.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Run clippy on every crate and target, denying warnings.
    Clippy {
        /// Skip building the eBPF object (AYA_BUILD_SKIP=1), for machines without bpf-linker.
        #[arg(long)]
        skip_ebpf: bool,
    },
    /// Setup, build, then run the benchmark (target/release/tb-bench) on the local
    /// testbed: one table of direct, HAProxy, ztunnel (with ZTUNNEL_BIN) and ours,
    /// same-node and cross-node, saved under bench/results/. Needs root. Arguments are
    /// passed to tb-bench (e.g. `cargo xtask bench --quick`, `-- --repeat 5`; its options:
    /// `cargo xtask bench -- --help`).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build, then soak the agent on the local testbed (target/release/tb-soak):
    /// connection churn with resets, pod add/delete churn and an agent hand-over every
    /// few minutes for `--minutes`, then checks that kernel map entries, fds, threads and
    /// RSS are back to their baseline. Needs root. Arguments after `--` are passed to
    /// tb-soak (its options: `cargo xtask soak -- --help`).
    Soak {
        /// Length of the soak (after a one-minute warm-up).
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Interception mode of the agent.
        #[arg(long, default_value = "ebpf", value_parser = ["ebpf", "iptables"])]
        mode: String,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Boot Debian's cloud kernels (5.10, 6.1, 6.12) under qemu (TCG), run the privileged
    /// e2e suites inside each and on the host, and print the kernel × auto mode × features
    /// × results matrix (also target/vm-test/matrix.md). Slow: not part of `test`.
    /// Needs root; installs qemu and what else it needs.
    VmTest(vm::Options),
    /// Run the cargo-fuzz targets of fuzz/ (CNI stdin and environment, agent protocol,
    /// annotations, manifests, mesh config) one at a time for `--seconds` each on their
    /// committed corpus, and print runs, corpus size and crashes per target; fails if any
    /// crashed. Installs cargo-fuzz when missing; needs the nightly toolchain.
    Fuzz(fuzz::Options),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    put_cargo_bin_on_path()?;
    match cli.task {
        Task::Setup => setup::setup(),
        Task::Build => build(),
        Task::Test { args } => {
            setup::setup()?;
            build()?;
            // Build the test binaries with the full PATH (linking needs the C toolchain),
            // then run them under the exec audit, every binary even when one fails.
            cmd::run(cmd::cargo().args(["test", "--release", "--workspace", "--no-run"]))?;
            cmd::run(
                cmd::cargo()
                    .args(["test", "--release", "--workspace", "--no-fail-fast"])
                    .args(args)
                    .env("PATH", audited_path()?),
            )
        }
        Task::Demo { args } => {
            setup::setup()?;
            build()?;
            let demo = target_dir().join("release/tb-demo");
            if !demo.exists() {
                bail!(
                    "{} does not exist: the workspace has no tb-demo binary yet \
                     (it belongs in the interceptor-testbed crate under tests/)",
                    demo.display()
                );
            }
            cmd::run(
                cmd::new(&demo.to_string_lossy())
                    .args(args)
                    .env("PATH", audited_path()?),
            )
        }
        Task::Image { no_build, output } => {
            if !no_build {
                cmd::run(cmd::cargo().args([
                    "build",
                    "--release",
                    "-p",
                    "interceptor",
                    "-p",
                    "interceptor-cni",
                ]))?;
            }
            let release = target_dir().join("release");
            let built = image::build(&image::ImageSpec {
                interceptor: release.join("interceptor"),
                cni: release.join("interceptor-cni"),
                work_dir: target_dir().join("image"),
                archive: output.unwrap_or_else(|| target_dir().join(image::ARCHIVE_NAME)),
                reference: image::image_ref(),
            })?;
            println!(
                "built {} ({:.1} MB, {:.1} s): {}\nDebian packages: {}",
                built.reference,
                built.archive_bytes as f64 / 1e6,
                built.seconds,
                built.archive.display(),
                built.packages.join(" ")
            );
            Ok(())
        }
        Task::Clippy { skip_ebpf } => {
            let mut clippy = cmd::cargo();
            clippy.args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]);
            if skip_ebpf {
                clippy.env("AYA_BUILD_SKIP", "1");
            }
            cmd::run(&mut clippy)
        }
        Task::VmTest(options) => vm::run_vm_test(options),
        Task::Fuzz(options) => fuzz::run(options),
        Task::Bench { args } => {
            setup::setup()?;
            build()?;
            cmd::run(
                cmd::new(&built_binary("tb-bench")?)
                    .args(args)
                    .env("PATH", audited_path()?),
            )
        }
        Task::Soak {
            minutes,
            mode,
            args,
        } => {
            setup::setup()?;
            build()?;
            cmd::run(
                cmd::new(&built_binary("tb-soak")?)
                    .arg("--minutes")
                    .arg(minutes.to_string())
                    .arg("--mode")
                    .arg(&mode)
                    .args(args)
                    .env("PATH", audited_path()?),
            )
        }
    }
}

/// `target/release/<name>` of the testbed crate, which the build just made.
fn built_binary(name: &str) -> Result<String> {
    let path = target_dir().join("release").join(name);
    if !path.exists() {
        bail!(
            "{} does not exist after the build (it is tests/src/bin/{name}.rs)",
            path.display()
        );
    }
    Ok(path.to_string_lossy().into_owned())
}

/// The eBPF crate is left out: interceptor/build.rs builds it for the BPF target, and
/// its host build is an empty binary also named `interceptor`, which, uplifted last,
/// would take the agent's place at `target/release/interceptor` (it did: the agent
/// "exited with status 0 before it was ready" in every bench row).
fn build() -> Result<()> {
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "--workspace",
        "--exclude",
        "interceptor-ebpf",
    ]))
}

/// `PATH` for what the tests, the demo and the bench run: only the programs setup
/// installs (or a fresh machine has), see `programs`.
fn audited_path() -> Result<std::ffi::OsString> {
    let dir = programs::audit_dir(&target_dir())?;
    programs::audited_path(&dir, &cmd::cargo_home()?.join("bin"))
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::workspace_root().join("target"))
}

/// Puts cargo's bin directory first on PATH for every child: aya-build's nested nightly
/// cargo links with `bpf-linker`, which `cargo install` put there, and a fresh shell
/// (CI, sudo) may not have it on PATH. First, so the bpf-linker setup built for the
/// nightly's LLVM wins over any other copy.
fn put_cargo_bin_on_path() -> Result<()> {
    let bin = cmd::cargo_home()?.join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if dirs.first() != Some(&bin) {
        dirs.retain(|d| d != &bin);
        dirs.insert(0, bin);
        env::set_var("PATH", env::join_paths(dirs).context("cannot build PATH")?);
    }
    Ok(())
}
