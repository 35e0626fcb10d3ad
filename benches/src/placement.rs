//! `kvfabric-bench placement`: the cluster's placement
//! (`kvfabric::placement`, weighted rendezvous hashing) simulated at sizes a
//! 2-core machine cannot run as processes: 100 and 1,000 nodes by default.
//!
//! For each node count N it places `--objects` objects of `--object-size`
//! bytes with `--replicas` copies over N equal nodes (the real placement
//! code, every object hashed), and reports:
//!
//! - **balance**: copies per node, max / mean and the coefficient of
//!   variation (what an operator sizes capacity headroom by);
//! - **node loss**: one node fails; every object it held a copy of is
//!   re-replicated from a surviving replica (the source) to the node that
//!   is next in that object's rendezvous order (the destination), so the
//!   factor is restored. The simulation sums bytes sent and received per
//!   node; with re-replication throttled to `--repl-gbps` per node in each
//!   direction, the time to restore the factor is the busiest node's bytes
//!   over that rate (transfers run in parallel across nodes);
//! - **join**: one node joins; the copies that move to it (it takes only,
//!   nothing moves between old nodes), and how long filling it takes at the
//!   same rate (it receives everything, so it is the bottleneck).
//!
//! Objects lost outright when the failed node held their only copy (factor
//! 1) are counted, not re-replicated.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use kvfabric::placement::{Placement, object_hash};
use kvfabric::size::ByteSize;

/// Options of `kvfabric-bench placement`.
#[derive(Args, Debug, Clone)]
pub(crate) struct PlacementOpts {
    /// Node counts; one run each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    nodes: Vec<usize>,
    /// Objects placed.
    #[arg(long, default_value_t = 1_000_000)]
    objects: usize,
    /// Copies per object.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Size of every object (a 16-token KV block of an 8B model is 2MiB).
    #[arg(long, default_value = "2MiB")]
    object_size: ByteSize,
    /// Re-replication bandwidth per node, each direction, GB/s (throttled
    /// so foreground traffic keeps its share of the NIC).
    #[arg(long, default_value_t = 1.0)]
    repl_gbps: f64,
    /// One JSON object per node count.
    #[arg(long)]
    json: bool,
}

/// One node count's results.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub(crate) nodes: usize,
    pub(crate) copies_max_over_mean: f64,
    pub(crate) copies_cv: f64,
    pub(crate) loss_objects: usize,
    pub(crate) loss_lost_outright: usize,
    pub(crate) loss_bytes: f64,
    pub(crate) loss_busiest_bytes: f64,
    pub(crate) loss_restore_s: f64,
    pub(crate) join_moved: usize,
    pub(crate) join_moved_between_old: usize,
    pub(crate) join_fill_s: f64,
}

fn members(n: usize) -> Vec<(String, f64)> {
    (0..n).map(|i| (format!("node-{i:04}"), 1.0)).collect()
}

/// Simulates one node count.
pub(crate) fn simulate(n: usize, objects: usize, replicas: usize, size: f64, gbps: f64) -> Result<Row> {
    if n < 2 {
        bail!("--nodes: at least 2 nodes");
    }
    let all = members(n);
    let p = Placement::new(all.clone())?;
    let victim = all[n / 2].0.clone();
    let survivors = Placement::new(all.iter().filter(|(id, _)| *id != victim).cloned())?;
    let joined = {
        let mut m = all.clone();
        m.push(("node-joining".into(), 1.0));
        Placement::new(m)?
    };
    let mut copies: HashMap<&str, u64> = p.nodes().map(|id| (id, 0)).collect();
    let mut sent: HashMap<String, f64> = HashMap::new();
    let mut recv: HashMap<String, f64> = HashMap::new();
    let (mut loss_objects, mut lost, mut join_moved, mut join_between_old) = (0, 0, 0, 0);
    for k in 0..objects {
        let h = object_hash("ns", &(k as u64).to_le_bytes());
        let owners = p.owners_of_hash(h, replicas);
        for o in &owners {
            *copies.get_mut(o).expect("an owner is a member") += 1;
        }
        if owners.iter().any(|o| *o == victim) {
            loss_objects += 1;
            let after = survivors.owners_of_hash(h, replicas);
            match owners.iter().find(|o| **o != victim) {
                None => lost += 1,
                Some(src) => {
                    for dst in after.iter().filter(|d| !owners.contains(d)) {
                        *sent.entry(src.to_string()).or_default() += size;
                        *recv.entry(dst.to_string()).or_default() += size;
                    }
                }
            }
        }
        let grown = joined.owners_of_hash(h, replicas);
        if grown != owners {
            if grown.contains(&"node-joining") {
                join_moved += 1;
            }
            let old_new: Vec<&&str> = grown.iter().filter(|g| **g != "node-joining").collect();
            if old_new.iter().any(|g| !owners.contains(g)) {
                join_between_old += 1;
            }
        }
    }
    let counts: Vec<f64> = copies.values().map(|&c| c as f64).collect();
    let mean = counts.iter().sum::<f64>() / counts.len() as f64;
    let max = counts.iter().cloned().fold(0.0, f64::max);
    let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / counts.len() as f64;
    let busiest = sent.values().chain(recv.values()).cloned().fold(0.0, f64::max);
    let bw = gbps * 1e9;
    Ok(Row {
        nodes: n,
        copies_max_over_mean: max / mean,
        copies_cv: var.sqrt() / mean,
        loss_objects,
        loss_lost_outright: lost,
        loss_bytes: recv.values().sum(),
        loss_busiest_bytes: busiest,
        loss_restore_s: busiest / bw,
        join_moved,
        join_moved_between_old: join_between_old,
        join_fill_s: join_moved as f64 * size / bw,
    })
}

