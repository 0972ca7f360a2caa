//! The bpffs directory where maps and links are pinned.

use std::path::{Path, PathBuf};

use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

/// Where the host's bpffs lives. Missing on minimal VMs, in containers and
/// under `ip netns exec` (which mounts a fresh sysfs over /sys); sysfs
/// refuses mkdir there, so nothing below it can be created until a bpffs is
/// mounted, as Cilium's agent does.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("creating {}", dir.display())]
    Create {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("statfs {}", dir.display())]
    Statfs {
        dir: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("mounting a bpffs at {}", dir.display())]
    Mount {
        dir: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Makes sure `dir` is on a bpffs. Under /sys/fs/bpf, mounts one at
/// /sys/fs/bpf when it is not there; elsewhere (or if that still is not
/// enough), mounts one at `dir` itself.
pub fn ensure_bpffs(dir: &Path) -> Result<(), BpffsError> {
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) {
        mount_bpffs_unless_present(root)?;
    }
    mount_bpffs_unless_present(dir)
}

/// Creates `dir` and mounts a bpffs there unless it already is on one.
fn mount_bpffs_unless_present(dir: &Path) -> Result<(), BpffsError> {
    std::fs::create_dir_all(dir).map_err(|source| BpffsError::Create {
        dir: dir.to_owned(),
        source,
    })?;
    if is_bpffs(dir)? {
        return Ok(());
    }
    mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| BpffsError::Mount {
        dir: dir.to_owned(),
        source,
    })?;
    log::info!("mounted a bpffs at {}", dir.display());
    Ok(())
}

fn is_bpffs(dir: &Path) -> Result<bool, BpffsError> {
    let fs = statfs(dir).map_err(|source| BpffsError::Statfs {
        dir: dir.to_owned(),
        source,
    })?;
    Ok(fs.filesystem_type() == BPF_FS_MAGIC)
}
