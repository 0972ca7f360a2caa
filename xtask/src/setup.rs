//! `cargo xtask setup`: everything the build needs, installed only when
//! missing (see ../shared/TOOLCHAIN.md for why this toolchain).

use std::process::Command;

use anyhow::Context as _;

use crate::cargo::status;

/// Debian packages: the BPF-capable rustc and its prebuilt `core`, LLVM for
/// bpf-linker, and the tools the lab, tests and benchmarks drive.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
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
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        eprintln!("setup: installing {}", missing.join(" "));
        status({
            let mut update = Command::new("apt-get");
            update.args(["update", "-q"]);
            update
        })?;
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing);
        install.env("DEBIAN_FRONTEND", "noninteractive");
        status(install)?;
    }

    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
        let mut cmd = Command::new("cargo");
        cmd.args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ]);
        // Without it the build finds an older llvm-config (TOOLCHAIN.md).
        cmd.env("LLVM_PREFIX", "/usr/lib/llvm-22");
        for var in ["RUSTC", "RUSTC_WRAPPER", "CARGO_TARGET_DIR"] {
            cmd.env_remove(var);
        }
        status(cmd)?;
    }

    let toolchains = output("rustup", &["toolchain", "list"]).context("rustup toolchain list")?;
    if !toolchains.lines().any(|l| l.starts_with(TOOLCHAIN)) {
        eprintln!("setup: linking Debian's rustc as rustup toolchain {TOOLCHAIN}");
        status({
            let mut cmd = Command::new("rustup");
            cmd.args(["toolchain", "link", TOOLCHAIN, "/usr"]);
            cmd
        })?;
    }
    Ok(())
}
