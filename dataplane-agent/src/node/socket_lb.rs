//! Socket-level load balancing: the cgroup v2 socket hooks (`connect4`,
//! `sendmsg4`, `recvmsg4`, `getpeername4` and their IPv6 namesakes)
//! attached at the root of the node's cgroup tree, so every process below
//! it, pods and host-network alike, has its service connections translated
//! once, at the socket; and `sock_release`, which deletes a closing
//! socket's reverse-map entry.
//!
//! The links are pinned under `<bpffs>/sock-links/` like the tc links:
//! a restarted agent attaches its own programs next to them and then
//! unpins the old ones, so no socket goes untranslated in between.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    pin::PinError,
    programs::{
        links::{CgroupAttachMode, FdLink, LinkError},
        CgroupSock, CgroupSockAddr, CgroupSockAddrAttachType, ProgramError,
    },
    sys::SyscallError,
    Ebpf,
};
use log::{info, warn};

use crate::node::verify::load_uninterrupted;

/// The socket hooks: program name in the object, and the pin name of its
/// link (the kernel's name of the hook).
pub const HOOKS: [(&str, &str, CgroupSockAddrAttachType); 4] = [
    (
        "sock4_connect",
        "connect4",
        CgroupSockAddrAttachType::Connect4,
    ),
    (
        "sock4_sendmsg",
        "sendmsg4",
        CgroupSockAddrAttachType::UDPSendMsg4,
    ),
    (
        "sock4_recvmsg",
        "recvmsg4",
        CgroupSockAddrAttachType::UDPRecvMsg4,
    ),
    (
        "sock4_getpeername",
        "getpeername4",
        CgroupSockAddrAttachType::GetPeerName4,
    ),
];

/// The IPv6 socket hooks, as [`HOOKS`]. Attached beside the IPv4 ones; a
/// kernel refusing them leaves IPv6 (and IPv4-mapped addresses on AF_INET6
/// sockets) to the packet path, and the IPv4 hooks in place.
pub const HOOKS6: [(&str, &str, CgroupSockAddrAttachType); 4] = [
    (
        "sock6_connect",
        "connect6",
        CgroupSockAddrAttachType::Connect6,
    ),
    (
        "sock6_sendmsg",
        "sendmsg6",
        CgroupSockAddrAttachType::UDPSendMsg6,
    ),
    (
        "sock6_recvmsg",
        "recvmsg6",
        CgroupSockAddrAttachType::UDPRecvMsg6,
    ),
    (
        "sock6_getpeername",
        "getpeername6",
        CgroupSockAddrAttachType::GetPeerName6,
    ),
];

/// `sock_release` (program name, pin name of its link): deletes the
/// `SOCK_REVNAT`/`LB6_SOCK_REVNAT` entry of a socket that `connect()` made
/// as the socket closes, so under connection churn the LRU maps do not sit
/// full of closed sockets and every connect() pays for an eviction. Attached
/// after the other hooks; a kernel refusing it (before 5.9) costs only
/// that: closed sockets' entries then age out of the LRU. Unconnected UDP's
/// per-datagram entries always do (see the eBPF `sock_release`).
pub const RELEASE: (&str, &str) = ("sock_release", "sock_release");

/// Subdirectory of the bpffs directory holding the pinned socket hook links.
pub const SOCK_LINKS_DIR: &str = "sock-links";

/// Where the agent mounts a cgroup2 hierarchy of its own when none is
/// visible (e.g. inside `ip netns exec`, which remounts /sys), under its run
/// directory, as Cilium does.
pub const CGROUP2_SUBDIR: &str = "cgroupv2";

