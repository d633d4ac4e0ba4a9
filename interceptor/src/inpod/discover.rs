//! Finding the network namespace of a pod that was running before the agent (no CNI ADD
//! ever told us about it): a process whose cgroup path names the pod's UID lives in the
//! pod's netns, and `/proc/<pid>/ns/net` opens it. Istio ambient's node agent finds pods
//! the same way.
//!
//! kubelet names a pod's cgroup after its UID in both cgroup drivers:
//!
//! - cgroupfs: `/kubepods/<qos>/pod<uid>/<container>` (guaranteed pods without `<qos>`);
//! - systemd: `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/
//!   cri-containerd-<container>.scope` (`crio-<container>.scope`, `docker-…` alike).
//!
//! The pod component is found anywhere in the path, not under a `kubepods` root: an
//! agent in a cgroup namespace reads other processes' paths relative to its own
//! (`0::/../../pod<uid>/<container>`). Processes in the agent's own netns are skipped:
//! a hostNetwork pod's processes name its UID too, and the host's netns must never be
//! enrolled. Several processes share a netns; each netns is reported once per pod, by
//! its oldest process (a pod's sandbox, the pause process, starts first and lives
//! longest). The caller still checks that the netns holds the pod's IP: a cgroup ties a
//! process to a pod, not to a netns (a process may have entered another netns).
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A pod's cgroup, as a process's cgroup path names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's UID, canonical (lowercase, dashes).
    pub uid: String,
    /// The container below the pod's cgroup, runtime prefix and `.scope` removed; `None`
    /// for a process in the pod's own cgroup.
    pub container_id: Option<String>,
}

/// Identity of a network namespace: device and inode of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    /// The netns `path` (`/proc/<pid>/ns/net`, a bind mount) refers to.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// One network namespace a pod's processes live in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundNetns {
    /// The oldest process of the pod seen in this netns.
    pub pid: u32,
    /// `<proc>/<pid>/ns/net`: valid while that process lives.
    pub path: PathBuf,
    pub netns: NetnsId,
    /// The container (cgroup name) of `pid`, if it is in one below the pod's cgroup.
    pub container_id: Option<String>,
    /// The containers (cgroup names) of the pod's processes in this netns; the sandbox's
    /// is among them, which is the container ID a CNI DEL for the pod names.
    pub container_ids: BTreeSet<String>,
    /// Start time of `pid` (clock ticks since boot), to order the candidates.
    start_time: u64,
}

/// Scans a `/proc` tree for the processes of pods.
#[derive(Clone, Debug)]
pub struct ProcScanner {
    proc_root: PathBuf,
    /// The agent's own netns: never a pod's.
    host: NetnsId,
}

impl ProcScanner {
    /// The machine's `/proc`, skipping the netns the agent runs in.
    pub fn host() -> std::io::Result<Self> {
        let proc_root = PathBuf::from("/proc");
        let host = NetnsId::of(&proc_root.join("self/ns/net"))?;
        Ok(Self { proc_root, host })
    }

    /// A `/proc` tree at `proc_root` (fixture trees in tests), skipping netns `host`.
    pub fn new(proc_root: impl Into<PathBuf>, host: NetnsId) -> Self {
        Self {
            proc_root: proc_root.into(),
            host,
        }
    }

