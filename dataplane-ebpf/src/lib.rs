#![no_std]
// The programs live in the `dataplane` binary target (src/main.rs); this empty
// library lets the workspace build on the host for `cargo check`.
