//! `nefele-perf`: measures the fabric against a bare cache-line floor, TCP,
//! Unix sockets and iceoryx2, in one run, so ratios compare like with like.
//!
//! Each measurement runs a parent (the measuring side, pinned to core 0) and
//! a child process (pinned to core 1 for `cross-core`, core 0 for
//! `same-core`); the in-process transport uses a thread instead. `latency`
//! times round trips (HDR histogram: p50, p99, p99.9); `throughput` streams
//! messages one way and times them until the receiver acknowledges the last.

mod broker;
mod cluster;
mod endpoint;
mod pi;
mod spawn;
mod uring;

use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use endpoint::{Endpoint, FabricEnd, FloorEnd, IceoryxEnd};
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Parser)]
#[command(
    version,
    about = "Nefele benchmark harness: fabric transports against a cache-line floor, TCP, Unix sockets and iceoryx2, measured in one run"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// A short run (under 60 s) with fewer iterations.
    #[arg(long)]
    quick: bool,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Message sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = vec![64usize, 1024, 16384, 65536, 1 << 20])]
    sizes: Vec<usize>,
    /// Transports to measure (default: all).
    #[arg(long, value_delimiter = ',')]
    transports: Vec<Transport>,
    /// Also append the JSON lines to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure tcp-remote and fabric-remote-link between two network
    /// namespaces this run creates (and removes); needs root.
    #[arg(long)]
    remote: bool,
    /// Split every measurement into this many rounds, run round-robin
    /// across all measurements, so a noisy phase of a shared machine hits
    /// every transport alike (default: 5 with --quick, 10 without).
    #[arg(long)]
    rounds: Option<u64>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Round-trip latency of ping-pong exchanges.
    Latency(RunArgs),
    /// One-way message rate of a stream.
    Throughput(RunArgs),
    /// The seed's Monte Carlo job through Nefele on one node and on a
    /// 3-node namespace cluster, against a bare posix_spawn-and-pipe
    /// coordinator (needs the C sample built; the cluster needs root).
    Pi {
        #[arg(long)]
        quick: bool,
        #[arg(long)]
        json: bool,
        /// Skip the 3-node cluster (which needs root).
        #[arg(long)]
        no_cluster: bool,
        /// Directory holding montecarlo_main and montecarlo_worker.
        #[arg(long, default_value = "sdk-c/examples/montecarlo/build")]
        sample: PathBuf,
    },
    /// Spawn and wait for a process through procmgrd, against posix_spawn
    /// of the same binary: on the local node, and on another node of a
    /// 3-node namespace cluster (which needs root).
    Spawn {
        #[arg(long)]
        quick: bool,
        #[arg(long)]
        json: bool,
        /// Skip the remote spawn (which needs root).
        #[arg(long)]
        no_cluster: bool,
        /// Interleaved rounds (default 5).
        #[arg(long, default_value_t = 5)]
        rounds: u64,
    },
    /// (internal) the child side of one measurement.
    #[command(hide = true)]
    Child(ChildArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// One cache line bounced between two cores: the hardware's floor
    /// (latency only, reported at 64 B).
    Floor,
    /// Fabric mailboxes in two processes: shared-memory ring, spin then park.
    FabricShm,
    /// As fabric-shm, but parking at once (no spinning): the blocking path.
    FabricShmPark,
    /// Fabric mailboxes in one process (two threads): in-process ring.
    FabricInproc,
    /// TCP over loopback with TCP_NODELAY.
    Tcp,
    /// A Unix stream socket.
    Uds,
    /// The eBPF path: each side's mailbox socket, the sk_msg program
    /// redirecting every message into the other's (needs root); a receive
    /// polls briefly, then blocks.
    EbpfSkmsg,
    /// As ebpf-skmsg, but blocking at once (no polling): the blocking path.
    EbpfSkmsgPark,
    /// The broker design the eBPF path replaces: both sides talk over Unix
    /// stream sockets to a broker thread that relays by destination port.
    UdsBroker,
    /// The uds exchange driven through io_uring: batched linked sends, one
    /// multishot receive with provided buffers.
    #[value(name = "io_uring-uds")]
    IoUringUds,
    /// iceoryx2 0.10 publish-subscribe, sample loaned ahead.
    Iceoryx2,
    /// A fresh mailbox's first exchange with a server in another process
    /// (latency only, 64 B): its request and the reply each go through the
    /// kernel on the eBPF path while their rings are being made (needs
    /// root; the mailbox's opening is not timed).
    FabricFirst,
    /// As fabric-first with NEFELE_EARLY_EBPF=0: request and reply each
    /// wait for their ring.
    FabricFirstRing,
    /// (--remote) TCP ping-pong between two network namespaces.
    TcpRemote,
    /// (--remote) the fabric's reliable remote link (fabric::remote) between
    /// two network namespaces, one link each way: the link alone.
    FabricRemoteLink,
    /// (--remote) fabric mailboxes on two cluster nodes in two network
    /// namespaces: the whole remote path as a program gets it (a direct
    /// link of each mailbox's own, see fabric::direct).
    FabricRemote,
    /// (--remote) fabric-remote with receivers that park at once (no
    /// spinning): the blocking path.
    FabricRemotePark,
    /// (--remote) fabric-remote with direct links off: through both
    /// daemons (ring, gateway, node link, ring).
    FabricRemoteGateway,
}

