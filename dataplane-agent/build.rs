//! Builds the eBPF programs and lets main.rs embed the object, so the agent is
//! one self-contained binary. Toolchain notes: ../shared/TOOLCHAIN.md.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "dataplane-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../dataplane-ebpf"),
        ..Default::default()
    };
    // Debian's rustc-web (linked into rustup as `debian-bpf` by `cargo xtask
    // setup`) ships a prebuilt `core` for bpfel-unknown-none.
    aya_build::build_ebpf([ebpf], Toolchain::Custom("debian-bpf"))
        .context("building the eBPF programs")?;
    // With AYA_BUILD_SKIP (fast check/clippy of userspace) nothing was built:
    // embed an empty object, which the agent refuses to load with a clear error.
    let object = std::path::Path::new(&std::env::var("OUT_DIR")?).join("dataplane");
    if !object.exists() {
        std::fs::write(&object, b"").context("writing the empty eBPF placeholder")?;
    }
    Ok(())
}
