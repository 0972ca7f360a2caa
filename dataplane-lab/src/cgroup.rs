//! Per-node cgroup v2 subtrees: each lab node's host processes (and the
//! pod clients the tests run as processes) live in a cgroup of their own,
//! and the node's agent attaches its socket hooks there, so two agents on
//! one machine never translate each other's sockets, nor anything else the
//! machine runs.
//!
//! The node cgroups live in a cgroup2 mount of the lab's own,
//! [`LAB_CGROUP2`], outside /sys: agents run under `ip netns exec`, which
//! remounts /sys and hides the machine's cgroup2 mount from them. Labs,
//! tests and benchmarks running at once share that mount; whoever removes
//! the last node cgroup of any of them unmounts it, so nothing stays
//! changed on the machine. A lock file orders creating a node cgroup
//! against that unmount.

use std::{
    fs::{File, OpenOptions},
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

/// Held while the mount is made or unmounted and node cgroups are created
/// or removed.
const LOCK_FILE: &str = "/run/dplab/cgroup2.lock";

/// Name prefixes of the namespaces, and so the node cgroups, of the tests
/// (`topology::unique_prefix`), the lab (`dplab`) and the benchmark
/// (`netns::Netns`): while one of these cgroups exists, the mount is in
/// use. A name, not a count, so that a run that was killed, or one of an
/// older build that counts nothing, is not unmounted under.
const USER_PREFIXES: [&str; 3] = ["dpt", "dplab-", "dpn"];

/// An exclusive `flock` on [`LOCK_FILE`], released when dropped.
struct MountLock {
    _file: nix::fcntl::Flock<File>,
}

impl MountLock {
    fn take() -> anyhow::Result<Self> {
        let dir = Path::new(LOCK_FILE)
            .parent()
            .expect("the lock has a directory");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .with_context(|| format!("opening {LOCK_FILE}"))?;
        let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {LOCK_FILE}"))?;
        Ok(Self { _file: file })
    }
}

/// Whether a child of the lab's mount, `name`, is a node cgroup of a lab,
/// test or benchmark.
fn is_user(name: &str) -> bool {
    USER_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// The node cgroups under a cgroup2 mount at `root`.
fn users(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_user(name))
        .collect()
}

/// Unmounts [`LAB_CGROUP2`] if no node cgroup is left in it. Called with
/// the lock held.
fn unmount_if_unused(_lock: &MountLock) {
    let root = Path::new(LAB_CGROUP2);
    if !is_cgroup2_mount(root) || !users(root).is_empty() {
        return;
    }
    // Lazily: a process may still have its working directory or a
    // descriptor there (the hierarchy itself lives on in /sys/fs/cgroup).
    if let Err(e) = nix::mount::umount2(root, nix::mount::MntFlags::MNT_DETACH) {
        eprintln!("unmounting {LAB_CGROUP2}: {e}");
    }
}

/// Whether [`LAB_CGROUP2`] is mounted now.
pub fn is_lab_cgroup2_mounted() -> bool {
    is_cgroup2_mount(Path::new(LAB_CGROUP2))
}

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

/// Mounts cgroup2 at [`LAB_CGROUP2`] unless it already is. Called with
/// the lock held.
fn ensure_lab_cgroup2(_lock: &MountLock) -> anyhow::Result<PathBuf> {
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
/// `node_ns` must start with one of [`USER_PREFIXES`], or the mount would
/// not know it is used.
pub fn create_node_cgroup(node_ns: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        is_user(node_ns),
        "node cgroup {node_ns}: not named like a lab's namespace ({USER_PREFIXES:?})"
    );
    let lock = MountLock::take()?;
    ensure_lab_cgroup2(&lock)?;
    let path = node_cgroup(node_ns);
    match std::fs::create_dir(&path) {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(path),
        Err(e) => Err(e).with_context(|| format!("creating cgroup {}", path.display())),
    }
}

/// Removes a node's cgroup: processes still in it are moved to the root
/// cgroup first (a cgroup with members cannot be removed). The lab's mount
/// goes with the last node cgroup.
pub fn remove_node_cgroup(path: &Path) {
    let lock = MountLock::take();
    remove_cgroup_dir(path);
    match lock {
        Ok(lock) => unmount_if_unused(&lock),
        Err(e) => eprintln!("{e:#}"),
    }
}

fn remove_cgroup_dir(path: &Path) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_cgroup2_mount_goes_with_its_last_node_cgroup() {
        let first = create_node_cgroup(&format!("dpt{}cgroup-a", std::process::id())).unwrap();
        let second = create_node_cgroup(&format!("dpt{}cgroup-b", std::process::id())).unwrap();
        assert!(is_lab_cgroup2_mounted());
        remove_node_cgroup(&first);
        assert!(!first.exists());
        assert!(
            is_lab_cgroup2_mounted(),
            "unmounted under {}",
            second.display()
        );
        remove_node_cgroup(&second);
        // Other tests and labs of this machine may be running: the mount
        // stays exactly while a node cgroup of theirs does.
        let _lock = MountLock::take().unwrap();
        let others = users(Path::new(LAB_CGROUP2));
        assert_eq!(is_lab_cgroup2_mounted(), !others.is_empty(), "{others:?}");
    }

    #[test]
    fn node_cgroups_are_named_like_the_labs_namespaces() {
        assert!(is_user("dpt123x0-node1"));
        assert!(is_user("dplab-node2"));
        assert!(is_user("dpn77x3node"));
        assert!(!is_user("system.slice"));
        assert!(create_node_cgroup("mynode").is_err());
    }
}
