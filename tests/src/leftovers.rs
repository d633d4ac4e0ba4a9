//! Removing what killed or crashed runs left behind. Only names with the testbed prefixes
//! whose owning pid is dead are touched, so side-by-side runs never disturb each other.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::names::{self, BPFFS_ROOT, DIR_PREFIX, NETNS_PREFIX, STATE_ROOT};
use crate::{cgroup, netns};

fn warn(what: &str, e: impl std::fmt::Display) {
    eprintln!("interceptor-testbed: removing leftover {what}: {e}");
}

/// Entries of `dir` named `<prefix><pid>-<n>` (node a, state dirs) or
/// `<prefix><pid>-<n>-<node>` (the other nodes' cgroups and bpffs dirs), for dead owners.
fn leftover_dirs(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| {
        let e = e.ok()?;
        let name = e.file_name().into_string().ok()?;
        // The rest after the id is empty or `-<node>` (parse_id checks).
        let (pid, id, _) = names::parse_id(name.strip_prefix(prefix)?)?;
        names::is_leftover(pid, id).then(|| e.path())
    })
    .collect()
}

/// Must run under the testbed lock, so no testbed is being created meanwhile.
pub(crate) fn clean(cgroup_root: &Path) {
    // Processes first: they may hold the namespaces and pins below.
    for dir in leftover_dirs(cgroup_root, DIR_PREFIX) {
        if let Err(e) = cgroup::remove(&dir, Duration::from_secs(5)) {
            warn("cgroup", format!("{e:#}"));
        }
    }
    for name in netns::list() {
        let Some(parsed) = name.strip_prefix(NETNS_PREFIX).and_then(names::parse_id) else {
            continue;
        };
        let (pid, id, _) = parsed;
        if names::is_leftover(pid, id) {
            if let Err(e) = netns::delete(&name) {
                warn("netns", format!("{e:#}"));
            }
        }
    }
    for dir in leftover_dirs(Path::new(BPFFS_ROOT), DIR_PREFIX) {
        if let Err(e) = fs::remove_dir_all(&dir) {
            warn(&dir.display().to_string(), e);
        }
    }
    for dir in leftover_dirs(Path::new(STATE_ROOT), "") {
        if let Err(e) = fs::remove_dir_all(&dir) {
            warn(&dir.display().to_string(), e);
        }
    }
}
