//! Graceful termination under BPF_PROG_TEST_RUN, as kube-proxy does it: an
//! endpoint that turns terminating (still listed in its EndpointSlice) keeps
//! its established connections, and only new connections avoid it; once it
//! has left every slice, its connections are reset. Maps are filled through
//! the agent's sync engine, as in `datapath.rs`.
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs).

use std::net::SocketAddrV4;

use dataplane_agent::control::model::{BackendAddr, Protocol};
use dataplane_common::Counter;
use dataplane_testkit::datapath::{addr, Harness, TC_ACT_OK};
use dataplane_testkit::packets::{assert_translated, endpoints, Tcp, ACK, PSH, SYN};

fn service() -> SocketAddrV4 {
    addr([10, 96, 0, 10], 80)
}

fn old_pod() -> SocketAddrV4 {
    addr([10, 244, 2, 10], 8080)
}

fn new_pod() -> SocketAddrV4 {
    addr([10, 244, 2, 11], 8080)
}

fn client(port: u16) -> SocketAddrV4 {
    addr([10, 244, 1, 10], port)
}

/// `old_pod` terminating but still listed, `new_pod` ready.
fn with_old_pod_terminating(dp: &mut Harness) {
    dp.set_service_with("web", service(), Protocol::Tcp, &[new_pod()], |spec| {
        spec.draining = vec![BackendAddr {
            ip: (*old_pod().ip()).into(),
            port: old_pod().port(),
        }];
    });
}

#[test]
fn terminating_endpoint_keeps_established_connections_and_gets_no_new_ones() {
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[old_pod()]);
    let syn = Tcp::new(client(40_000), service(), SYN).build();
    let run = dp.run_from_pod(&syn);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(&syn, &run.output, client(40_000), old_pod(), "SYN");

    with_old_pod_terminating(&mut dp);
    let data = Tcp::new(client(40_000), service(), ACK | PSH)
        .seq(1)
        .ack(1)
        .payload(b"GET / HTTP/1.1\r\n\r\n")
        .build();
    let run = dp.run_from_pod(&data);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(
        &data,
        &run.output,
        client(40_000),
        old_pod(),
        "data of the established connection",
    );
    assert_eq!(dp.counter(Counter::ResetBackendGone), 0);

    for port in 40_001..40_021 {
        let syn = Tcp::new(client(port), service(), SYN).build();
        let run = dp.run_from_pod(&syn);
        assert_eq!(run.verdict, TC_ACT_OK);
        let (_, backend) = endpoints(&run.output);
        assert_eq!(backend, new_pod(), "new connection from port {port}");
    }
}

#[test]
fn endpoint_that_left_every_slice_has_its_connections_reset() {
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[old_pod()]);
    let syn = Tcp::new(client(40_000), service(), SYN).build();
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    with_old_pod_terminating(&mut dp);
    // The pod is gone from the slice: draining is over.
    dp.set_service("web", service(), Protocol::Tcp, &[new_pod()]);
    let data = Tcp::new(client(40_000), service(), ACK)
        .seq(1)
        .ack(1)
        .build();
    dp.run_from_pod(&data);
    assert_eq!(dp.counter(Counter::ResetBackendGone), 1);
}
