//! Running cargo and other tools from xtask.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// A cargo command at the workspace root. The rustup proxy's RUSTC and
/// friends are cleared so nested builds (aya-build's `rustup run
/// debian-bpf cargo`) pick their own compiler.
pub fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(args).current_dir(workspace_root());
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

pub fn status(mut cmd: Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

pub fn agent_binary() -> PathBuf {
    workspace_root().join("target/release/dataplane-agent")
}

pub fn build_release() -> anyhow::Result<()> {
    status(cargo(&[
        "build",
        "--release",
        "-p",
        "dataplane-agent",
        "-p",
        "dataplane-lab",
    ]))?;
    eprintln!("built {}", agent_binary().display());
    Ok(())
}
