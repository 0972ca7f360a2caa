//! Per-node cgroup v2 subtrees: each lab node's host processes (and the
//! pod clients the tests run as processes) live in a cgroup of their own,
//! and the node's agent attaches its socket hooks there, so two agents on
//! one machine never translate each other's sockets, nor anything else the
//! machine runs.
//!
//! The node cgroups live in a cgroup2 mount of the lab's own,
//! [`LAB_CGROUP2`], outside /sys: agents run under `ip netns exec`, which
//! remounts /sys and hides the machine's cgroup2 mount from them.

use std::{
    fs::OpenOptions,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// Where the lab mounts the cgroup2 hierarchy (once per machine; the same
/// hierarchy as the machine's own mount, only visible to the agents).
pub const LAB_CGROUP2: &str = "/run/dplab/cgroup2";

fn is_cgroup2_mount(path: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let path = path.to_string_lossy();
    mountinfo.lines().any(|line| {
        line.split_once(" - ").is_some_and(|(mount, fs)| {
            fs.split_whitespace().next() == Some("cgroup2")
                && mount.split_whitespace().nth(4) == Some(path.as_ref())
        })
    })
}

/// Mounts cgroup2 at [`LAB_CGROUP2`] unless it already is.
pub fn ensure_lab_cgroup2() -> anyhow::Result<PathBuf> {
    let root = PathBuf::from(LAB_CGROUP2);
    if is_cgroup2_mount(&root) {
        return Ok(root);
    }
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    crate::netns::run("mount", &["-t", "cgroup2", "cgroup2", LAB_CGROUP2])
        .context("mounting the lab's cgroup2")?;
    Ok(root)
}

/// The cgroup of the node whose network namespace is `node_ns`.
pub fn node_cgroup(node_ns: &str) -> PathBuf {
    Path::new(LAB_CGROUP2).join(node_ns)
}

/// Creates the node's cgroup (and the lab's cgroup2 mount if needed).
pub fn create_node_cgroup(node_ns: &str) -> anyhow::Result<PathBuf> {
    ensure_lab_cgroup2()?;
    let path = node_cgroup(node_ns);
    match std::fs::create_dir(&path) {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(path),
        Err(e) => Err(e).with_context(|| format!("creating cgroup {}", path.display())),
    }
}

/// Removes a node's cgroup: processes still in it are moved to the root
/// cgroup first (a cgroup with members cannot be removed).
pub fn remove_node_cgroup(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!("removing cgroup {}: {e}", path.display());
                return;
            }
            Err(_) => {
                let members =
                    std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
                let root_procs = Path::new(LAB_CGROUP2).join("cgroup.procs");
                for pid in members.split_whitespace() {
                    let _ = std::fs::write(&root_procs, pid);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Makes `cmd` start inside the cgroup `path`: the child moves itself
/// there (writing "0" to `cgroup.procs`) before it executes the program.
pub fn spawn_in_cgroup(cmd: &mut Command, path: &Path) -> anyhow::Result<()> {
    let procs = OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", path.display()))?;
    // SAFETY: the closure runs in the forked child before exec; it only
    // makes write(2) calls (no allocation, no locks) on a descriptor the
    // closure owns, so it is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || (&procs).write_all(b"0"));
    }
    Ok(())
}
