//! Running commands and code inside network namespaces.

use std::{fs::File, process::Command};

use anyhow::{bail, Context as _};
use nix::sched::{setns, CloneFlags};

/// Runs `ip` with `args`, failing with the command line and its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `args` inside netns `ns` (`ip netns exec`).
pub fn exec(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    ip(&full)
}

pub fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    exec(ns, &["sysctl", "-qw", &format!("{key}={value}")])
}

/// Runs `f` on a new thread that has joined netns `ns`: sockets it opens
/// live in that namespace. The calling thread is untouched.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    spawn_in_netns(ns, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns {ns} panicked"))
}

pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<T>> {
    let file =
        File::open(format!("/run/netns/{ns}")).with_context(|| format!("opening netns {ns}"))?;
    let ns = ns.to_owned();
    Ok(std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
        f()
    }))
}

/// Names of existing network namespaces.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}
