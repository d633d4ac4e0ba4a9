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

/// Remove the agent's pins from `pin_dir`, then the directory. Only names `is_known`
/// accepts are removed: a directory holding anything else (another tool's pins, or
/// a mistaken `--bpffs` such as the bpffs root) is refused, never emptied. Missing is fine.
pub fn remove_pin_dir(pin_dir: &Path, is_known: &dyn Fn(&str) -> bool) -> std::io::Result<()> {
    let refuse = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    let entries = match std::fs::read_dir(pin_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    if is_mount_point(pin_dir)? {
        return Err(refuse(format!(
            "{} is a mount point, not a pin directory of the agent's own",
            pin_dir.display()
        )));
    }
    let mut ours = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_known(&name) {
            return Err(refuse(format!(
                "{} holds {name:?}, which this agent does not make: not removing it",
                pin_dir.display()
            )));
        }
        ours.push(entry.path());
    }
    // Everything that can go goes, even past a failure: a pin left behind by the first
    // error could keep a link attached (half a data path).
    let mut first_error = None;
    for path in ours {
        let removed = if path.is_dir() {
            std::fs::remove_dir(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(error) = removed {
            first_error.get_or_insert(error);
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => std::fs::remove_dir(pin_dir),
    }
}

fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let Some(parent) = path.parent() else {
        return Ok(true);
    };
    Ok(std::fs::metadata(path)?.dev() != std::fs::metadata(parent)?.dev())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_known_pins_and_refuses_strangers() {
        let dir = tempfile::tempdir().unwrap();
        let pins = dir.path().join("pins");
        std::fs::create_dir(&pins).unwrap();
        std::fs::write(pins.join("ENROLLED_NETNS"), b"").unwrap();
        std::fs::write(pins.join("cilium_lxc"), b"").unwrap();
        let err = remove_pin_dir(&pins, &|n| n == "ENROLLED_NETNS").unwrap_err();
        assert!(err.to_string().contains("cilium_lxc"), "{err}");
        assert!(
            pins.join("ENROLLED_NETNS").exists(),
            "nothing may be removed on refusal"
        );
        std::fs::remove_file(pins.join("cilium_lxc")).unwrap();
        remove_pin_dir(&pins, &|n| n == "ENROLLED_NETNS").unwrap();
        assert!(!pins.exists());
        remove_pin_dir(&pins, &|n| n == "ENROLLED_NETNS").unwrap();
    }
}
