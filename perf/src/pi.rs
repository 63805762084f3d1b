//! `nefele-perf pi`: the seed's job end to end — 32 workers × 200,000
//! points, 4 in flight — through Nefele on one (warm, embedded) node and on
//! a 3-node namespace cluster (main on node 1, workers spread over all
//! three), next to a bare coordinator doing the same with `posix_spawn`
//! and a pipe, with the same C worker binary. Rounds alternate.
//!
//! Needs the C sample built: `make -C sdk-c/examples/montecarlo` (the
//! default `--sample` directory), which `ci/demo.sh` also does.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;

use crate::LatencyRow;
use procmgr::client::Placement;

const WORKERS: u32 = 32;
const POINTS: u64 = 200_000;
const INFLIGHT: u32 = 4;

pub fn run(sample: &Path, quick: bool, json: bool, cluster: bool) -> Result<()> {
    let main = sample.join("montecarlo_main");
    let worker = sample.join("montecarlo_worker");
    for p in [&main, &worker] {
        if !p.exists() {
            bail!("{} is missing: build the C sample with `make -C sdk-c/examples/montecarlo` (or pass --sample DIR)", p.display());
        }
    }
    let rounds = if quick { 10 } else { 50 };
    let (_node, mut client) = crate::spawn::embedded_node()?;
    let main_path = main.display().to_string();
    let argv = [
        main_path.clone(),
        WORKERS.to_string(),
        POINTS.to_string(),
        INFLIGHT.to_string(),
    ];
    let mut bare_h = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)?;
    let mut nefele_h = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)?;
    let mut three_h = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)?;
    let mut three = crate::cluster::LocalCluster::three_with_client(cluster)?;
    let mut estimate = 0.0;
    for round in 0..=rounds {
        let t = Instant::now();
        estimate = bare(&worker)?;
        let bare_ns = t.elapsed().as_nanos() as u64;
        let t = Instant::now();
        let pid = client.spawn(&main_path, &argv, &[], 1)?[0];
        let e = client.wait(Some(pid), false)?.context("no status")?;
        let nefele_ns = t.elapsed().as_nanos() as u64;
        if e.status != 0 {
            bail!(
                "the sample's main failed under procmgrd (status {:#x})",
                e.status
            );
        }
        let mut three_ns = None;
        if let Some((_, c)) = three.as_mut() {
            let t = Instant::now();
            let pid = c.spawn_placed(&main_path, &argv, &[], 1, Placement::Local)?[0];
            let e = c.wait(Some(pid), false)?.context("no status")?;
            three_ns = Some(t.elapsed().as_nanos() as u64);
            if e.status != 0 {
                bail!(
                    "the sample's main failed on the 3-node cluster (status {:#x})",
                    e.status
                );
            }
        }
        if round > 0 {
            // Round 0 warms the page cache and procmgrd's connections.
            bare_h.record(bare_ns)?;
            nefele_h.record(nefele_ns)?;
            if let Some(ns) = three_ns {
                three_h.record(ns)?;
            }
        }
    }
    if (estimate - std::f64::consts::PI).abs() > 0.01 {
        bail!("the bare coordinator estimated pi as {estimate}");
    }
    let mut rows = vec![("bare-posix_spawn", &bare_h), ("nefele-1-node", &nefele_h)];
    if three.is_some() {
        rows.push(("nefele-3-nodes", &three_h));
    }
    for (name, h) in rows {
        let placement = if name == "nefele-3-nodes" {
            "cluster"
        } else {
            "local"
        };
        let row = LatencyRow::new("pi", name, 0, placement, h);
        if json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            println!("{name:<18} {WORKERS} workers x {POINTS} points, {INFLIGHT} in flight: p50 {:>7.1} ms  p99 {:>7.1} ms  n {}", row.p50_ns as f64 / 1e6, row.p99_ns as f64 / 1e6, row.n);
        }
    }
    if !json {
        let ratio = nefele_h.value_at_quantile(0.5) as f64 / bare_h.value_at_quantile(0.5) as f64;
        println!("nefele-1-node / bare (p50): {ratio:.2}  (target <= 2.5)");
        if three.is_some() {
            let ratio3 =
                three_h.value_at_quantile(0.5) as f64 / bare_h.value_at_quantile(0.5) as f64;
            println!("nefele-3-nodes / bare (p50): {ratio3:.2}  (target <= 4)");
        } else {
            println!("nefele-3-nodes: not measured (--no-cluster)");
        }
    }
    Ok(())
}

/// The same job without Nefele: posix_spawn the worker with a pipe for its
/// stdout, INFLIGHT at a time, and sum what they print.
fn bare(worker: &Path) -> Result<f64> {
    let (mut inside, mut total) = (0u64, 0u64);
    let mut running = Vec::new();
    let mut started = 0;
    while started < WORKERS || !running.is_empty() {
        while started < WORKERS && running.len() < INFLIGHT as usize {
            let child = Command::new(worker)
                .args(["--stdout", &POINTS.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()?;
            running.push(child);
            started += 1;
        }
        // Wait for the oldest, like a coordinator blocked in waitpid.
        let mut child = running.remove(0);
        let mut out = String::new();
        let read = child.stdout.take().map(|mut o| o.read_to_string(&mut out));
        let st = child.wait()?;
        match read {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the worker's stdout was not piped"),
        }
        if !st.success() {
            bail!("bare worker failed: {st}");
        }
        let mut it = out.split_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next()) {
            (Some(Ok(i)), Some(Ok(t))) => {
                inside += i;
                total += t;
            }
            _ => bail!("bare worker printed {out:?}"),
        }
    }
    Ok(4.0 * inside as f64 / total as f64)
}
