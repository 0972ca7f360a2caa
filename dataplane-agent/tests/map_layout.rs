//! The agent adopts maps a previous agent pinned only when their layout is
//! its own (older layouts are migrated, `upgrade.rs`): a newer layout or a
//! flow map of a shape no layout had is refused with an error that says
//! what to do, instead of being reused as if it matched (which aya would
//! do).
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs);
//! foreign maps are made with bpftool.

use std::{path::Path, process::Command};

use aya::maps::{Array, Map, MapData};
use dataplane_agent::node::{bpffs::ensure_bpffs, datapath::Datapath};
use dataplane_common::{map_names, LAYOUT_VERSION};
use nix::mount::{umount2, MntFlags};
use tempfile::TempDir;

/// A bpffs mounted on a temporary directory, unmounted when dropped.
struct Bpffs(TempDir);

impl Bpffs {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("layout-test-")
            .tempdir()
            .expect("temporary directory");
        ensure_bpffs(dir.path()).expect("mounting a bpffs for the test");
        Self(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = umount2(self.0.path(), MntFlags::MNT_DETACH);
    }
}

/// Pins a map made by bpftool (as another release would have made it).
fn bpftool_map(dir: &Path, name: &str, kind: &str, key: u32, value: u32, entries: u32) {
    let status = Command::new("bpftool")
        .args(["map", "create"])
        .arg(dir.join(name))
        .args([
            "type",
            kind,
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
        ])
        .args(["entries", &entries.to_string(), "name", name])
        .status()
        .expect("running bpftool");
    assert!(status.success(), "bpftool map create {name}");
}

fn load_error(dir: &Path) -> String {
    match Datapath::load(dir) {
        Ok(_) => panic!("the datapath adopted maps of another layout"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_conntrack_map_of_no_known_layout_is_refused() {
    let bpffs = Bpffs::new();
    // Unversioned (layout 1), but its entries are not layout 1's.
    bpftool_map(
        bpffs.path(),
        map_names::CONNTRACK,
        "lru_hash",
        16,
        40,
        1_024,
    );

    let error = load_error(bpffs.path());

    assert!(
        error.contains("CONNTRACK cannot be migrated")
            && error.contains("value size is 40, layout 1 has 48")
            && error.contains("dataplane-agent cleanup"),
        "{error}"
    );
}

#[test]
fn maps_of_a_newer_layout_version_are_refused() {
    let bpffs = Bpffs::new();
    bpftool_map(bpffs.path(), map_names::LAYOUT, "array", 4, 4, 1);
    let map = MapData::from_pin(bpffs.path().join(map_names::LAYOUT)).expect("LAYOUT");
    let mut layout: Array<MapData, u32> = Array::try_from(Map::Array(map)).expect("an array");
    layout
        .set(0, LAYOUT_VERSION + 1, 0)
        .expect("writing a version");

    let error = load_error(bpffs.path());

    assert!(
        error.contains(&format!(
            "layout version {}, newer than this agent's {LAYOUT_VERSION}",
            LAYOUT_VERSION + 1
        )),
        "{error}"
    );
}

#[test]
fn pinned_map_of_another_shape_is_refused_and_named() {
    let bpffs = Bpffs::new();
    {
        let _first = Datapath::load(bpffs.path()).expect("first load");
    }
    // Replace the pinned TCP conntrack with one of another entry size.
    std::fs::remove_file(bpffs.path().join(map_names::CT_TCP)).expect("unpinning");
    bpftool_map(bpffs.path(), map_names::CT_TCP, "lru_hash", 16, 40, 1_024);

    let error = load_error(bpffs.path());

    assert!(
        error.contains("CT_TCP cannot be migrated")
            && error.contains("value size is 40")
            && error.contains("48"),
        "{error}"
    );
}

#[test]
fn a_restarted_agent_adopts_the_maps_of_its_own_layout() {
    let bpffs = Bpffs::new();
    {
        let _first = Datapath::load(bpffs.path()).expect("first load");
    }

    let second = Datapath::load(bpffs.path());

    assert!(second.is_ok(), "{:#}", second.err().unwrap());
    let map = MapData::from_pin(bpffs.path().join(map_names::LAYOUT)).expect("LAYOUT pinned");
    let layout: Array<MapData, u32> = Array::try_from(Map::Array(map)).expect("an array");
    assert_eq!(layout.get(&0, 0).expect("version"), LAYOUT_VERSION);
}

#[test]
fn bpftool_dumps_pinned_maps_with_field_names() {
    let bpffs = Bpffs::new();
    let (_datapath, mut maps) = Datapath::load(bpffs.path()).expect("loading the datapath");
    let entry = dataplane_common::CtEntry {
        client_port: 40_000u16.to_be(),
        proto: dataplane_common::IPPROTO_TCP,
        ..Default::default()
    };
    maps.conntrack
        .insert(entry.original_key(), entry, 0)
        .expect("a conntrack entry");

    let out = Command::new("bpftool")
        .args(["--json", "map", "dump", "pinned"])
        .arg(bpffs.path().join(map_names::CT_TCP))
        .output()
        .expect("running bpftool");

    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for field in [
        "\"src_port\"",
        "\"direction\"",
        "\"client_addr\"",
        "\"state\"",
        "\"flags\"",
    ] {
        assert!(dump.contains(field), "{field} missing from {dump}");
    }
}
