//! `cargo xtask image`: the node agent's OCI image, built here from nothing (no registry
//! is reachable, so no base image is pulled).
//!
//! The root filesystem is the agent's two binaries plus the files of the Debian packages
//! the agent executes (`iptables` for iptables-legacy and iptables-nft, `nftables` for
//! `nft`) and the packages they depend on, taken from the build host's own installation
//! (`dpkg-query -L`, dependency closure from `dpkg-query`'s `Depends`/`Pre-Depends`), in a
//! merged-/usr layout. Why not debootstrap: it needs the network for every build, takes
//! minutes and brings ~100 MB of a shell, apt and dpkg the agent never runs. Why not `ldd`
//! on the binaries: iptables `dlopen`s its matches and targets (`xtables/libxt_*.so`),
//! which `ldd` cannot see; package file lists hold everything the package ships, data
//! included (`/etc/protocols`, `/etc/ethertypes` of netbase), and `setup` installs the
//! packages the same way on every machine, so the image holds exactly the versions the
//! tests ran with (recorded in the image's labels).
//!
//! podman (`podman build` of a `FROM scratch` Containerfile, then `podman save --format
//! oci-archive`) makes the image, with its storage, run and tmp dirs under
//! `target/image/podman` (wiped on every build: idempotent, nothing in the host's
//! `/var/lib/containers`).
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// The name the image is saved under, and that `deploy/daemonset.yaml` runs.
pub const IMAGE_NAME: &str = "localhost/interceptor";

/// `localhost/interceptor:<workspace version>`.
pub fn image_ref() -> String {
    format!("{IMAGE_NAME}:{}", env!("CARGO_PKG_VERSION"))
}

/// The archive's file name under `target/`.
pub const ARCHIVE_NAME: &str = "interceptor-image.oci.tar";

/// The Debian packages whose programs the agent executes (with their dependencies).
pub const PAYLOAD_PACKAGES: &[&str] = &["iptables", "nftables"];

/// Programs the agent (or an operator with `kubectl exec`) runs inside the image, which
/// the build checks are there.
const PAYLOAD_PROGRAMS: &[&str] = &[
    "usr/local/bin/interceptor",
    "usr/local/bin/interceptor-cni",
    "usr/sbin/iptables-legacy-save",
    "usr/sbin/iptables-legacy-restore",
    "usr/sbin/iptables-nft-save",
    "usr/sbin/iptables-nft-restore",
    "usr/sbin/ip6tables-legacy-save",
    "usr/sbin/ip6tables-legacy-restore",
    "usr/sbin/ip6tables-nft-save",
    "usr/sbin/ip6tables-nft-restore",
    "usr/sbin/iptables",
    "usr/sbin/nft",
];

/// Paths of package file lists left out of the image: documentation, translations and
/// iconv's converters (nothing in the image converts character sets).
const EXCLUDED: &[&str] = &[
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/info",
    "/usr/share/locale",
    "/usr/share/lintian",
    "/usr/share/bug",
    "/usr/lib/x86_64-linux-gnu/gconv",
];

/// The tools the build itself runs, with their Debian packages.
const TOOLS: &[(&str, &str)] = &[("podman", "podman"), ("dpkg-query", "dpkg")];

/// What to put in the image and where the archive goes.
pub struct ImageSpec {
    /// `interceptor` (agent, proxy, operator commands).
    pub interceptor: PathBuf,
    /// `interceptor-cni`, installed next to `interceptor` (where `--install-cni` finds it).
    pub cni: PathBuf,
    /// Scratch space (rootfs, Containerfile, podman storage); emptied first.
    pub work_dir: PathBuf,
    /// The OCI archive to write.
    pub archive: PathBuf,
    /// The image's name and tag.
    pub reference: String,
}

/// What a build made.
#[derive(Debug)]
pub struct Built {
    pub archive: PathBuf,
    pub reference: String,
    /// Bytes of the archive.
    pub archive_bytes: u64,
    /// `name=version` of every Debian package in the image.
    pub packages: Vec<String>,
    pub seconds: f64,
}