/// Runs the simulation and prints the table (or JSON lines).
pub(crate) fn run(o: PlacementOpts) -> Result<()> {
    if o.objects == 0 || o.replicas == 0 {
        bail!("--objects and --replicas must be above zero");
    }
    if !(o.repl_gbps.is_finite() && o.repl_gbps > 0.0) {
        bail!("--repl-gbps must be a positive number");
    }
    let started = Instant::now();
    let size = o.object_size.0 as f64;
    let total = o.objects as f64 * o.replicas as f64 * size;
    if !o.json {
        println!(
            "# {} objects x {} copies x {} = {:.1} TB; re-replication throttled to {} GB/s per node and direction",
            o.objects,
            o.replicas,
            o.object_size,
            total / 1e12,
            o.repl_gbps
        );
        println!(
            "{:>6} {:>10} {:>8} {:>12} {:>8} {:>10} {:>12} {:>10} {:>10} {:>10} {:>9}",
            "nodes",
            "max/mean",
            "cv",
            "loss:objs",
            "lost",
            "moved TB",
            "busiest GB",
            "restore s",
            "join:objs",
            "old<->old",
            "fill s"
        );
    }
    for &n in &o.nodes {
        let r = simulate(n, o.objects, o.replicas, size, o.repl_gbps)?;
        if o.json {
            println!(
                "{}",
                serde_json::json!({
                    "nodes": r.nodes, "objects": o.objects, "replicas": o.replicas,
                    "object_bytes": o.object_size.0,
                    "copies_max_over_mean": r.copies_max_over_mean, "copies_cv": r.copies_cv,
                    "loss_objects": r.loss_objects, "loss_lost_outright": r.loss_lost_outright,
                    "loss_rereplicated_bytes": r.loss_bytes, "loss_busiest_node_bytes": r.loss_busiest_bytes,
                    "loss_restore_s": r.loss_restore_s,
                    "join_moved_objects": r.join_moved, "join_moved_between_old_nodes": r.join_moved_between_old,
                    "join_fill_s": r.join_fill_s,
                })
            );
        } else {
            println!(
                "{:>6} {:>10.3} {:>8.4} {:>12} {:>8} {:>10.3} {:>12.1} {:>10.1} {:>10} {:>10} {:>9.1}",
                r.nodes,
                r.copies_max_over_mean,
                r.copies_cv,
                r.loss_objects,
                r.loss_lost_outright,
                r.loss_bytes / 1e12,
                r.loss_busiest_bytes / 1e9,
                r.loss_restore_s,
                r.join_moved,
                r.join_moved_between_old,
                r.join_fill_s
            );
        }
    }
    eprintln!(
        "# placement simulation done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `--smoke`: a small run.
pub(crate) fn smoke() -> Result<()> {
    run(PlacementOpts {
        nodes: vec![10, 100],
        objects: 20_000,
        replicas: 2,
        object_size: ByteSize(2 << 20),
        repl_gbps: 1.0,
        json: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_restores_the_factor_from_survivors_and_join_only_takes() {
        let r = simulate(20, 20_000, 2, 1.0, 1.0).unwrap();
        // The victim held ~2/20 of the copies.
        assert!((1_600..2_400).contains(&r.loss_objects), "{r:?}");
        assert_eq!(r.loss_lost_outright, 0, "factor 2: a survivor always has a copy");
        assert_eq!(r.loss_bytes, r.loss_objects as f64, "one new copy per affected object");
        assert!(
            r.loss_busiest_bytes < r.loss_bytes / 5.0,
            "spread over the survivors: {r:?}"
        );
        assert_eq!(r.join_moved_between_old, 0, "a join moves nothing between old nodes");
        assert!((1_500..2_400).contains(&r.join_moved), "{r:?}");
        assert!(r.copies_max_over_mean < 1.15, "{r:?}");
        let single = simulate(20, 20_000, 1, 1.0, 1.0).unwrap();
        assert_eq!(
            single.loss_lost_outright, single.loss_objects,
            "factor 1: nothing to copy from"
        );
        assert_eq!(single.loss_bytes, 0.0);
    }
}
