//! `cargo xtask setup`: everything the build needs, installed only when
//! missing (see ../shared/TOOLCHAIN.md for why this toolchain). Every other
//! command runs it first; when all is present it only asks dpkg, bpf-linker
//! and rustup, which takes well under a second.

use std::process::Command;

use anyhow::Context as _;

use crate::cargo::{clean_env, status};

/// Debian packages: the BPF-capable rustc and its prebuilt `core`, LLVM for
/// bpf-linker, and the tools the lab, tests and benchmarks drive.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    // The lab turns veth offloads off (checksums, GRO) with it.
    "ethtool",
    "iptables",
    "nftables",
    "curl",
    "tcpdump",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const TOOLCHAIN: &str = "debian-bpf";

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run() -> anyhow::Result<()> {
    apt_packages()?;
    bpf_linker()?;
    toolchain_link()
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    status(apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    status(install)
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = output("bpf-linker", &["--version"]).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} for LLVM 22 (a few minutes)");
    let mut cmd = Command::new("cargo");
    clean_env(&mut cmd);
    cmd.args([
        "install",
        "bpf-linker",
        "--force",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ])
    // Without it the build finds an older llvm-config and fails with
    // `unable to find library -lLLVM` (TOOLCHAIN.md).
    .env("LLVM_PREFIX", LLVM_PREFIX)
    // Away from the workspace's .cargo/config.toml.
    .current_dir(std::env::temp_dir());
    status(cmd)
}

fn toolchain_link() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])
        .context("`rustup toolchain list` failed: is rustup installed?")?;
    if toolchains
        .lines()
        .any(|l| l.split_whitespace().next() == Some(TOOLCHAIN))
    {
        return Ok(());
    }
    eprintln!("setup: linking Debian's rustc as rustup toolchain {TOOLCHAIN}");
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "link", TOOLCHAIN, "/usr"]);
    status(cmd)
}
