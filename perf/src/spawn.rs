//! `nefele-perf spawn`: starting a process and waiting for it, through the
//! node's procmgrd (over the fabric) against `posix_spawn` + `waitpid` of
//! the same binary, and — on a 3-node namespace cluster — on another node
//! (the caller's procmgrd forwards to the remote one, which reports the
//! exit back), interleaved in one run.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;

use crate::LatencyRow;
use procmgr::client::Placement;

/// The program both sides start: tiny, exits at once.
const PROGRAM: &str = "/bin/true";

pub fn run(quick: bool, json: bool, rounds: u64, cluster: bool) -> Result<()> {
    if !std::path::Path::new(PROGRAM).exists() {
        bail!("{PROGRAM} is needed as the spawned program");
    }
    let per_round = if quick { 100 } else { 1000 };
    let (_node, mut client) = embedded_node()?;
    let argv = [PROGRAM.to_string()];
    let mut bare = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut nefele = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut remote = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut three = crate::cluster::LocalCluster::three_with_client(cluster)?;
    // Warm every path (page cache, procmgrds' first connections).
    for _ in 0..10 {
        Command::new(PROGRAM).stdin(Stdio::null()).status()?;
        let p = client.spawn(PROGRAM, &argv, &[], 1)?[0];
        client.wait(Some(p), false)?;
        if let Some((_, c)) = three.as_mut() {
            let p = c.spawn_placed(PROGRAM, &argv, &[], 1, Placement::Node(2))?[0];
            c.wait(Some(p), false)?;
        }
    }
    for _ in 0..rounds {
        for _ in 0..per_round {
            let t = Instant::now();
            let st = Command::new(PROGRAM)
                .stdin(Stdio::null())
                .status()
                .context("posix_spawn")?;
            bare.record(t.elapsed().as_nanos().max(1) as u64)?;
            if !st.success() {
                bail!("{PROGRAM} failed: {st}");
            }
        }
        for _ in 0..per_round {
            let t = Instant::now();
            let p = client.spawn(PROGRAM, &argv, &[], 1)?[0];
            let e = client.wait(Some(p), false)?.context("no status")?;
            nefele.record(t.elapsed().as_nanos().max(1) as u64)?;
            if e.status != 0 {
                bail!("{PROGRAM} failed under procmgrd: status {:#x}", e.status);
            }
        }
        if let Some((_, c)) = three.as_mut() {
            for _ in 0..per_round {
                let t = Instant::now();
                let p = c.spawn_placed(PROGRAM, &argv, &[], 1, Placement::Node(2))?[0];
                let e = c.wait(Some(p), false)?.context("no status")?;
                remote.record(t.elapsed().as_nanos().max(1) as u64)?;
                if p.node() != 2 || e.status != 0 {
                    bail!("remote spawn: {p} ended with status {:#x}", e.status);
                }
            }
        }
    }
    let mut rows = vec![("posix_spawn", &bare), ("nefele-local", &nefele)];
    if three.is_some() {
        rows.push(("nefele-remote", &remote));
    }
    for (name, h) in rows {
        let placement = if name == "nefele-remote" {
            "remote"
        } else {
            "local"
        };
        let row = LatencyRow::new("spawn", name, 0, placement, h);
        if json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            println!(
                "{:<14} spawn+wait of {PROGRAM}: p50 {:>8.1} us  p99 {:>8.1} us  n {}",
                name,
                row.p50_ns as f64 / 1e3,
                row.p99_ns as f64 / 1e3,
                row.n
            );
        }
    }
    if !json {
        let ratio = nefele.value_at_quantile(0.5) as f64 / bare.value_at_quantile(0.5) as f64;
        println!("nefele-local / posix_spawn (p50): {ratio:.2}  (target <= 2)");
        if three.is_some() {
            println!(
                "nefele-remote p50: {:.2} ms  (target <= 5 ms; node 1 spawns on node 2 of a 3-node namespace cluster)",
                remote.value_at_quantile(0.5) as f64 / 1e6
            );
        } else {
            println!("nefele-remote: not measured (--no-cluster)");
        }
    }
    Ok(())
}

/// An embedded node with its procmgrd (children's stdout discarded, so
/// they cannot mix into the harness's output), and a client of it.
pub fn embedded_node() -> Result<(nefele::Node, procmgr::client::ProcClient)> {
    let node = nefele::Node::embedded()?;
    procmgr::daemon::ProcMgr::open(node.socket_path())?
        .discard_stdout()
        .spawn_thread()?;
    let client = procmgr::client::ProcClient::open_at(node.socket_path())?;
    Ok((node, client))
}
