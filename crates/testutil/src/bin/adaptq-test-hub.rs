//! The test hub as a process, for bench scripts:
//! `adaptq-test-hub --repo org/name=FOLDER [--rate BYTES_PER_S] [--token T] [--port P]`.
//! Prints `listening on http://127.0.0.1:PORT` and serves until killed.

use adaptq_testutil::hub_server::{repo_from_dir, HubServer, ServerConfig};
use std::path::Path;

fn main() {
    let mut cfg = ServerConfig::default();
    let mut port = 0u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--repo" => {
                let v = val();
                let (id, dir) = v.split_once('=').expect("--repo org/name=FOLDER");
                cfg.repos.push(repo_from_dir(
                    id,
                    "0123456789abcdef0123456789abcdef01234567",
                    Path::new(dir),
                ));
            }
            "--rate" => cfg.rate = Some(val().parse().expect("--rate bytes per second")),
            "--token" => cfg.token = Some(val()),
            "--port" => port = val().parse().expect("--port number"),
            "--static" => cfg.static_dir = Some(val().into()),
            other => panic!("unknown argument {other}"),
        }
    }
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let server = HubServer::serve(listener, cfg);
    println!("listening on {}", server.url());
    loop {
        std::thread::park();
    }
}
