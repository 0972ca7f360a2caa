//! One `dataplane-agent run` per lab node.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::netns::in_netns;

pub const HEALTHZ: &str = "127.0.0.1:10256";
pub const METRICS: &str = "127.0.0.1:10249";

/// The agent binary: `DATAPLANE_AGENT_BIN`, or the release build.
/// Whether `bin run` takes `--cgroup-root`, from its help text.
fn has_cgroup_root_flag(bin: &Path) -> anyhow::Result<bool> {
    let help = Command::new(bin)
        .args(["run", "--help"])
        .output()
        .with_context(|| format!("running {} run --help", bin.display()))?;
    Ok(String::from_utf8_lossy(&help.stdout).contains("--cgroup-root"))
}

pub fn agent_bin() -> PathBuf {
    std::env::var_os("DATAPLANE_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/dataplane-agent")
        })
}

pub struct Agent {
    child: Option<Child>,
    /// The node cgroup this agent's start created (no lab made it), removed
    /// when the agent is dropped.
    created_cgroup: Option<PathBuf>,
    pub log: PathBuf,
    pub node_ns: String,
}

/// `GET path` on the agent's `addr` inside `ns`: the whole HTTP response.
fn http_get(ns: &str, addr: &'static str, path: &'static str) -> Option<String> {
    in_netns(ns, move || -> Option<String> {
        let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        Some(response)
    })
    .ok()
    .flatten()
}

/// Status code of `GET /healthz` inside `ns`, if the agent answers.
pub fn healthz_status(ns: &str) -> Option<u16> {
    http_get(ns, HEALTHZ, "/healthz")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The body of `GET /metrics` from the agent inside `ns`.
pub fn metrics_text(ns: &str) -> Option<String> {
    let response = http_get(ns, METRICS, "/metrics")?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

/// Where an agent reads Services and EndpointSlices from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// `--manifests DIR`
    Manifests(&'a Path),
    /// `--kubeconfig FILE` (an API server, e.g. [`crate::apiserver::ApiServer`]).
    Kubeconfig(&'a Path),
}

impl Agent {
    /// Starts the agent in `node_ns` and waits until /healthz says 200. It
    /// is stopped (SIGTERM) when the value is dropped.
    pub fn start(
        node_ns: &str,
        node_name: &str,
        manifests: &Path,
        bpffs: &Path,
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_with(node_ns, node_name, Source::Manifests(manifests), bpffs, log)
    }

    /// Like [`Agent::start`] with any source.
    pub fn start_with(
        node_ns: &str,
        node_name: &str,
        source: Source<'_>,
        bpffs: &Path,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut agent = Self::launch_with(node_ns, node_name, source, bpffs, log)?;
        agent.wait_healthy(Duration::from_secs(30))?;
        Ok(agent)
    }

    /// Starts the agent without waiting for it to be healthy (see
    /// [`Agent::wait_healthy`]).
    pub fn launch_with(
        node_ns: &str,
        node_name: &str,
        source: Source<'_>,
        bpffs: &Path,
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::launch_bin(&agent_bin(), node_ns, node_name, source, bpffs, log, &[])
    }

    /// [`Agent::launch_with`] another agent binary (an earlier release, for
    /// upgrades) and more `run` flags (e.g. `--socket-lb false`). The node's
    /// cgroup is passed as `--cgroup-root` to every agent that has the flag
    /// (releases before the socket hooks refuse it); one that has it must
    /// get it, or its hooks would attach to the machine's root cgroup.
    pub fn launch_bin(
        bin: &Path,
        node_ns: &str,
        node_name: &str,
        source: Source<'_>,
        bpffs: &Path,
        log: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn(bin, node_ns, node_name, source, bpffs, log, false, extra)
    }

    /// Like [`Agent::start`], in a process group of its own, so it outlives
    /// the caller and its terminal (`cargo xtask lab up`). Call
    /// [`Agent::detach`] to leave it running.
    pub fn start_detached(
        node_ns: &str,
        node_name: &str,
        manifests: &Path,
        bpffs: &Path,
        log: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut agent = Self::spawn(
            &agent_bin(),
            node_ns,
            node_name,
            Source::Manifests(manifests),
            bpffs,
            log,
            true,
            extra,
        )?;
        agent.wait_healthy(Duration::from_secs(30))?;
        Ok(agent)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "private: the public launchers name the cases"
    )]
    fn spawn(
        bin: &Path,
        node_ns: &str,
        node_name: &str,
        source: Source<'_>,
        bpffs: &Path,
        log: &Path,
        detached: bool,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        if !bin.exists() {
            bail!(
                "agent binary {} missing: run `cargo xtask build` (or set DATAPLANE_AGENT_BIN)",
                bin.display()
            );
        }
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        // The socket hooks attach to the node's cgroup, never to the
        // machine's root: other labs and the machine's own processes must
        // not be translated.
        let cgroup = crate::cgroup::node_cgroup(node_ns);
        let created_cgroup = if cgroup.is_dir() {
            None
        } else {
            Some(crate::cgroup::create_node_cgroup(node_ns)?)
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", node_ns]).arg(bin).arg("run");
        match source {
            Source::Manifests(dir) => cmd.arg("--manifests").arg(dir),
            Source::Kubeconfig(file) => cmd.arg("--kubeconfig").arg(file),
        };
        cmd.args([
            "--pod-ifaces",
            "veth*",
            "--node-name",
            node_name,
            "--healthz-bind-address",
            HEALTHZ,
            "--metrics-bind-address",
            METRICS,
        ])
        .arg("--bpffs")
        .arg(bpffs);
        // A test may name another cgroup root itself.
        if !extra.contains(&"--cgroup-root") && has_cgroup_root_flag(bin)? {
            cmd.arg("--cgroup-root").arg(&cgroup);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        if detached {
            cmd.process_group(0);
        }
        let child = cmd.spawn().context("starting the agent")?;
        Ok(Self {
            child: Some(child),
            created_cgroup,
            log: log.to_owned(),
            node_ns: node_ns.to_owned(),
        })
    }

    /// Waits until /healthz says 200; fails with the agent's log if it
    /// exits or `timeout` passes first.
    pub fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while healthz_status(&self.node_ns) != Some(200) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "agent in {} exited ({status}); its log {}:\n{}",
                    self.node_ns,
                    self.log.display(),
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent in {} not healthy after {timeout:?}; its log {}:\n{}",
                    self.node_ns,
                    self.log.display(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Leaves the agent running after this value is dropped (`lab up`).
    pub fn detach(mut self) {
        self.child = None;
        self.created_cgroup = None;
    }

    /// SIGTERM, then wait; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if let Some(cgroup) = self.created_cgroup.take() {
            crate::cgroup::remove_node_cgroup(&cgroup);
        }
    }
}
