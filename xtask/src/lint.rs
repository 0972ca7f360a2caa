//! `cargo xtask lint`: formatting and clippy, warnings as errors.

use crate::cargo::{cargo, status};

pub fn run() -> anyhow::Result<()> {
    status(cargo(&["fmt", "--all", "--check"]))?;
    let mut clippy = cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "dataplane-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    // Userspace only: the eBPF build is checked by `cargo xtask build`.
    clippy.env("AYA_BUILD_SKIP", "1");
    status(clippy)
}