impl Transport {
    fn name(self) -> &'static str {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .map(|s| &*s.leak())
            .unwrap_or("?")
    }
    /// Blocking transports are also measured with both sides on one core.
    fn blocking(self) -> bool {
        matches!(
            self,
            Transport::Tcp
                | Transport::Uds
                | Transport::FabricShmPark
                | Transport::EbpfSkmsg
                | Transport::EbpfSkmsgPark
                | Transport::UdsBroker
                | Transport::IoUringUds
        )
    }
    /// Measured at 64 B, for latency only.
    fn latency_at_64_only(self) -> bool {
        matches!(
            self,
            Transport::Floor | Transport::FabricFirst | Transport::FabricFirstRing
        )
    }
    /// Measured between two network namespaces (with --remote).
    fn remote(self) -> bool {
        matches!(
            self,
            Transport::TcpRemote
                | Transport::FabricRemoteLink
                | Transport::FabricRemote
                | Transport::FabricRemotePark
                | Transport::FabricRemoteGateway
        )
    }
    fn all(remote: bool) -> Vec<Transport> {
        Transport::value_variants()
            .iter()
            .copied()
            .filter(|t| t.remote() == remote)
            .collect()
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Bench {
    Latency,
    Throughput,
}

#[derive(clap::Args, Clone)]
struct ChildArgs {
    #[arg(long)]
    transport: Transport,
    #[arg(long)]
    bench: Bench,
    #[arg(long)]
    size: usize,
    #[arg(long)]
    n: u64,
    #[arg(long)]
    warmup: u64,
    #[arg(long)]
    core: usize,
    #[arg(long, default_value_t = String::new())]
    rendezvous: String,
}

/// One JSON line of a latency-like measurement (latency, spawn, pi).
#[derive(Serialize)]
struct LatencyRow {
    bench: &'static str,
    transport: &'static str,
    size: usize,
    placement: &'static str,
    p50_ns: u64,
    p99_ns: u64,
    p999_ns: u64,
    n: u64,
}

impl LatencyRow {
    fn new(
        bench: &'static str,
        transport: &'static str,
        size: usize,
        placement: &'static str,
        h: &Histogram<u64>,
    ) -> Self {
        LatencyRow {
            bench,
            transport,
            size,
            placement,
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            n: h.len(),
        }
    }
}

#[derive(Serialize)]
struct ThroughputRow {
    bench: &'static str,
    transport: &'static str,
    size: usize,
    placement: &'static str,
    msgs_per_sec: f64,
    bytes_per_sec: f64,
    n: u64,
}

fn pin(core: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(core)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning to core {core}"))?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    fabric::cli::report("nefele-perf", dispatch())
}

fn dispatch() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Latency(a) => run(Bench::Latency, a),
        Cmd::Throughput(a) => run(Bench::Throughput, a),
        Cmd::Pi {
            quick,
            json,
            no_cluster,
            sample,
        } => pi::run(&sample, quick, json, !no_cluster),
        Cmd::Spawn {
            quick,
            json,
            no_cluster,
            rounds,
        } => spawn::run(quick, json, rounds.max(1), !no_cluster),
        Cmd::Child(a) => child(a),
    }
}

/// One measurement to make.
struct Plan {
    transport: Transport,
    size: usize,
    same_core: bool,
    n: u64,
    warmup: u64,
}

