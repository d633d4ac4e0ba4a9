//! The bpffs directory where the agent pins its programs and maps.
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::statfs::{statfs, BPF_FS_MAGIC};

use super::DatapathError;

/// Where bpffs lives on every mainstream distribution.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    statfs(path)
        .map(|s| s.filesystem_type() == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Make sure `pin_dir` exists on a bpffs. On a host that never mounted bpffs at
/// `/sys/fs/bpf`, mount it there, as Cilium's agent does.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
    let err = |reason: String| DatapathError::Bpffs {
        path: pin_dir.display().to_string(),
        reason,
    };
    let parent = pin_dir
        .parent()
        .ok_or_else(|| err("pin directory has no parent".into()))?;
    if !is_bpffs(parent) {
        // Mounting is only ever done on the conventional location; anywhere else the
        // operator chose a path that should already be a bpffs.
        if parent != Path::new(DEFAULT_BPFFS) {
            return Err(err(format!("{} is not a bpf filesystem", parent.display())));
        }
        std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
        mount(
            Some("bpffs"),
            parent,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| err(format!("mounting bpffs on {}: {e}", parent.display())))?;
    }
    std::fs::create_dir_all(pin_dir).map_err(|e| err(e.to_string()))?;
    if !is_bpffs(pin_dir) {
        return Err(err("not on a bpf filesystem".into()));
    }
    Ok(())
}

/// Remove every pin under `pin_dir` and the directory itself. Missing is fine.
pub fn remove_pin_dir(pin_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(pin_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
