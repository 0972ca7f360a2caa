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

/// Variables that rustup's proxy and `cargo run` set for xtask. A child
/// cargo that inherits them would use this toolchain's compiler for every
/// nested build, including aya-build's `rustup run debian-bpf cargo`
/// (../shared/TOOLCHAIN.md), so they are cleared.
const INHERITED: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "CARGO",
    "CARGO_TARGET_DIR",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUST_RECURSION_COUNT",
    "OUT_DIR",
];

/// Clears what rustup and the parent cargo put in the environment.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for var in INHERITED {
        cmd.env_remove(var);
    }
    for (var, _) in std::env::vars_os() {
        if var.to_str().is_some_and(|v| v.starts_with("CARGO_PKG_")) {
            cmd.env_remove(var);
        }
    }
    cmd
}

/// A cargo command at the workspace root with a clean environment.
pub fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(args).current_dir(workspace_root());
    clean_env(&mut cmd);
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

/// The agent (with the eBPF object embedded by its build.rs) and the lab's
/// backend server, in target/release.
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

/// Only the lab's backend server (`lab up --no-agent`).
pub fn build_lab_server() -> anyhow::Result<()> {
    status(cargo(&[
        "build",
        "--release",
        "-p",
        "dataplane-lab",
        "--bin",
        "lab-server",
    ]))
}

/// `dplab COMMAND ARGS` (dataplane-lab's lab commands), built in release
/// like `lab-server` beside it, with the agent in DATAPLANE_AGENT_BIN (the
/// caller's, or target/release's).
pub fn dplab(command: &str, args: &[String]) -> Command {
    let mut cmd = cargo(&[
        "run",
        "--quiet",
        "--release",
        "-p",
        "dataplane-lab",
        "--bin",
        "dplab",
        "--",
        command,
    ]);
    cmd.args(args);
    if std::env::var_os("DATAPLANE_AGENT_BIN").is_none() {
        cmd.env("DATAPLANE_AGENT_BIN", agent_binary());
    }
    cmd
}