/// Builds the image and saves it as an OCI archive. Fails naming the Debian package when
/// a tool or a payload package is missing.
pub fn build(spec: &ImageSpec) -> Result<Built> {
    let started = Instant::now();
    let podman = require_tools(&path_dirs())?;
    require_packages(PAYLOAD_PACKAGES)?;
    for binary in [&spec.interceptor, &spec.cni] {
        if !binary.is_file() {
            bail!(
                "{} does not exist: build it first (`cargo build --release -p interceptor -p \
                 interceptor-cni`)",
                binary.display()
            );
        }
    }

    if spec.work_dir.exists() {
        fs::remove_dir_all(&spec.work_dir)
            .with_context(|| format!("removing {}", spec.work_dir.display()))?;
    }
    let rootfs = spec.work_dir.join("context/rootfs");
    let packages = assemble_rootfs(&rootfs, spec)?;

    let containerfile = spec.work_dir.join("context/Containerfile");
    fs::write(&containerfile, containerfile_text(&packages))
        .with_context(|| format!("writing {}", containerfile.display()))?;

    let podman = PrivatePodman::new(podman, &spec.work_dir.join("podman"))?;
    cmd::run(
        podman
            .command()
            .args(["build", "--isolation", "chroot", "--timestamp", "0"])
            .args(["--tag", &spec.reference, "--file"])
            .arg(&containerfile)
            .arg(spec.work_dir.join("context")),
    )?;
    if let Some(parent) = spec.archive.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let partial = spec.archive.with_extension("tar.partial");
    let _ = fs::remove_file(&partial);
    cmd::run(
        podman
            .command()
            .args(["save", "--format", "oci-archive", "--output"])
            .arg(&partial)
            .arg(&spec.reference),
    )?;
    fs::rename(&partial, &spec.archive)
        .with_context(|| format!("writing {}", spec.archive.display()))?;
    drop(podman);
    // The archive is the product; the storage only held it on the way.
    fs::remove_dir_all(&spec.work_dir)
        .with_context(|| format!("removing {}", spec.work_dir.display()))?;
    let archive_bytes = fs::metadata(&spec.archive)?.len();
    Ok(Built {
        archive: spec.archive.clone(),
        reference: spec.reference.clone(),
        archive_bytes,
        packages: packages
            .iter()
            .map(|(name, version)| format!("{name}={version}"))
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn containerfile_text(packages: &BTreeMap<String, String>) -> String {
    let list: Vec<String> = packages.iter().map(|(n, v)| format!("{n}={v}")).collect();
    format!(
        r#"# Written by `cargo xtask image` (xtask/src/image.rs): the agent, its CNI plugin and
# the Debian packages it executes, from the build host's installation.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.title="interceptor" \
      org.opencontainers.image.version="{version}" \
      io.interceptor.debian-packages="{packages}"
ENTRYPOINT ["interceptor"]
CMD ["--help"]
"#,
        version = env!("CARGO_PKG_VERSION"),
        packages = list.join(" "),
    )
}

/// The directories of `PATH`.
fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default()
}

/// The build tools, found in `dirs`; the error names every missing one with its package.
/// Returns podman's path.
pub fn require_tools(dirs: &[PathBuf]) -> Result<PathBuf> {
    let mut found = BTreeMap::new();
    let mut missing = Vec::new();
    for (tool, package) in TOOLS {
        match dirs.iter().map(|d| d.join(tool)).find(|p| p.is_file()) {
            Some(path) => {
                found.insert(*tool, path);
            }
            None => missing.push(format!("{tool} (Debian package {package})")),
        }
    }
    if !missing.is_empty() {
        bail!(
            "building the image needs {}, not found on PATH: `apt-get install {}` or \
             `cargo xtask setup`",
            missing.join(", "),
            TOOLS
                .iter()
                .filter(|(t, _)| !found.contains_key(t))
                .map(|(_, p)| *p)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(found.remove("podman").expect("podman found"))
}

/// Fails naming the packages of `list` that dpkg does not report as installed.
pub fn require_packages(list: &[&'static str]) -> Result<()> {
    let missing = crate::setup::missing_from(list);
    if !missing.is_empty() {
        bail!(
            "the image takes its programs from the host's Debian packages, and these are not \
             installed: {} (`apt-get install {}` or `cargo xtask setup`)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    Ok(())
}

/// Fills `rootfs`; returns the Debian packages it holds, with their versions.
fn assemble_rootfs(rootfs: &Path, spec: &ImageSpec) -> Result<BTreeMap<String, String>> {
    // Merged /usr, as Debian 12 installs it.
    for dir in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "usr/local/bin",
    ] {
        fs::create_dir_all(rootfs.join(dir))
            .with_context(|| format!("creating {}", rootfs.join(dir).display()))?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        symlink(target, rootfs.join(link))?;
    }
    for dir in ["etc", "run", "var", "proc", "sys", "dev", "host", "root"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    symlink("../run", rootfs.join("var/run"))?;
    let tmp = rootfs.join("tmp");
    fs::create_dir_all(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/false\n",
    )?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;

    let packages = closure(PAYLOAD_PACKAGES)?;
    for package in packages.keys() {
        let list = dpkg_query(&["-L", package])?;
        for line in list.lines() {
            let path = line.trim();
            if path.is_empty()
                || !path.starts_with('/')
                || EXCLUDED.iter().any(|e| Path::new(path).starts_with(e))
            {
                continue;
            }
            copy_entry(Path::new(path), rootfs)
                .with_context(|| format!("copying {path} of package {package}"))?;
        }
    }
    // What update-alternatives would have made: Debian 12's default is the nft backend.
    for (tool, target) in [
        ("iptables", "iptables-nft"),
        ("iptables-save", "iptables-nft-save"),
        ("iptables-restore", "iptables-nft-restore"),
        ("ip6tables", "ip6tables-nft"),
        ("ip6tables-save", "ip6tables-nft-save"),
        ("ip6tables-restore", "ip6tables-nft-restore"),
    ] {
        let link = rootfs.join("usr/sbin").join(tool);
        if link.symlink_metadata().is_err() {
            symlink(target, &link)?;
        }
    }
    for (from, name) in [
        (&spec.interceptor, "interceptor"),
        (&spec.cni, "interceptor-cni"),
    ] {
        let to = rootfs.join("usr/local/bin").join(name);
        fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755))?;
    }
    let absent: Vec<&str> = PAYLOAD_PROGRAMS
        .iter()
        .copied()
        .filter(|p| fs::metadata(rootfs.join(p)).is_err())
        .collect();
    if !absent.is_empty() {
        bail!(
            "the image's root filesystem lacks {} (are the packages {} complete? \
             `apt-get install --reinstall` them)",
            absent.join(", "),
            PAYLOAD_PACKAGES.join(", ")
        );
    }
    Ok(packages)
}

/// Copies one path of a package file list from the host into `rootfs` (directories are
/// made, symlinks copied as symlinks, files with their mode). A listed path the host no
/// longer has (dpkg's `path-exclude` drops documentation on minimal systems) is skipped.
fn copy_entry(path: &Path, rootfs: &Path) -> Result<()> {
    let Ok(meta) = path.symlink_metadata() else {
        return Ok(());
    };
    let to = rootfs.join(path.strip_prefix("/").unwrap_or(path));
    if meta.is_dir() {
        // Through the rootfs's merged-/usr links (`/lib/…` lands in `usr/lib/…`).
        fs::create_dir_all(&to)?;
        return Ok(());
    }
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    if to.symlink_metadata().is_ok() {
        // Listed twice (`/lib/x` and `/usr/lib/x` meet through the merged layout).
        return Ok(());
    }
    if meta.file_type().is_symlink() {
        symlink(fs::read_link(path)?, &to)?;
    } else {
        fs::copy(path, &to)?;
        fs::set_permissions(&to, fs::Permissions::from_mode(meta.permissions().mode()))?;
    }
    Ok(())
}

/// `roots` and every package they depend on (`Depends`, `Pre-Depends`; of alternatives
/// the first installed), with installed versions.
fn closure(roots: &[&str]) -> Result<BTreeMap<String, String>> {
    let mut done = BTreeMap::new();
    let mut todo: Vec<String> = roots.iter().map(|s| s.to_string()).collect();
    while let Some(package) = todo.pop() {
        if done.contains_key(&package) {
            continue;
        }
        let out = dpkg_query(&[
            "-W",
            "-f=${Version}\t${Depends}, ${Pre-Depends}\n",
            &package,
        ])
        .with_context(|| {
            format!("package {package}, a dependency of the image, is not installed")
        })?;
        let line = out.lines().next().unwrap_or_default();
        let (version, depends) = line.split_once('\t').unwrap_or((line, ""));
        done.insert(package.clone(), version.to_owned());
        for alternatives in depends.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let names: Vec<String> = alternatives
                .split('|')
                .filter_map(|alt| {
                    let name = alt.split_whitespace().next()?;
                    Some(name.split(':').next().unwrap_or(name).to_owned())
                })
                .collect();
            let installed = names.iter().find(|n| is_installed(n)).cloned();
            match installed {
                Some(name) => todo.push(name),
                None => bail!(
                    "{package} depends on {alternatives}, which is not installed \
                     (`apt-get install --reinstall {package}`)"
                ),
            }
        }
    }
    Ok(done)
}

fn is_installed(package: &str) -> bool {
    dpkg_query(&["-W", "-f=${Status}", package]).is_ok_and(|s| s.ends_with(" installed"))
}

fn dpkg_query(args: &[&str]) -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run dpkg-query (Debian package dpkg)")?;
    if !out.status.success() {
        bail!(
            "dpkg-query {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// podman with its storage, run dir, tmp dir, locks and events under one directory, so a
/// build touches nothing of the host's container state.
/// Its run root is a short directory of its own under the temp dir (podman refuses a
/// run root longer than 50 characters), removed on drop.
pub struct PrivatePodman {
    bin: PathBuf,
    dir: PathBuf,
    runroot: PathBuf,
}

impl Drop for PrivatePodman {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.runroot);
    }
}

/// What a caller adds to [`write_private_conf`]'s files: TOML lines for the end of the
/// `[containers]` and `[engine]` tables, and whole tables after them.
#[derive(Default)]
pub struct PodmanConfExtra {
    pub containers: String,
    pub engine: String,
    pub tables: String,
}

/// Writes `containers.conf` and `storage.conf` into `dir` for a podman confined to it
/// (its storage under `dir/root`, run state in `runroot`, events and temp files under
/// `dir/tmp`; cgroupfs, file locks, vfs), as the image build and the podman tests run it
/// (`CONTAINERS_CONF`, `CONTAINERS_STORAGE_CONF`).
pub fn write_private_conf(dir: &Path, runroot: &Path, extra: &PodmanConfExtra) -> Result<()> {
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    // default_ulimits = []: this machine forbids raising rlimits.
    let conf = format!(
        r#"[containers]
default_ulimits = []
{containers}
[engine]
cgroup_manager = "cgroupfs"
lock_type = "file"
events_logger = "file"
events_logfile_path = {events:?}
tmp_dir = {tmp:?}
static_dir = {static_dir:?}
volume_path = {volumes:?}
{engine}
{tables}"#,
        containers = extra.containers,
        engine = extra.engine,
        tables = extra.tables,
        events = tmp.join("events.log").display().to_string(),
        tmp = tmp.display().to_string(),
        static_dir = dir.join("root/libpod").display().to_string(),
        volumes = dir.join("root/volumes").display().to_string(),
    );
    fs::write(dir.join("containers.conf"), conf).context("writing containers.conf")?;
    // vfs: no overlay mounts to leave behind.
    let storage = format!(
        "[storage]\ndriver = \"vfs\"\ngraphroot = {:?}\nrunroot = {:?}\n",
        dir.join("root").display().to_string(),
        runroot.display().to_string(),
    );
    fs::write(dir.join("storage.conf"), storage).context("writing storage.conf")
}

impl PrivatePodman {
    pub fn new(bin: PathBuf, dir: &Path) -> Result<PrivatePodman> {
        // Unique per build, also for builds running side by side in one process.
        static BUILDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let runroot = std::env::temp_dir().join(format!("xtask-image-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&runroot);
        fs::create_dir_all(&runroot).with_context(|| format!("creating {}", runroot.display()))?;
        write_private_conf(dir, &runroot, &PodmanConfExtra::default())?;
        Ok(PrivatePodman {
            bin,
            dir: dir.to_owned(),
            runroot,
        })
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(&self.runroot)
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["--cgroup-manager", "cgroupfs"])
            .stdin(Stdio::null());
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_is_named_with_its_package() {
        let empty = std::env::temp_dir().join(format!("xtask-image-{}", std::process::id()));
        fs::create_dir_all(&empty).unwrap();
        let err = require_tools(std::slice::from_ref(&empty))
            .unwrap_err()
            .to_string();
        fs::remove_dir_all(&empty).unwrap();
        assert!(
            err.contains("podman (Debian package podman)")
                && err.contains("dpkg-query (Debian package dpkg)")
                && err.contains("apt-get install podman dpkg"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_payload_package_is_named() {
        let err = require_packages(&["interceptor-no-such-package"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not installed: interceptor-no-such-package"),
            "{err}"
        );
    }

    #[test]
    fn the_image_name_carries_the_workspace_version() {
        assert_eq!(
            image_ref(),
            format!("localhost/interceptor:{}", env!("CARGO_PKG_VERSION"))
        );
    }
}
