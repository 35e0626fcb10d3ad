//! How a co-located engine uses the zero-copy local path, timed: starts a
//! node in-process (host tier only), connects a `LocalClient` over its Unix
//! socket, puts and gets a batch of blocks, verifies them, and prints GB/s
//! next to a plain memcpy of the same sizes.
//!
//! `cargo run --release -p kvfabric --example local_path -- [block-bytes] [blocks]`

use kvfabric::client::{Durability, LocalClient, LocalPut};
use kvfabric::server::{ByteSize, Node, Settings};
use std::time::Instant;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let size: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1 << 20);
    let blocks: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let batch = 16.min(blocks);
    let dir = tempfile::tempdir()?;
    let mut s = Settings {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    s.host.capacity = ByteSize((size * blocks * 2) as u64);
    s.disk.capacity = ByteSize(0);
    let node = Node::build(s).await?.start().await?;
    let client = LocalClient::connect(node.local_socket.as_ref().expect("local path on")).await?;

    let values: Vec<Vec<u8>> = (0..blocks)
        .map(|i| (0..size).map(|j| (i * 31 + j * 7) as u8).collect())
        .collect();
    let keys: Vec<Vec<u8>> = (0..blocks as u64).map(|i| i.to_be_bytes().to_vec()).collect();
    // Warm the arena pages once (first touch is the kernel's cost, not ours).
    for (k, v) in keys.iter().zip(&values).take(batch) {
        client
            .put_many("warm", &[LocalPut::new(k, v)], Durability::Memory)
            .await?;
    }
    client
        .put_many("warm", &[LocalPut::new(b"x", &values[0])], Durability::Memory)
        .await?;

    // Three rounds of puts (overwrites): the first touches fresh arena pages,
    // the last shows the steady state.
    let mut put = 0.0;
    for round in 0..3 {
        let t = Instant::now();
        for (ks, vs) in keys.chunks(batch).zip(values.chunks(batch)) {
            let puts: Vec<LocalPut<'_>> = ks.iter().zip(vs).map(|(k, v)| LocalPut::new(k, v)).collect();
            client.put_many("bench", &puts, Durability::Memory).await?;
        }
        put = t.elapsed().as_secs_f64();
        println!("put round {round}: {:.2} GB/s", (size * blocks) as f64 / 1e9 / put);
    }

    // Where a put's time goes: the client's copy + hash alone.
    if std::env::var_os("KVFABRIC_EXAMPLE_BREAKDOWN").is_some() {
        let lens = vec![size as u64; batch];
        let mut copy = 0.0;
        let mut rtt = 0.0;
        for vs in values.chunks(batch) {
            let t = Instant::now();
            let slots = client.reserve(&lens[..vs.len()]).await?;
            rtt += t.elapsed().as_secs_f64();
            let t = Instant::now();
            for (r, v) in slots.iter().zip(vs) {
                client.write(r, v)?;
            }
            copy += t.elapsed().as_secs_f64();
            client.abort(slots).await?;
        }
        let gb = (size * blocks) as f64 / 1e9;
        println!(
            "breakdown: copy+hash {:.2} GB/s, reserve round trips {:.1} us each",
            gb / copy,
            rtt * 1e6 / (blocks / batch) as f64
        );
    }

    let mut out: Vec<Vec<u8>> = (0..blocks).map(|_| vec![0u8; size]).collect();
    for b in &mut out {
        b.fill(1); // fault the destination pages in before timing
    }
    let t = Instant::now();
    for (ks, os) in keys.chunks(batch).zip(out.chunks_mut(batch)) {
        let kr: Vec<&[u8]> = ks.iter().map(|k| k.as_slice()).collect();
        let mut bufs: Vec<&mut [u8]> = os.iter_mut().map(|b| b.as_mut_slice()).collect();
        client.get_many_into("bench", &kr, &mut bufs).await?;
    }
    let get = t.elapsed().as_secs_f64();
    anyhow::ensure!(out == values, "read back different bytes");

    let mut dst: Vec<Vec<u8>> = (0..blocks).map(|_| vec![1u8; size]).collect();
    let t = Instant::now();
    for (d, v) in dst.iter_mut().zip(&values) {
        d.copy_from_slice(v);
    }
    let memcpy = t.elapsed().as_secs_f64();
    std::hint::black_box(&dst);

    let gb = (size * blocks) as f64 / 1e9;
    println!(
        "{blocks} x {size} B, batches of {batch}: put {:.2} GB/s, get {:.2} GB/s, memcpy {:.2} GB/s (put {:.2}x, get {:.2}x memcpy)",
        gb / put,
        gb / get,
        gb / memcpy,
        memcpy / put,
        memcpy / get
    );
    node.shutdown().await;
    Ok(())
}
