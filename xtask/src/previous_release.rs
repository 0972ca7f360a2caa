//! The previous release's agent, for the test that upgrades from it
//! (`tests/tests/changes.rs`): built once from git into target/ and reused.

use std::path::PathBuf;

use anyhow::{bail, Context as _};

use crate::cargo::{clean_env, status, workspace_root};

/// The last commit of main whose maps were of layout 7
/// (`git log --first-parent -S'LAYOUT_VERSION: u32 = 7'`): the release an
/// upgrade to layout 8 starts from. Its Cargo.lock is today's, so the
/// registry cache CI already has builds it. Move it with every layout bump.
const COMMIT: &str = "8fb31a82fd902f6325460499e8c9c6cfef40a92e";

/// Where the agent of `COMMIT` is built: a source tree from `git archive`
/// and a target directory of its own, so this workspace's build artifacts
/// are never replaced by the old ones.
fn build_dir() -> PathBuf {
    workspace_root()
        .join("target/previous-release")
        .join(COMMIT)
}

/// The previous release's agent, built if it is not there yet. A second
/// run finds the binary and starts no cargo at all.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    let dir = build_dir();
    let binary = dir.join("target/release/dataplane-agent");
    if binary.is_file() {
        return Ok(binary);
    }
    let source = dir.join("source");
    if !source.join("Cargo.toml").is_file() {
        extract(&source)?;
    }
    let mut cmd = std::process::Command::new("cargo");
    clean_env(&mut cmd);
    cmd.args(["build", "--release", "--locked", "-p", "dataplane-agent"])
        .arg("--target-dir")
        .arg(dir.join("target"))
        .current_dir(&source);
    status(cmd).context("building the previous release's agent")?;
    eprintln!("built {}", binary.display());
    Ok(binary)
}

/// Writes `COMMIT`'s tree into `source` (through a temporary directory, so
/// an interrupted extraction is not taken for a finished one).
fn extract(source: &std::path::Path) -> anyhow::Result<()> {
    let partial = source.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let archive = std::process::Command::new("git")
        .args(["archive", "--format=tar", COMMIT])
        .current_dir(workspace_root())
        .output()
        .context("running git archive")?;
    if !archive.status.success() {
        bail!(
            "git archive {COMMIT} failed (a shallow clone lacks the previous release; \
             fetch with full history): {}",
            String::from_utf8_lossy(&archive.stderr).trim()
        );
    }
    let mut tar = std::process::Command::new("tar")
        .args(["-x", "-C"])
        .arg(&partial)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("starting tar")?;
    {
        use std::io::Write as _;
        let mut stdin = tar.stdin.take().expect("tar's stdin is piped");
        stdin
            .write_all(&archive.stdout)
            .context("writing the archive to tar")?;
    }
    let extracted = tar.wait().context("waiting for tar")?;
    if !extracted.success() {
        bail!("tar could not extract {COMMIT}'s tree ({extracted})");
    }
    std::fs::rename(&partial, source)
        .with_context(|| format!("moving {} to {}", partial.display(), source.display()))
}
