//! Shared helpers for the fabric integration tests: start a real node on a
//! free loopback port over a temporary data directory.

#![allow(dead_code, unreachable_pub)]

use kvfabric::client::Client;
use kvfabric::server::{ByteSize, Node, NodeHandle, Settings};
use std::path::Path;

/// Settings for a test node: free loopback ports, data under `dir`, small tiers.
pub fn settings(dir: &Path, host: u64, disk: u64) -> Settings {
    let mut s = Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    s.host.capacity = ByteSize(host);
    s.disk.capacity = ByteSize(disk);
    s
}

/// Starts a node and connects a client to it.
pub async fn start(s: Settings) -> (NodeHandle, Client) {
    let node = Node::build(s).await.expect("node builds");
    let handle = node.start().await.expect("node starts");
    let client = Client::connect(handle.endpoint()).await.expect("client connects");
    (handle, client)
}

/// Deterministic payload.
pub fn payload(seed: u64, len: usize) -> bytes::Bytes {
    kvfabric_tiers::conformance::payload(seed, len)
}

/// GET `path` from the node's HTTP (metrics / health) listener; the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}
