//! `nefele-perf spawn`: starting a process and waiting for it, through the
//! node's procmgrd (over the fabric) against `posix_spawn` + `waitpid` of
//! the same binary, interleaved in one run.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;

use crate::LatencyRow;

/// The program both sides start: tiny, exits at once.
const PROGRAM: &str = "/bin/true";

pub fn run(quick: bool, json: bool, rounds: u64) -> Result<()> {
    if !std::path::Path::new(PROGRAM).exists() {
        bail!("{PROGRAM} is needed as the spawned program");
    }
    let per_round = if quick { 100 } else { 1000 };
    let (_node, mut client) = embedded_node()?;
    let argv = [PROGRAM.to_string()];
    let mut bare = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut nefele = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    // Warm both paths (page cache, procmgrd's first connection).
    for _ in 0..10 {
        Command::new(PROGRAM).stdin(Stdio::null()).status()?;
        let p = client.spawn(PROGRAM, &argv, &[], 1)?[0];
        client.wait(Some(p), false)?;
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
    }
    let rows = [("posix_spawn", &bare), ("nefele-local", &nefele)];
    for (name, h) in rows {
        let row = LatencyRow::new("spawn", name, 0, "local", h);
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
        println!("nefele-local / posix_spawn (p50): {ratio:.2}  (remote spawn needs the cluster: not measured yet)");
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
