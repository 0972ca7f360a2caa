//! Builds the eBPF programs and lets the agent embed the object, so the agent
//! is one self-contained binary. Toolchain notes: ../shared/TOOLCHAIN.md.
//!
//! This runs the eBPF crate's cargo build the way `aya_build::build_ebpf`
//! does (same toolchain, target, flags and target directory), but keeps its
//! output: cargo shows a build script's output only as `warning:` lines, so
//! relaying the progress lines made every fresh build look wrong. The whole
//! output is shown when the eBPF build fails; on success only the eBPF
//! crate's own warnings are.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

/// The eBPF crate, and the name of its `[[bin]]`: the object embedded.
const PACKAGE: &str = "dataplane-ebpf";
const OBJECT: &str = "dataplane";
/// Debian's rustc-web, linked into rustup as `debian-bpf` by `cargo xtask
/// setup`: it ships a prebuilt `core` for bpfel-unknown-none.
const TOOLCHAIN: &str = "debian-bpf";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join(OBJECT);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // A fast check/clippy of userspace: embed an empty object, which the
        // agent refuses to load with a clear error.
        println!("cargo:warning=AYA_BUILD_SKIP=1; skipping eBPF build");
        if !object.exists() {
            std::fs::write(&object, b"").context("writing the empty eBPF placeholder")?;
        }
        return Ok(());
    }
    let root_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dataplane-ebpf");
    println!("cargo:rerun-if-changed={}", root_dir.display());
    let target_dir = out_dir.join("aya-build").join("target").join(PACKAGE);
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "big" => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    build_ebpf(target, &target_dir)?;
    let built = target_dir.join(target).join("release").join(OBJECT);
    std::fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    Ok(())
}

fn build_ebpf(target: &str, target_dir: &Path) -> anyhow::Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--package", PACKAGE])
        .args(["--bins", "--release", "--target", target])
        .arg("--message-format=short")
        .arg("--target-dir")
        .arg(target_dir);
    // RUSTC_BOOTSTRAP is a crate list here (.cargo/config.toml): the
    // prebuilt `core` is used. Only "1" (or the package's own name) asks
    // for build-std, which needs rust-src, as with aya-build.
    if env::var("RUSTC_BOOTSTRAP").is_ok_and(|v| v == "1" || v == PACKAGE) {
        cmd.args(["-Z", "build-std=core"]);
    }
    // The flags aya-build sets: the host's arch (for aya-ebpf's
    // architecture-specific helpers) and BTF.
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64"
    } else {
        &arch
    };
    let arch_cfg = format!("--cfg=bpf_target_arch=\"{arch}\"");
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        [arch_cfg.as_str(), "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
    );
    // The host compiler cargo runs this script with is not the BPF one.
    cmd.env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        // Shown by cargo, since this script fails.
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{stderr}");
        bail!(
            "building the eBPF programs ({cmd:?}) failed: {}",
            output.status
        );
    }
    // With short messages each diagnostic is one line.
    for line in stderr.lines().filter(|l| l.contains("warning:")) {
        println!("cargo:warning={line}");
    }
    Ok(())
}
