//! Backend server for `cargo xtask lab`: answers TCP 8080 and UDP 5353 with
//! its pod name. Started with `ip netns exec POD lab-server NAME`.

fn main() -> std::io::Result<()> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "backend".into());
    dataplane_lab::traffic::serve(name)
}