/// What to measure, with the exchanges of each of the `rounds` rounds.
fn plan(bench: Bench, args: &RunArgs, rounds: u64) -> Vec<Plan> {
    let transports = if args.transports.is_empty() {
        Transport::all(args.remote)
    } else {
        args.transports.clone()
    };
    let scale = if args.quick { 1 } else { 10 };
    let mut plans = Vec::new();
    for &size in &args.sizes {
        for &t in &transports {
            if t.latency_at_64_only() && (bench == Bench::Throughput || size != 64) {
                continue;
            }
            let n = match bench {
                // Every round opens a mailbox (and leaves two rings behind
                // in the server until it ends).
                Bench::Latency
                    if matches!(t, Transport::FabricFirst | Transport::FabricFirstRing) =>
                {
                    if args.quick {
                        300
                    } else {
                        1000
                    }
                }
                Bench::Latency => {
                    scale
                        * if size <= 1024 {
                            20_000
                        } else if size <= 16384 {
                            10_000
                        } else if size <= 65536 {
                            4_000
                        } else {
                            400
                        }
                }
                Bench::Throughput => {
                    let fast = matches!(
                        t,
                        Transport::FabricShm | Transport::FabricInproc | Transport::Iceoryx2
                    );
                    let cap = if fast { 2_000_000 } else { 200_000 };
                    scale * ((256u64 << 20) / size as u64).clamp(200, cap)
                }
            };
            let placements: &[bool] = if t.blocking() {
                &[false, true]
            } else {
                &[false]
            };
            let n = n.div_ceil(rounds);
            for &same_core in placements {
                plans.push(Plan {
                    transport: t,
                    size,
                    same_core,
                    n,
                    warmup: warmup_for(t, n, size),
                });
            }
        }
    }
    plans
}

/// Warm-up first exchanges (each by a fresh mailbox) per round of
/// `fabric-first` and `fabric-first-ring`, at least.
const FIRST_EXCHANGE_WARMUP: u64 = 20;

/// Warm-up exchanges before timing, by one rule for every transport that
/// keeps its connection (all but the first-exchange ones): a tenth of the
/// timed ones, and for those that spin, at least enough to pass twice
/// through a default-sized fabric ring, so steady state is measured rather
/// than the first touches of cold cache lines (the floor and iceoryx2
/// reuse hot lines and need none; they get the same warm-up all the same).
/// A blocking transport's round trip (a wake-up, microseconds) dwarfs a
/// cold line's fetch (100-400 ns), so those warm up with a tenth, at least
/// [`BLOCKING_WARMUP`]: two laps at 64 B cost as much as the timed
/// exchanges of a quick round, and took a sixth of a quick latency run.
fn warmup_for(t: Transport, n: u64, size: usize) -> u64 {
    // A first exchange is made by a fresh mailbox each time: there is no
    // ring to warm, only the server and the daemon.
    if matches!(t, Transport::FabricFirst | Transport::FabricFirstRing) {
        return (n / 10).max(FIRST_EXCHANGE_WARMUP);
    }
    if t.blocking() {
        return (n / 10).max(BLOCKING_WARMUP);
    }
    let two_laps = 2 * fabric::ring::DEFAULT_RING_CAPACITY_BYTES as u64 / (size as u64 + 64) + 100;
    (n / 10).max(two_laps.min(10_000)).max(10)
}

/// Warm-up exchanges per round of a blocking transport, at least.
const BLOCKING_WARMUP: u64 = 100;

