//! A network namespace of a test's own for datapath tests whose programs
//! look routes and neighbours up (`bpf_fib_lookup`): a test run sees the
//! FIB of the calling thread's namespace.

/// Runs `f` on a thread of its own moved into a new network namespace with
/// its loopback up; the namespace goes with the thread.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        ip(&["link", "set", "lo", "up"]);
        f()
    })
    .join()
    .expect("test thread")
}

/// Runs `ip` with `args` in the calling thread's namespace; panics naming
/// the command when it fails.
pub fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("ip");
    assert!(status.success(), "ip {args:?}");
}

/// `m` as `ip` writes a MAC address.
pub fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
