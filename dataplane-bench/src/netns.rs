//! Network namespaces the bench creates, removed on drop (also on panic),
//! and commands run inside them without `ip netns exec`'s overhead.

use std::{
    fs::File,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use dataplane_lab::netns::ip;

static IPTABLES_RESTORE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Chooses the iptables-restore binary (legacy or nf_tables backend).
pub fn set_iptables_restore(program: &str) {
    let _ = IPTABLES_RESTORE.set(program.to_owned());
}

pub fn iptables_restore() -> &'static str {
    IPTABLES_RESTORE
        .get()
        .map_or("iptables-legacy-restore", String::as_str)
}

/// A network namespace with a name unique to this process.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "dpb{}x{}{tag}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        run_in(
            &self.name,
            "sh",
            &["-c", &format!("echo {value} > {path}")],
            None,
        )?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Runs `program` in netns `ns` (setns before exec), feeding it `stdin`;
/// returns the wall time from spawn to exit.
pub fn run_in(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<Duration> {
    let file = File::open(format!("/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    let fd = file.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setns is a plain syscall, async-signal-safe, and touches
    // nothing of the parent's state; `fd` stays open until after spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
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
    drop(file);
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