fn run(bench: Bench, args: RunArgs) -> Result<()> {
    if args
        .sizes
        .iter()
        .any(|&s| s == 0 || s > nefele::MAX_MESSAGE_BYTES)
    {
        bail!(
            "--sizes must be between 1 and {} bytes",
            nefele::MAX_MESSAGE_BYTES
        );
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cores < 2 {
        bail!("nefele-perf needs at least 2 cores for cross-core placement (found {cores})");
    }
    let rounds = args.rounds.unwrap_or(if args.quick { 5 } else { 10 });
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if let Some(t) = args.transports.iter().find(|t| t.remote() != args.remote) {
        bail!(
            "{} is measured {} --remote",
            t.name(),
            if t.remote() {
                "only with"
            } else {
                "only without"
            }
        );
    }
    // With --remote, this (main) thread works from namespace A, the child
    // processes from namespace B; both are removed when the run ends.
    let netns = if args.remote {
        Some(endpoint::NetnsPair::create()?)
    } else {
        None
    };
    if let Some(n) = &netns {
        n.enter_a()?;
    }
    let plans = plan(bench, &args, rounds);
    // With --remote, this process's node is cluster node A.
    let node = if args.remote {
        nefele::Node::embedded_member(remote_cluster(endpoint::ADDR_A))?
    } else {
        nefele::Node::embedded()?
    };
    let mut out_file = match &args.out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => None,
    };
    let bar = indicatif::ProgressBar::new(plans.len() as u64 * rounds);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .expect("static template"),
    );
    let mut results: Vec<Option<Measured>> = plans.iter().map(|_| None).collect();
    // Each round's headline (latency p50 in ns, throughput in msg/s), for
    // the table's spread: a round in a slow phase of the host shows there.
    let mut headlines: Vec<Vec<f64>> = plans.iter().map(|_| Vec::new()).collect();
    let mut failed = vec![false; plans.len()];
    // Rounds are interleaved within each size: transports compared with
    // each other share the machine's noisy phases, and a small-message
    // round never follows a large-message one that flushed the caches.
    let mut sizes: Vec<usize> = plans.iter().map(|p| p.size).collect();
    sizes.dedup();
    for size in sizes {
        for round in 0..rounds {
            for (k, p) in plans.iter().enumerate().filter(|(_, p)| p.size == size) {
                bar.inc(1);
                if failed[k] {
                    continue;
                }
                let placement = if p.same_core {
                    "same-core"
                } else {
                    "cross-core"
                };
                bar.set_message(format!(
                    "round {}/{rounds}: {:?} {} {} B {placement}",
                    round + 1,
                    bench,
                    p.transport.name(),
                    p.size
                ));
                match measure(bench, p, round as usize * plans.len() + k, &node) {
                    Ok(m) => {
                        headlines[k].push(m.headline());
                        results[k] = Some(merge(results[k].take(), m)?);
                    }
                    Err(e) => {
                        failed[k] = true;
                        bar.suspend(|| {
                            eprintln!(
                                "nefele-perf: {} {} B {placement}: {e:#}",
                                p.transport.name(),
                                p.size
                            )
                        });
                    }
                }
            }
        }
    }
    let mut table = Vec::new();
    for ((p, result), heads) in plans.iter().zip(results).zip(&headlines) {
        let (lo, hi) = heads
            .iter()
            .fold((f64::INFINITY, 0f64), |(lo, hi), &h| (lo.min(h), hi.max(h)));
        let placement = if p.same_core {
            "same-core"
        } else {
            "cross-core"
        };
        let (line, text) = match result {
            Some(Measured::Latency(h)) => {
                let row = LatencyRow::new("latency", p.transport.name(), p.size, placement, &h);
                let text = format!(
                    "{:<18} {:>8} {:<10} p50 {:>9} ns  p99 {:>9} ns  p99.9 {:>9} ns  n {:<7} rounds' p50 {lo:.0}-{hi:.0} ns",
                    row.transport, row.size, placement, row.p50_ns, row.p99_ns, row.p999_ns, row.n
                );
                (serde_json::to_string(&row)?, text)
            }
            Some(Measured::Throughput { n, secs }) => {
                let row = ThroughputRow {
                    bench: "throughput",
                    transport: p.transport.name(),
                    size: p.size,
                    placement,
                    msgs_per_sec: n as f64 / secs,
                    bytes_per_sec: (n * p.size as u64) as f64 / secs,
                    n,
                };
                let text = format!(
                    "{:<18} {:>8} {:<10} {:>12.0} msg/s  {:>10.1} MiB/s  n {:<8} rounds {}-{} msg/s",
                    row.transport,
                    row.size,
                    placement,
                    row.msgs_per_sec,
                    row.bytes_per_sec / (1 << 20) as f64,
                    n,
                    si(lo),
                    si(hi)
                );
                (serde_json::to_string(&row)?, text)
            }
            None => continue,
        };
        if args.json {
            println!("{line}");
        }
        if let Some(f) = out_file.as_mut() {
            writeln!(f, "{line}")?;
        }
        table.push(text);
    }
    bar.finish_and_clear();
    if !args.json {
        println!(
            "{:?} ({} measurements{})",
            bench,
            table.len(),
            if args.quick { ", quick" } else { "" }
        );
        for t in table {
            println!("{t}");
        }
    }
    Ok(())
}

enum Measured {
    Latency(Histogram<u64>),
    Throughput { n: u64, secs: f64 },
}

/// A rate for the table: `37.9M`, `812.4k` or `950`.
fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

impl Measured {
    /// The figure the goals read: p50 in ns, or messages per second.
    fn headline(&self) -> f64 {
        match self {
            Measured::Latency(h) => h.value_at_quantile(0.5) as f64,
            Measured::Throughput { n, secs } => *n as f64 / secs,
        }
    }
}

/// Adds one round's result to the rounds before it.
fn merge(acc: Option<Measured>, round: Measured) -> Result<Measured> {
    Ok(match (acc, round) {
        (None, r) => r,
        (Some(Measured::Latency(mut a)), Measured::Latency(b)) => {
            a.add(&b)?;
            Measured::Latency(a)
        }
        (Some(Measured::Throughput { n, secs }), Measured::Throughput { n: n2, secs: s2 }) => {
            Measured::Throughput {
                n: n + n2,
                secs: secs + s2,
            }
        }
        _ => bail!("a measurement changed kind between rounds"),
    })
}