    /// For each of `uids` (canonical) whose processes run here outside the host netns,
    /// the netns they live in, oldest process first. Unreadable entries (a process that
    /// exited meanwhile) are skipped.
    pub fn find(&self, uids: &HashSet<String>) -> HashMap<String, Vec<FoundNetns>> {
        let mut found: HashMap<String, Vec<FoundNetns>> = HashMap::new();
        if uids.is_empty() {
            return found;
        }
        let Ok(entries) = std::fs::read_dir(&self.proc_root) else {
            return found;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let dir = entry.path();
            let path = dir.join("ns/net");
            let Ok(netns) = NetnsId::of(&path) else {
                continue;
            };
            // Checked before the cgroup is read: most processes of a node are the host's.
            if netns == self.host {
                continue;
            }
            let Some(pod) = std::fs::read_to_string(dir.join("cgroup"))
                .ok()
                .and_then(|text| parse_cgroup_file(&text))
            else {
                continue;
            };
            if !uids.contains(&pod.uid) {
                continue;
            }
            let start_time = std::fs::read_to_string(dir.join("stat"))
                .ok()
                .and_then(|stat| start_time(&stat))
                .unwrap_or(u64::MAX);
            let candidates = found.entry(pod.uid).or_default();
            let candidate = match candidates.iter_mut().find(|c| c.netns == netns) {
                Some(known) => known,
                None => {
                    candidates.push(FoundNetns {
                        pid,
                        path: path.clone(),
                        netns,
                        container_id: pod.container_id.clone(),
                        container_ids: BTreeSet::new(),
                        start_time,
                    });
                    candidates.last_mut().expect("just pushed")
                }
            };
            if (start_time, pid) < (candidate.start_time, candidate.pid) {
                candidate.pid = pid;
                candidate.path = path;
                candidate.start_time = start_time;
                candidate.container_id = pod.container_id.clone();
            }
            candidate.container_ids.extend(pod.container_id);
        }
        for candidates in found.values_mut() {
            candidates.sort_by_key(|c| (c.start_time, c.pid));
        }
        found
    }
}

/// Field 22 of `/proc/<pid>/stat` (`starttime`), counted after the command name, which
/// is in parentheses and may hold spaces and parentheses itself.
fn start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The pod a process belongs to, from its `/proc/<pid>/cgroup`: the cgroup v2 line
/// (`0::/path`) or any v1 hierarchy's (`<id>:<controllers>:/path`). A file whose lines
/// name different pods names none (not a kubelet layout we know).
pub fn parse_cgroup_file(text: &str) -> Option<PodCgroup> {
    let mut found: Option<PodCgroup> = None;
    for line in text.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let Some(pod) = parse_cgroup_path(path) else {
            continue;
        };
        match &found {
            None => found = Some(pod),
            Some(known) if known.uid == pod.uid => {}
            Some(_) => return None,
        }
    }
    found
}

/// The pod a cgroup path names (see the module documentation for the layouts).
pub fn parse_cgroup_path(path: &str) -> Option<PodCgroup> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let (at, uid) = components
        .iter()
        .enumerate()
        .find_map(|(i, component)| pod_uid_of(component).map(|uid| (i, uid)))?;
    let container_id = components.get(at + 1).map(|c| container_id_of(c));
    Some(PodCgroup { uid, container_id })
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of(component: &str) -> Option<String> {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let raw = match name.strip_prefix("pod") {
        Some(raw) => raw,
        None if name.starts_with("kubepods") => name.rsplit_once("-pod")?.1,
        None => return None,
    };
    canonical_uid(raw)
}

/// A UID of 8-4-4-4-12 hex digits separated by `-` (cgroupfs) or `_` (systemd, which
/// reserves `-` for the slice hierarchy), in its API form: lowercase, dashes.
fn canonical_uid(raw: &str) -> Option<String> {
    let groups: Vec<&str> = raw.split(['-', '_']).collect();
    let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lengths != [8, 4, 4, 4, 12]
        || !groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return None;
    }
    Some(groups.join("-").to_ascii_lowercase())
}

