//! The bpffs directory where maps and links are pinned.

use std::path::{Path, PathBuf};

use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

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

/// Makes sure `dir` is on a bpffs, mounting one there if it is not (inside
/// `ip netns exec`, for instance, /sys/fs/bpf is not one).
pub fn ensure_bpffs(dir: &Path) -> Result<(), BpffsError> {
    std::fs::create_dir_all(dir).map_err(|source| BpffsError::Create {
        dir: dir.to_owned(),
        source,
    })?;
    let on_bpffs = statfs(dir)
        .map_err(|source| BpffsError::Statfs {
            dir: dir.to_owned(),
            source,
        })?
        .filesystem_type()
        == BPF_FS_MAGIC;
    if !on_bpffs {
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
    }
    Ok(())
}