#[derive(Debug, thiserror::Error)]
pub enum SocketLbError {
    #[error("program {name} missing from the eBPF object")]
    MissingProgram { name: &'static str },
    /// The kernel refused the program: most likely it lacks the hook (or
    /// a helper it uses, e.g. `bpf_set_retval` before 5.18).
    #[error("loading the socket hook {name} (kernel without cgroup socket hooks?)")]
    Unsupported {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {name} to the cgroup {}", root.display())]
    Attach {
        name: &'static str,
        root: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("{name}: expected a bpf_link")]
    NotFdLink {
        name: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("{name}: pinning the link at {}", path.display())]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("mounting cgroup2 at {}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{what} {}", path.display())]
    Fs {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn fs_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SocketLbError {
    let path = path.to_owned();
    move |source| SocketLbError::Fs { what, path, source }
}

/// Mount points of cgroup2 in `mountinfo` (the text of /proc/self/mountinfo).
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
            let (mount, fs) = line.split_once(" - ")?;
            let fstype = fs.split_whitespace().next()?;
            let root = mount.split_whitespace().nth(3)?;
            let point = mount.split_whitespace().nth(4)?;
            (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape_octal(point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if let Some(v) = escaped {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup the hooks attach to: `explicit` if given, else the root of
/// the cgroup2 hierarchy as mounted here, else one the agent mounts under
/// `run_dir`.
pub fn resolve_cgroup_root(
    explicit: Option<&Path>,
    run_dir: &Path,
) -> Result<PathBuf, SocketLbError> {
    if let Some(root) = explicit {
        return Ok(root.to_owned());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(fs_err("reading", Path::new("/proc/self/mountinfo")))?;
    if let Some(root) = cgroup2_mounts(&mountinfo).into_iter().next() {
        return Ok(root);
    }
    let path = run_dir.join(CGROUP2_SUBDIR);
    std::fs::create_dir_all(&path).map_err(fs_err("creating", &path))?;
    nix::mount::mount(
        Some("cgroup2"),
        &path,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| SocketLbError::Mount {
        path: path.clone(),
        source,
    })?;
    info!(
        "no cgroup2 mount visible: mounted one at {}",
        path.display()
    );
    Ok(path)
}

/// Loads the socket hooks and attaches them to `cgroup_root`, pinning the
/// links under `links_dir`; links a previous agent pinned there are
/// replaced once the new ones are in place. Hooks named in `refused` (by
/// their kernel name, e.g. `connect4`, or `sock_release`) are refused as a
/// kernel without them refuses them: the test switch
/// `--test-refuse-socket-hooks`, so the fallback to the tc path can be
/// tested on a kernel that has them all.
pub fn attach(
    ebpf: &mut Ebpf,
    cgroup_root: &Path,
    links_dir: &Path,
    refused: &[String],
) -> Result<(), SocketLbError> {
    // Load every hook before attaching any: a kernel without one of them
    // gets none (the tc path then serves everything).
    load_all(ebpf, &HOOKS, refused)?;
    std::fs::create_dir_all(links_dir).map_err(fs_err("creating", links_dir))?;
    let cgroup = File::open(cgroup_root).map_err(fs_err("opening the cgroup", cgroup_root))?;
    attach_all(ebpf, &cgroup, cgroup_root, links_dir, &HOOKS)?;
    // The IPv6 hooks the same way, after the IPv4 ones are in place: a
    // kernel refusing one of them, or a failure attaching one, costs only
    // IPv6 at the socket.
    let ipv6 = load_all(ebpf, &HOOKS6, refused)
        .and_then(|()| attach_all(ebpf, &cgroup, cgroup_root, links_dir, &HOOKS6));
    if let Err(e) = ipv6 {
        // None left half attached (nor a previous agent's): the tc path
        // serves IPv6 whole.
        for &(_, pin_name, _) in &HOOKS6 {
            let _ = std::fs::remove_file(links_dir.join(pin_name));
        }
        warn!(
            "IPv6 socket hooks not attached, IPv6 services are served by the tc path (IPv4 ones attached): {:#}",
            anyhow::Error::from(e)
        );
    }
    if let Err(e) = attach_release(ebpf, &cgroup, cgroup_root, links_dir, refused) {
        let _ = std::fs::remove_file(links_dir.join(RELEASE.1));
        warn!(
            "sock_release not attached, closed sockets' reverse-map entries wait for LRU eviction (the other socket hooks attached): {:#}",
            anyhow::Error::from(e)
        );
    }
    info!(
        "socket-level load balancing attached to cgroup {}",
        cgroup_root.display()
    );
    Ok(())
}

/// Loads `sock_release`, attaches it to `cgroup` and pins its link.
fn attach_release(
    ebpf: &mut Ebpf,
    cgroup: &File,
    cgroup_root: &Path,
    links_dir: &Path,
    refused: &[String],
) -> Result<(), SocketLbError> {
    let (name, pin_name) = RELEASE;
    if refused.iter().any(|r| r == pin_name) {
        return Err(SocketLbError::Unsupported {
            name,
            source: refused_by_test_switch(),
        });
    }
    let program: &mut CgroupSock = ebpf
        .program_mut(name)
        .ok_or(SocketLbError::MissingProgram { name })?
        .try_into()
        .map_err(|source| SocketLbError::Program { name, source })?;
    load_uninterrupted(|| program.load())
        .map_err(|source| SocketLbError::Unsupported { name, source })?;
    let link = program
        .attach(cgroup, CgroupAttachMode::Single)
        .and_then(|id| program.take_link(id));
    pin_attached(link, name, pin_name, cgroup_root, links_dir)
}

/// Pins the link of a hook just attached (either program type: their link
/// types differ, both are bpf_links), or names the attach failure.
fn pin_attached<L>(
    link: Result<L, ProgramError>,
    name: &'static str,
    pin_name: &str,
    cgroup_root: &Path,
    links_dir: &Path,
) -> Result<(), SocketLbError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let link = link.map_err(|source| SocketLbError::Attach {
        name,
        root: cgroup_root.to_owned(),
        source,
    })?;
    let link =
        FdLink::try_from(link).map_err(|source| SocketLbError::NotFdLink { name, source })?;
    pin_link(link, name, pin_name, links_dir)
}

/// Pins `link` as `links_dir/pin_name`, in place of the link a previous
/// agent pinned there (which the kernel detaches once unpinned, after ours
/// is attached).
fn pin_link(
    link: FdLink,
    name: &'static str,
    pin_name: &str,
    links_dir: &Path,
) -> Result<(), SocketLbError> {
    let pin = links_dir.join(pin_name);
    match std::fs::remove_file(&pin) {
        Ok(()) => info!("{pin_name}: replaced the link a previous agent pinned"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fs_err("removing", &pin)(e)),
    }
    // On failure the link is dropped, which detaches it.
    link.pin(&pin).map_err(|source| SocketLbError::PinLink {
        name,
        path: pin.clone(),
        source,
    })?;
    Ok(())
}

/// What the kernel answers a program type or hook it lacks, for the hooks
/// `--test-refuse-socket-hooks` names.
fn refused_by_test_switch() -> ProgramError {
    ProgramError::SyscallError(SyscallError {
        call: "bpf_prog_load (refused by --test-refuse-socket-hooks)",
        io_error: std::io::Error::from_raw_os_error(libc::EINVAL),
    })
}

/// Attaches the loaded `hooks` to `cgroup` and pins their links.
fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &File,
    cgroup_root: &Path,
    links_dir: &Path,
    hooks: &[(&'static str, &str, CgroupSockAddrAttachType)],
) -> Result<(), SocketLbError> {
    for &(name, pin_name, _) in hooks {
        let program = program_mut(ebpf, name)?;
        // A bpf_link: the kernel takes no attach flags with it (EINVAL) and
        // always lets several links share a hook, so the previous agent's
        // stays attached until ours is, and other tools may attach theirs.
        let link = program
            .attach(cgroup, CgroupAttachMode::Single)
            .and_then(|id| program.take_link(id));
        pin_attached(link, name, pin_name, cgroup_root, links_dir)?;
    }
    Ok(())
}

fn load_all(
    ebpf: &mut Ebpf,
    hooks: &[(&'static str, &str, CgroupSockAddrAttachType)],
    refused: &[String],
) -> Result<(), SocketLbError> {
    for &(name, hook, _) in hooks {
        if refused.iter().any(|r| r == hook) {
            return Err(SocketLbError::Unsupported {
                name,
                source: refused_by_test_switch(),
            });
        }
        let program = program_mut(ebpf, name)?;
        load_uninterrupted(|| program.load())
            .map_err(|source| SocketLbError::Unsupported { name, source })?;
    }
    Ok(())
}

/// Unpins (and so detaches) every socket hook link under `links_dir`;
/// returns what was removed.
pub fn detach_pinned(links_dir: &Path) -> Result<Vec<PathBuf>, SocketLbError> {
    let mut removed = Vec::new();
    if !links_dir.is_dir() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir(links_dir).map_err(fs_err("reading", links_dir))? {
        let path = entry.map_err(fs_err("reading", links_dir))?.path();
        std::fs::remove_file(&path).map_err(fs_err("removing", &path))?;
        removed.push(path);
    }
    std::fs::remove_dir(links_dir).map_err(fs_err("removing", links_dir))?;
    Ok(removed)
}

/// `--socket-lb false`: hooks a previous agent left attached are removed,
/// so the tc path serves everything as asked.
pub fn detach_if_pinned(links_dir: &Path) {
    match detach_pinned(links_dir) {
        Ok(removed) if !removed.is_empty() => {
            info!(
                "socket-level load balancing off: removed {} pinned socket hooks",
                removed.len()
            );
        }
        Ok(_) => {}
        Err(e) => warn!("{:#}", anyhow::Error::from(e)),
    }
}

fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, SocketLbError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(SocketLbError::MissingProgram { name })?;
    program
        .try_into()
        .map_err(|source| SocketLbError::Program { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_mount_is_found_among_v1_hierarchies() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mounts(mountinfo),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
    }

    #[test]
    fn a_bind_mount_of_a_cgroup_below_the_root_is_not_the_root() {
        let mountinfo = "\
50 23 0:38 /kubepods /run/x rw,relatime - cgroup2 cgroup2 rw
51 23 0:38 / /run/my\\040cgroup rw,relatime shared:5 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mounts(mountinfo),
            vec![PathBuf::from("/run/my cgroup")]
        );
    }

    #[test]
    fn no_cgroup2_visible_gives_no_mount() {
        let mountinfo = "22 1 0:20 / /sys rw - sysfs sysfs rw\n";
        assert!(cgroup2_mounts(mountinfo).is_empty());
    }
}