/// A container's cgroup name without the runtime's decoration: `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `docker-<id>.scope` (systemd driver), or `<id>` (cgroupfs).
fn container_id_of(component: &str) -> String {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    ["cri-containerd-", "crio-", "docker-", "cri-o-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name)
        .to_owned()
}

/// The interface of the calling thread's netns that holds `ip` (run it inside a pod's
/// netns with [`super::PodNetns::run_blocking`]).
pub fn interface_with(ip: Ipv4Addr) -> std::io::Result<Option<String>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    for ifaddr in addrs {
        let held = ifaddr
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .map(|sin| sin.ip());
        if held == Some(ip) {
            return Ok(Some(ifaddr.interface_name));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";

    fn pod(container: Option<&str>) -> Option<PodCgroup> {
        Some(PodCgroup {
            uid: UID.into(),
            container_id: container.map(str::to_owned),
        })
    }

    #[test]
    fn cgroupfs_driver_paths() {
        let cid = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}/{cid}")),
            pod(Some(cid))
        );
        // Guaranteed pods have no QoS level; a nested runtime (kind) adds a prefix.
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{UID}/{cid}")),
            pod(Some(cid))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/docker/8d46/kubepods/besteffort/pod{UID}/{cid}")),
            pod(Some(cid))
        );
        // Read from inside a cgroup namespace.
        assert_eq!(
            parse_cgroup_path(&format!("/../../pod{UID}/{cid}")),
            pod(Some(cid))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}")),
            pod(None)
        );
        // Uppercase hex (not kubelet's, but a UID all the same) is made canonical.
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{}/c", UID.to_uppercase())),
            pod(Some("c"))
        );
    }

    #[test]
    fn systemd_driver_paths() {
        let underscored = UID.replace('-', "_");
        let cid = "b2a102854b4969b2ce98dc329c86b4fb2b06e4ad2cc8da9d8a7578c9cd2004a2";
        for (runtime, qos) in [
            (
                "cri-containerd",
                "kubepods-burstable.slice/kubepods-burstable",
            ),
            ("crio", "kubepods-besteffort.slice/kubepods-besteffort"),
            ("docker", "kubepods"),
        ] {
            let path =
                format!("/kubepods.slice/{qos}-pod{underscored}.slice/{runtime}-{cid}.scope");
            assert_eq!(parse_cgroup_path(&path), pod(Some(cid)), "{path}");
        }
    }

    #[test]
    fn paths_that_name_no_pod() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/kubepods/besteffort",
            "/kubepods.slice/kubepods-besteffort.slice",
            // Not a UID: wrong group lengths, not hex.
            "/kubepods/besteffort/pod2c48913c-b29f-11e7-9350-02096814779/c",
            "/kubepods/besteffort/podzz48913c-b29f-11e7-9350-020968147796/c",
            "/kubepods/besteffort/pod2c48913cb29f11e79350020968147796/c",
            // A pod-like name outside kubelet's naming.
            "/system.slice/mypod-2c48913c-b29f-11e7-9350-020968147796.scope",
        ] {
            assert_eq!(parse_cgroup_path(path), None, "{path}");
        }
    }

    #[test]
    fn cgroup_files_of_v1_and_v2() {
        let v2 = format!("0::/kubepods/besteffort/pod{UID}/abc\n");
        assert_eq!(parse_cgroup_file(&v2), pod(Some("abc")));
        let v1 = format!(
            "12:pids:/kubepods/besteffort/pod{UID}/abc\n\
             11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/abc\n\
             1:name=systemd:/kubepods/besteffort/pod{UID}/abc\n\
             0::/\n"
        );
        assert_eq!(parse_cgroup_file(&v1), pod(Some("abc")));
        assert_eq!(parse_cgroup_file("0::/system.slice/sshd.service\n"), None);
        // Two pods in one file is no layout kubelet makes: trust neither.
        let other = "0::/kubepods/pod11111111-2222-3333-4444-555555555555/x\n";
        assert_eq!(parse_cgroup_file(&format!("{v2}{other}")), None);
    }

    #[test]
    fn start_time_skips_odd_command_names() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 \
                    777 1000 10 18446744073709551615";
        assert_eq!(start_time(stat), Some(777));
        assert_eq!(start_time("42 (x) S 1"), None);
    }

    /// A fixture `/proc`: per pid, `ns/net` links to one of the files in `netns/`, a
    /// cgroup file and a stat file with the start time.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::create_dir(dir.path().join("netns")).expect("netns dir");
            Self { dir }
        }

        fn proc_root(&self) -> PathBuf {
            self.dir.path().join("proc")
        }

        fn netns(&self, name: &str) -> NetnsId {
            let path = self.dir.path().join("netns").join(name);
            if !path.exists() {
                std::fs::write(&path, name).expect("netns file");
            }
            NetnsId::of(&path).expect("stat")
        }

        fn process(&self, pid: u32, netns: &str, cgroup: &str, start: u64) {
            self.netns(netns);
            let dir = self.proc_root().join(pid.to_string());
            std::fs::create_dir_all(dir.join("ns")).expect("pid dir");
            std::os::unix::fs::symlink(
                self.dir.path().join("netns").join(netns),
                dir.join("ns/net"),
            )
            .expect("ns/net");
            std::fs::write(dir.join("cgroup"), format!("0::{cgroup}\n")).expect("cgroup");
            let stat = format!("{pid} (proc) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0");
            std::fs::write(dir.join("stat"), stat).expect("stat");
        }
    }

    fn uids(list: &[&str]) -> HashSet<String> {
        list.iter().map(|u| u.to_string()).collect()
    }

    #[test]
    fn finds_the_oldest_process_of_each_pod_netns() {
        let fx = Fixture::new();
        let other = "11111111-2222-3333-4444-555555555555";
        let hostnet = "66666666-7777-8888-9999-aaaaaaaaaaaa";
        let host = fx.netns("host");
        fx.process(1, "host", "/init.scope", 1);
        // The pod: its sandbox (pid 300, oldest) and an app container, one netns.
        fx.process(
            310,
            "pod-a",
            &format!("/kubepods/besteffort/pod{UID}/app"),
            50,
        );
        fx.process(
            300,
            "pod-a",
            &format!("/kubepods/besteffort/pod{UID}/sandbox"),
            40,
        );
        fx.process(
            320,
            "pod-a",
            &format!("/kubepods/besteffort/pod{UID}/app"),
            60,
        );
        // Another pod we do not look for.
        fx.process(400, "pod-b", &format!("/kubepods/pod{other}/x"), 10);
        // A hostNetwork pod: its processes are in the host netns.
        fx.process(500, "host", &format!("/kubepods/pod{hostnet}/y"), 5);
        // Not a process directory.
        std::fs::create_dir_all(fx.proc_root().join("sys")).expect("sys");

        let scanner = ProcScanner::new(fx.proc_root(), host);
        let found = scanner.find(&uids(&[UID, hostnet]));
        assert_eq!(found.len(), 1, "{found:?}");
        let candidates = &found[UID];
        assert_eq!(candidates.len(), 1, "one netns, however many processes");
        let pod_a = &candidates[0];
        assert_eq!(pod_a.pid, 300);
        assert_eq!(pod_a.path, fx.proc_root().join("300/ns/net"));
        assert_eq!(pod_a.netns, fx.netns("pod-a"));
        assert_eq!(pod_a.container_id.as_deref(), Some("sandbox"));
        assert_eq!(
            pod_a.container_ids.iter().collect::<Vec<_>>(),
            ["app", "sandbox"]
        );
        // Nothing asked for, nothing read.
        assert!(scanner.find(&HashSet::new()).is_empty());
    }

    #[test]
    fn several_netns_of_one_pod_are_all_candidates_oldest_first() {
        let fx = Fixture::new();
        let host = fx.netns("host");
        fx.process(20, "elsewhere", &format!("/kubepods/pod{UID}/debugger"), 90);
        fx.process(10, "pod", &format!("/kubepods/pod{UID}/sandbox"), 30);
        let found = ProcScanner::new(fx.proc_root(), host).find(&uids(&[UID]));
        let pids: Vec<u32> = found[UID].iter().map(|c| c.pid).collect();
        assert_eq!(pids, [10, 20]);
    }

    #[test]
    fn the_host_scanner_never_reports_its_own_netns() {
        // Every process of this test runs in its netns: whatever their cgroups say, none
        // is a candidate.
        let scanner = ProcScanner::host().expect("/proc");
        let own =
            parse_cgroup_file(&std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup"));
        if let Some(own) = own {
            assert!(scanner.find(&uids(&[&own.uid])).is_empty());
        }
        assert!(scanner.find(&uids(&[UID])).is_empty());
    }
}
