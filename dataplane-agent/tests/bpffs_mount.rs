//! `--bpffs /sys/fs/bpf/...` works where /sys/fs/bpf is not mounted (minimal
//! VMs, containers, `ip netns exec`): the agent mounts a bpffs there first.
//!
//! Needs root. The test reruns itself in a private mount namespace (and a
//! network namespace that goes away with it) with a fresh sysfs on /sys, as
//! `ip netns exec` does, so the host's /sys/fs/bpf is never touched.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use dataplane_agent::node::bpffs::{ensure_bpffs, BPFFS_ROOT};
use nix::sys::statfs::{statfs, BPF_FS_MAGIC};

/// Set in the rerun inside the private mount namespace: the pin directory.
const CHILD_DIR_ENV: &str = "DATAPLANE_BPFFS_TEST_DIR";
const TEST_NAME: &str = "pins_under_sys_fs_bpf_where_it_is_not_mounted";

fn is_bpffs(dir: &Path) -> bool {
    statfs(dir).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}

#[test]
fn pins_under_sys_fs_bpf_where_it_is_not_mounted() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        in_private_mount_namespace(Path::new(&dir));
        return;
    }
    let dir = PathBuf::from(BPFFS_ROOT).join(format!("dataplane-test-{}", std::process::id()));
    let host_root_was_bpffs = is_bpffs(Path::new(BPFFS_ROOT));

    let out = Command::new("unshare")
        // A network namespace of its own too: sysfs shows one network
        // namespace, and the kernel will not mount the host's sysfs over itself.
        .args(["--mount", "--net", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t sysfs sysfs /sys && exec "$0" "$@""#)
        .arg(std::env::current_exe().expect("test binary path"))
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, &dir)
        .output()
        .expect("running unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the rerun in a private mount namespace failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    // Nothing leaked onto the host: the mounts stayed in the namespace.
    assert_eq!(is_bpffs(Path::new(BPFFS_ROOT)), host_root_was_bpffs);
    assert!(!dir.exists(), "{} appeared on the host", dir.display());
}

fn in_private_mount_namespace(dir: &Path) {
    let root = Path::new(BPFFS_ROOT);
    assert!(
        !is_bpffs(root),
        "precondition: the fresh sysfs has no bpffs at {BPFFS_ROOT}"
    );

    ensure_bpffs(dir).unwrap_or_else(|e| panic!("ensure_bpffs({}): {e:?}", dir.display()));

    assert!(is_bpffs(root), "a bpffs is mounted at {BPFFS_ROOT}");
    assert!(dir.is_dir() && is_bpffs(dir));
    // Idempotent: a second start finds it mounted.
    ensure_bpffs(dir).expect("ensure_bpffs a second time");
}
