//! Network namespaces: created and removed on drop ([`Netns`]), and
//! commands and code run inside them. The lab, the tests and the bench all
//! go through here.

use std::{
    fs::File,
    io::Write as _,
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use nix::sched::{setns, CloneFlags};

/// A network namespace with a name unique to this process (`TAG` last),
/// loopback up; removed when dropped, also on panic.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "dpn{}x{}{tag}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        sysctl(&self.name, key, value)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Runs `ip` with `args`, failing with the command line and its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    output(program, args).map(drop)
}

/// Runs `program` with `args`; its stdout, or an error with the command
/// line and its stderr.
pub fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
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
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The MAC address of interface `iface` in netns `ns`.
pub fn mac(ns: &str, iface: &str) -> anyhow::Result<String> {
    let text = output("ip", &["-n", ns, "-o", "link", "show", "dev", iface])?;
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("no link/ether in {text:?}"))
}

/// Sets the MAC address of interface `iface` in netns `ns`.
pub fn set_mac(ns: &str, iface: &str, mac: &str) -> anyhow::Result<()> {
    ip(&["-n", ns, "link", "set", "dev", iface, "address", mac])
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

/// Makes netns `ns` forward as a node does: IP forwarding on, and neither
/// ICMP redirects (a node forwards DNATed packets back out of the interface
/// they came in on, and must not tell pods to bypass it) nor reverse path
/// filtering (replies come back by other routes than requests).
pub fn forward_as_a_node(ns: &str) -> anyhow::Result<()> {
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.send_redirects", "0"),
        ("net.ipv4.conf.default.send_redirects", "0"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        sysctl(ns, key, value)?;
    }
    Ok(())
}

/// Runs `program` in netns `ns` (joined before exec, without `ip netns
/// exec`'s own cost), feeding it `stdin`; returns the wall time from spawn
/// to exit.
pub fn run_in(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<Duration> {
    let file = File::open(format!("/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the child runs only setns, a plain syscall that is
    // async-signal-safe and touches none of the parent's state; the file
    // lives in the closure, so its fd stays open until the exec.
    unsafe {
        cmd.pre_exec(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)?;
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped");
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing to {program}"))?;
    }
    let out = child.wait_with_output()?;
    let took = started.elapsed();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`{program} {}` in {ns} failed ({}): {}",
            args.join(" "),
            out.status,
            err.chars().take(2_000).collect::<String>()
        );
    }
    Ok(took)
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

/// Processes whose network namespace is `ns` (`ip netns pids`).
pub fn pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Stops every process living in the namespaces `names`: SIGTERM, up to
/// 10 s to exit (agents detach their programs), then SIGKILL.
pub fn kill_all(names: &[String]) {
    use nix::{
        sys::signal::{kill, Signal},
        unistd::Pid,
    };
    let me = std::process::id() as i32;
    let victims: Vec<Pid> = names
        .iter()
        .flat_map(|ns| pids(ns))
        .filter(|&p| p != me)
        .map(Pid::from_raw)
        .collect();
    for &pid in &victims {
        let _ = kill(pid, Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let alive = |pid: &Pid| kill(*pid, None).is_ok() && !is_zombie(*pid);
    while victims.iter().any(alive) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for pid in victims.iter().filter(|p| alive(p)) {
        let _ = kill(*pid, Signal::SIGKILL);
    }
}

/// A zombie (our own exited, not yet reaped child) counts as gone.
fn is_zombie(pid: nix::unistd::Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}