struct KillOnDrop(Option<Child>);
impl KillOnDrop {
    /// Waits for the child to finish its side, at most `timeout`.
    fn finish(mut self, timeout: Duration) -> Result<()> {
        let Some(mut c) = self.0.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait()? {
                if !status.success() {
                    bail!("child exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("child did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn measure(bench: Bench, p: &Plan, run_id: usize, node: &nefele::Node) -> Result<Measured> {
    pin(0)?;
    let child_core = if p.same_core { 0 } else { 1 };
    let spawn = |rendezvous: String, env: Option<(&str, &std::path::Path)>| -> Result<KillOnDrop> {
        let mut cmd = if p.transport.remote() {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", endpoint::NS_B])
                .arg(std::env::current_exe()?);
            c
        } else {
            Command::new(std::env::current_exe()?)
        };
        cmd.arg("child")
            .args([
                "--transport",
                p.transport.name(),
                "--bench",
                if bench == Bench::Latency {
                    "latency"
                } else {
                    "throughput"
                },
            ])
            .args([
                "--size",
                &p.size.to_string(),
                "--n",
                &p.n.to_string(),
                "--warmup",
                &p.warmup.to_string(),
            ])
            .args([
                "--core",
                &child_core.to_string(),
                "--rendezvous",
                &rendezvous,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        if p.transport == Transport::FabricFirstRing {
            cmd.env(fabric::client::EARLY_EBPF_ENV, "0");
        }
        Ok(KillOnDrop(Some(
            cmd.spawn().context("spawning the child side")?,
        )))
    };
    let timeout = Duration::from_secs(120);
    match p.transport {
        Transport::Floor => {
            let fd = nix::sys::memfd::memfd_create(
                "nefele-perf-floor",
                nix::sys::memfd::MFdFlags::empty(),
            )?;
            std::fs::File::from(fd.try_clone()?).set_len(4096)?;
            let child = spawn(fd.as_raw_fd().to_string(), None)?;
            let mut end = FloorEnd::new(fd)?;
            let r = drive(bench, p, &mut end)?;
            child.finish(timeout)?;
            Ok(r)
        }
        Transport::FabricShm
        | Transport::FabricShmPark
        | Transport::FabricRemote
        | Transport::FabricRemotePark
        | Transport::FabricRemoteGateway => {
            let service = format!("{{7000,{run_id}}}");
            let env = (!p.transport.remote()).then(|| node.env());
            let child = spawn(service.clone(), env)?;
            let mut mailbox = node.mailbox()?;
            if matches!(
                p.transport,
                Transport::FabricShmPark | Transport::FabricRemotePark
            ) {
                mailbox.set_spin(Duration::ZERO);
            }
            mailbox.set_direct_links(p.transport != Transport::FabricRemoteGateway);
            if !mailbox.service_exists(service.as_str(), Duration::from_secs(10))? {
                bail!("the child did not bind {service}");
            }
            let peer = mailbox.lookup(service.as_str())?.first().copied();
            let mut end = FabricEnd { mailbox, peer };
            let r = drive(bench, p, &mut end)?;
            child.finish(timeout)?;
            Ok(r)
        }
        Transport::FabricFirst | Transport::FabricFirstRing => {
            let service = format!("{{7000,{run_id}}}");
            let child = spawn(service.clone(), Some(node.env()))?;
            let early = p.transport == Transport::FabricFirst;
            let open = || fabric::client::Mailbox::open_at_with(node.socket_path(), early);
            let mut probe = open()?;
            let address: fabric::addr::Address = service.parse()?;
            if !probe.service_exists(&address, Duration::from_secs(10))? {
                bail!("the child did not bind {service}");
            }
            let server = *probe
                .lookup(&address)?
                .first()
                .context("the child's binding went away")?;
            let msg = vec![0xa5u8; p.size];
            let mut buf = Vec::with_capacity(p.size);
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
            for round in 0..p.warmup + p.n {
                let mut fresh = open()?;
                let t = Instant::now();
                fresh.send_to_port(server, &msg, fabric::ring::SendMode::RELIABLE)?;
                fresh
                    .recv_into(&mut buf, Some(Instant::now() + timeout))?
                    .context("the server did not answer")?;
                if round >= p.warmup {
                    h.record(t.elapsed().as_nanos().max(1) as u64)?;
                }
            }
            child.finish(timeout)?;
            Ok(Measured::Latency(h))
        }
        Transport::FabricInproc => {
            let service = format!("{{7000,{run_id}}}");
            let args = ChildArgs {
                transport: p.transport,
                bench,
                size: p.size,
                n: p.n,
                warmup: p.warmup,
                core: child_core,
                rendezvous: service.clone(),
            };
            let socket = node.socket_path().to_path_buf();
            let thread = std::thread::spawn(move || -> Result<()> {
                pin(args.core)?;
                let mailbox = nefele::Mailbox::open_at(&socket)?.bound(args.rendezvous.as_str())?;
                serve(
                    &args,
                    &mut FabricEnd {
                        mailbox,
                        peer: None,
                    },
                )
            });
            let mut mailbox = node.mailbox()?;
            if !mailbox.service_exists(service.as_str(), Duration::from_secs(10))? {
                bail!("the child thread did not bind {service}");
            }
            let peer = mailbox.lookup(service.as_str())?.first().copied();
            let r = drive(bench, p, &mut FabricEnd { mailbox, peer })?;
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("child thread panicked"))??;
            Ok(r)
        }
        Transport::Tcp => {
            let l = endpoint::tcp_listen()?;
            let child = spawn(l.local_addr()?.port().to_string(), None)?;
            let mut end = endpoint::tcp_accept(&l, p.size)?;
            let r = drive(bench, p, &mut end)?;
            child.finish(timeout)?;
            Ok(r)
        }
        Transport::EbpfSkmsg | Transport::EbpfSkmsgPark => {
            let fabric = ebpf_fabric()?;
            let port = |k: usize| fabric::wire::WirePort {
                node: 1,
                port: 0x4000_0000 + (2 * run_id + k) as u32,
            };
            let window = fabric::ebpf::DEFAULT_WINDOW_BYTES;
            let mine = fabric.endpoint(port(0), 0, window)?;
            let theirs = fabric.endpoint(port(1), 0, window)?;
            // The child inherits its mailbox socket, as a process gets its
            // own from fabricd.
            let fd = theirs.socket().as_raw_fd();
            nix::fcntl::fcntl(
                theirs.socket(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )?;
            let child = spawn(format!("{fd},{},{}", port(1).port, port(0).port), None)?;
            drop(theirs);
            let mut end =
                endpoint::EbpfEnd::new(mine, port(1), p.transport == Transport::EbpfSkmsgPark);
            let r = drive(bench, p, &mut end)?;
            child.finish(timeout)?;
            Ok(r)
        }
        // The Unix-socket exchanges: one listener in a private directory.
        Transport::Uds | Transport::UdsBroker | Transport::IoUringUds => {
            let dir =
                std::env::temp_dir().join(format!("nefele-perf-{}-{run_id}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("s.sock");
            let l = std::os::unix::net::UnixListener::bind(&path)?;
            let result = (|| {
                let child = spawn(path.display().to_string(), None)?;
                let r = if p.transport == Transport::Uds {
                    drive(bench, p, &mut endpoint::uds_accept(&l, p.size)?)?
                } else if p.transport == Transport::UdsBroker {
                    let broker = broker::start(l, p.same_core.then_some(0));
                    let mut end = broker::BrokerEnd::connect(&path, 1, 2)?;
                    let r = drive(bench, p, &mut end)?;
                    drop(end);
                    broker
                        .join()
                        .map_err(|_| anyhow::anyhow!("broker panicked"))??;
                    r
                } else {
                    let mut end = uring::UringEnd::new(l.accept()?.0, p.size)?;
                    drive(bench, p, &mut end)?
                };
                child.finish(timeout)?;
                Ok(r)
            })();
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
        Transport::TcpRemote => {
            let l = std::net::TcpListener::bind((std::net::Ipv4Addr::from(endpoint::ADDR_A), 0))?;
            let child = spawn(l.local_addr()?.to_string(), None)?;
            let mut end = endpoint::tcp_accept(&l, p.size)?;
            let r = drive(bench, p, &mut end)?;
            child.finish(timeout)?;
            Ok(r)
        }
        Transport::FabricRemoteLink => {
            let port = remote_port(run_id);
            let child = spawn(port.to_string(), None)?;
            let me = std::net::SocketAddr::from((endpoint::ADDR_A, port));
            let peer = std::net::SocketAddr::from((endpoint::ADDR_B, port));
            let mut end = endpoint::RemoteLinkEnd::pair(me, peer, REMOTE_WINDOW_BYTES)?;
            let r = drive(bench, p, &mut end)?;
            // Closing a link's sending half waits for the peer to close
            // its receiving half (so the last messages are not lost), and
            // closing a receiving half waits for the peer's sending half.
            // So the two sides close in opposite orders: here the receiving
            // half first, in the child the sending one (the struct's field
            // order). In the same order both would wait out their linger
            // (2 s, every round).
            let endpoint::RemoteLinkEnd { tx, rx } = end;
            drop(rx);
            drop(tx);
            child.finish(timeout)?;
            Ok(r)
        }
        Transport::Iceoryx2 => {
            let name = format!("nefele-perf-{}-{run_id}", std::process::id());
            let buffer = if bench == Bench::Latency {
                1
            } else {
                ((64usize << 20) / p.size).clamp(4, 256)
            };
            let mut end = IceoryxEnd::new(&name, true, p.size, buffer)?;
            let child = spawn(name, None)?;
            endpoint::wait_for(
                Duration::from_secs(10),
                "the iceoryx2 child to connect",
                || end.connected(),
            )?;
            let r = drive(bench, p, &mut end)?;
            child.finish(timeout)?;
            Ok(r)
        }
    }
}

/// The eBPF path, loaded once per run in the measuring process.
fn ebpf_fabric() -> Result<&'static fabric::ebpf::EbpfFabric> {
    static FABRIC: std::sync::OnceLock<std::result::Result<fabric::ebpf::EbpfFabric, String>> =
        std::sync::OnceLock::new();
    FABRIC
        .get_or_init(|| fabric::ebpf::EbpfFabric::load().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("ebpf-skmsg: the eBPF path is unavailable: {e}"))
}

/// The cluster node at `addr` (A or B) in the --remote namespaces; B finds
/// A as its seed.
fn remote_cluster(addr: [u8; 4]) -> fabric::cluster::ClusterConfig {
    let at = |a: [u8; 4]| std::net::SocketAddr::from((a, 7100));
    let mut c = fabric::cluster::ClusterConfig::new("nefele-perf", at(addr));
    c.broadcast = false;
    if addr != endpoint::ADDR_A {
        c.seeds = vec![at(endpoint::ADDR_A)];
    }
    c
}

/// Window of the remote link in the benchmark: its default.
const REMOTE_WINDOW_BYTES: usize = fabric::remote::DEFAULT_WINDOW_BYTES;

/// A port for one remote-link measurement: the namespaces are private to
/// this run, so a fixed range is free, and a new port per run avoids
/// sockets still closing from the last one.
fn remote_port(run_id: usize) -> u16 {
    20_000 + (run_id % 40_000) as u16
}

/// The parent's side: times the exchange.
fn drive<E: Endpoint>(bench: Bench, p: &Plan, end: &mut E) -> Result<Measured> {
    let msg = vec![0xa5u8; p.size];
    let mut buf = Vec::with_capacity(p.size);
    match bench {
        Bench::Latency => {
            for _ in 0..p.warmup {
                end.send(&msg)?;
                end.recv(&mut buf)?;
            }
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
            for _ in 0..p.n {
                let t = Instant::now();
                end.send(&msg)?;
                end.recv(&mut buf)?;
                h.record(t.elapsed().as_nanos().max(1) as u64)?;
            }
            Ok(Measured::Latency(h))
        }
        Bench::Throughput => {
            for _ in 0..p.warmup {
                end.send(&msg)?;
            }
            end.recv(&mut buf)?;
            let t = Instant::now();
            for _ in 0..p.n {
                end.send(&msg)?;
            }
            end.recv(&mut buf)?;
            Ok(Measured::Throughput {
                n: p.n,
                secs: t.elapsed().as_secs_f64(),
            })
        }
    }
}

/// The child's side: echoes (latency) or counts and acknowledges (throughput).
fn serve<E: Endpoint>(a: &ChildArgs, end: &mut E) -> Result<()> {
    let mut buf = Vec::with_capacity(a.size);
    let ack = vec![0u8; a.size];
    match a.bench {
        Bench::Latency => {
            for _ in 0..a.warmup + a.n {
                end.recv(&mut buf)?;
                end.send(&buf)?;
            }
        }
        Bench::Throughput => {
            for count in [a.warmup, a.n] {
                for _ in 0..count {
                    end.recv(&mut buf)?;
                }
                end.send(&ack)?;
            }
        }
    }
    Ok(())
}

fn child(a: ChildArgs) -> Result<()> {
    // Node B's daemon threads start before the pinning, so they are not
    // tied to the core this thread spins on.
    let node_b = if matches!(
        a.transport,
        Transport::FabricRemote | Transport::FabricRemotePark | Transport::FabricRemoteGateway
    ) {
        Some(nefele::Node::embedded_member(remote_cluster(
            endpoint::ADDR_B,
        ))?)
    } else {
        None
    };
    pin(a.core)?;
    match a.transport {
        Transport::FabricRemote | Transport::FabricRemotePark | Transport::FabricRemoteGateway => {
            let node_b = node_b.expect("started above");
            let mut mailbox = node_b.mailbox()?.bound(a.rendezvous.as_str())?;
            mailbox.set_direct_links(a.transport != Transport::FabricRemoteGateway);
            if a.transport == Transport::FabricRemotePark {
                mailbox.set_spin(Duration::ZERO);
            }
            serve(
                &a,
                &mut FabricEnd {
                    mailbox,
                    peer: None,
                },
            )
        }
        Transport::Floor => {
            let raw: i32 = a.rendezvous.parse().context("floor needs an fd")?;
            // SAFETY: the parent left this memfd open for us (no CLOEXEC)
            // and passed its number; nothing else in this process owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            serve(&a, &mut FloorEnd::new(fd)?)
        }
        Transport::FabricShm
        | Transport::FabricShmPark
        | Transport::FabricFirst
        | Transport::FabricFirstRing => {
            let mut mailbox = nefele::Mailbox::open()?.bound(a.rendezvous.as_str())?;
            if a.transport == Transport::FabricShmPark {
                mailbox.set_spin(Duration::ZERO);
            }
            serve(
                &a,
                &mut FabricEnd {
                    mailbox,
                    peer: None,
                },
            )
        }
        Transport::FabricInproc => bail!("fabric-inproc runs in a thread, not a child process"),
        Transport::TcpRemote => {
            let addr: std::net::SocketAddr = a.rendezvous.parse()?;
            let s = std::net::TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            serve(
                &a,
                &mut endpoint::StreamEnd {
                    stream: s,
                    size: a.size,
                },
            )
        }
        Transport::FabricRemoteLink => {
            let port: u16 = a.rendezvous.parse()?;
            let me = std::net::SocketAddr::from((endpoint::ADDR_B, port));
            let peer = std::net::SocketAddr::from((endpoint::ADDR_A, port));
            serve(
                &a,
                &mut endpoint::RemoteLinkEnd::pair(me, peer, REMOTE_WINDOW_BYTES)?,
            )
        }
        Transport::Tcp => serve(
            &a,
            &mut endpoint::tcp_connect(a.rendezvous.parse()?, a.size)?,
        ),
        Transport::Uds => serve(&a, &mut endpoint::uds_connect(&a.rendezvous, a.size)?),
        Transport::EbpfSkmsg | Transport::EbpfSkmsgPark => {
            let mut parts = a.rendezvous.split(',').map(str::parse::<u32>);
            let mut next =
                || -> Result<u32> { Ok(parts.next().context("ebpf-skmsg needs fd,port,peer")??) };
            let (fd, me, peer) = (next()? as i32, next()?, next()?);
            // SAFETY: the parent left this socket open for us (no CLOEXEC)
            // and passed its number; nothing else in this process owns it.
            let sock = unsafe { std::net::TcpStream::from_raw_fd(fd) };
            let endpoint = fabric::ebpf::Endpoint::from_socket(
                sock,
                fabric::wire::WirePort { node: 1, port: me },
                fabric::ebpf::DEFAULT_WINDOW_BYTES,
            );
            serve(
                &a,
                &mut endpoint::EbpfEnd::new(
                    endpoint,
                    fabric::wire::WirePort {
                        node: 1,
                        port: peer,
                    },
                    a.transport == Transport::EbpfSkmsgPark,
                ),
            )
        }
        Transport::UdsBroker => serve(
            &a,
            &mut broker::BrokerEnd::connect(std::path::Path::new(&a.rendezvous), 2, 1)?,
        ),
        Transport::IoUringUds => serve(
            &a,
            &mut uring::UringEnd::new(
                std::os::unix::net::UnixStream::connect(&a.rendezvous)?,
                a.size,
            )?,
        ),
        Transport::Iceoryx2 => {
            let buffer = if a.bench == Bench::Latency {
                1
            } else {
                ((64usize << 20) / a.size).clamp(4, 256)
            };
            let mut end = IceoryxEnd::new(&a.rendezvous, false, a.size, buffer)?;
            endpoint::wait_for(Duration::from_secs(10), "the iceoryx2 parent", || {
                end.connected()
            })?;
            serve(&a, &mut end)
        }
    }
}
