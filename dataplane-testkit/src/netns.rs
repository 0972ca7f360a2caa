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

/// Index and MAC address of interface `name` in the calling thread's
/// namespace.
pub fn link(name: &str) -> (u32, [u8; 6]) {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "dev", name])
        .output()
        .expect("ip");
    assert!(out.status.success(), "ip link show {name}");
    let text = String::from_utf8(out.stdout).expect("ip output");
    let index = text
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .unwrap_or_else(|| panic!("no index in {text}"));
    let mac = text
        .split("link/ether ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC in {text}"));
    let mut bytes = [0u8; 6];
    for (byte, part) in bytes.iter_mut().zip(mac.split(':')) {
        *byte = u8::from_str_radix(part, 16).expect("a MAC byte");
    }
    (index, bytes)
}
