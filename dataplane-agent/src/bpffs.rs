//! The bpffs directory where maps are pinned.

use std::path::Path;

use anyhow::Context as _;
use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

/// Makes sure `dir` is on a bpffs, mounting one there if it is not (inside
/// `ip netns exec`, for instance, /sys/fs/bpf is not one).
pub fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let on_bpffs = statfs(dir)
        .with_context(|| format!("statfs {}", dir.display()))?
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
        .with_context(|| format!("mounting a bpffs at {}", dir.display()))?;
        log::info!("mounted a bpffs at {}", dir.display());
    }
    Ok(())
}
