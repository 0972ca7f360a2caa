//! `cargo xtask run`: the main job. Builds, then `dplab run` brings the lab
//! up and shows requests from a pod through the service IP, and leaves the
//! lab to explore.

use crate::{
    cargo::{dplab, status},
    lab::UpOptions,
};

pub fn run(options: UpOptions) -> anyhow::Result<()> {
    options.prepare()?;
    status(dplab("run", &options.args()))
}
