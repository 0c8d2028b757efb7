//! Shared helpers: start a real server on 127.0.0.1 with ephemeral ports.
#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use clap::Parser;
use turnpike::config::{ServeArgs, Settings};
use turnpike::runtime::Handle;
use turnpike_client::client::{Channel, ClientTransport, TurnClient};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ServeArgs,
}

pub const USER: &str = "alice";
pub const PASSWORD: &str = "wonderland";

/// Starts a server on 127.0.0.1 (UDP/TCP and TLS on ephemeral ports) with
/// user alice, plus `extra` flags.
pub fn start(extra: &[&str]) -> Handle {
    let mut argv = vec!["turnpike"];
    if !extra.contains(&"--listen") {
        argv.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    }
    argv.extend_from_slice(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--user",
        "alice:wonderland",
        "--realm",
        "test.example",
        "--log-level",
        "warn",
    ]);
    if !extra.contains(&"--threads") {
        argv.extend_from_slice(&["--threads", "2"]);
    }
    argv.extend_from_slice(extra);
    let args = Cli::parse_from(argv).args;
    let settings = Settings::from_args(args).expect("valid settings");
    turnpike::runtime::start(&settings).expect("server starts")
}

pub fn transports(h: &Handle) -> Vec<(ClientTransport, SocketAddr)> {
    vec![
        (ClientTransport::Udp, h.listen[0]),
        (ClientTransport::Tcp, h.listen[0]),
        (
            ClientTransport::Tls {
                pinned: h.tls_leaf.clone(),
            },
            h.tls_listen[0],
        ),
    ]
}

pub fn client(t: &ClientTransport, addr: SocketAddr, user: &str, pw: &str) -> TurnClient {
    let ch = Channel::connect(t, addr, Duration::from_secs(3)).expect("connect");
    TurnClient::new(ch, user, pw)
}

/// A UDP "peer" on loopback.
pub fn peer() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// A redis-server on a free loopback port, stopped (by PID) when dropped.
pub struct Redis(pub std::process::Child, pub u16);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn redis_server() -> Redis {
    assert!(
        std::path::Path::new("/usr/bin/redis-server").exists(),
        "redis-server not found: install Debian's redis-server package, as .ci/run does"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("/usr/bin/redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Redis(child, port)
}
