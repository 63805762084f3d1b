//! The seed's Monte Carlo estimate of pi on the Rust SDK: the same three
//! programs as the C sample (sdk-c/examples/montecarlo), as three roles of
//! one binary. Run it with `nefele run nefele-montecarlo main`.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use nefele::process::{self, GlobalPid};
use nefele::Mailbox;

const PRINTER: &str = "printer@{8080,1,1}";
const MAIN: &str = "main@{8081,1,1}";
/// main → printer: "answer with the sums once this many counts are in".
const QUERY_MAGIC: u64 = 0x5952_4555_514e_4d43;

#[derive(Parser)]
#[command(version, about = "The seed's Monte Carlo pi on the Nefele Rust SDK")]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Spawn the printer and the workers, wait for them, print the estimate.
    Main {
        #[arg(default_value_t = 32)]
        workers: u32,
        #[arg(default_value_t = 200_000)]
        points: u64,
        #[arg(default_value_t = 4)]
        inflight: u32,
    },
    /// Count POINTS random points and send the count to the printer.
    Worker { points: u64 },
    /// Sum the counts and print running estimates.
    Printer,
}

fn main() -> std::process::ExitCode {
    fabric::cli::report("nefele-montecarlo", run())
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().role {
        Role::Main {
            workers,
            points,
            inflight,
        } => run_main(workers, points, inflight),
        Role::Worker { points } => worker(points),
        Role::Printer => printer(),
    }
}

fn count(points: u64) -> u64 {
    // xorshift64*, seeded from the pid and the clock.
    let mut s = (std::process::id() as u64) << 32
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut next = || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64) * (1.0 / (1u64 << 53) as f64) - 0.5
    };
    (0..points)
        .filter(|_| {
            let (x, y) = (next(), next());
            x * x + y * y <= 0.25
        })
        .count() as u64
}

fn pair(a: u64, b: u64) -> Vec<u8> {
    [a.to_le_bytes(), b.to_le_bytes()].concat()
}

fn unpair(m: &[u8]) -> Option<(u64, u64)> {
    (m.len() == 16).then(|| {
        (
            u64::from_le_bytes(m[..8].try_into().expect("8")),
            u64::from_le_bytes(m[8..].try_into().expect("8")),
        )
    })
}

fn worker(points: u64) -> anyhow::Result<()> {
    let inside = count(points);
    let mut mb = Mailbox::open()?;
    if !mb.service_exists(PRINTER, Duration::from_secs(10))? {
        bail!("no {PRINTER} within 10 s");
    }
    match mb.send(PRINTER, &pair(inside, points)) {
        // The printer found may have been the previous run's, killed moments
        // ago on another node (its withdrawal had not reached this one yet,
        // nor the new printer's binding): wait for the printer again, once.
        Err(e) if e.send_error() == Some(&nefele::SendError::PeerGone) => {
            if !mb.service_exists(PRINTER, Duration::from_secs(10))? {
                bail!("no {PRINTER} within 10 s after the one found was gone");
            }
            mb.send(PRINTER, &pair(inside, points))?;
        }
        sent => sent?,
    }
    Ok(())
}

fn printer() -> anyhow::Result<()> {
    let mut mb = Mailbox::open()?.bound(PRINTER)?;
    let (mut inside, mut total, mut counts) = (0u64, 0u64, 0u64);
    let mut expected = None;
    loop {
        let m = mb.recv()?;
        if let Some((i, t)) = unpair(&m.data) {
            inside += i;
            total += t;
            counts += 1;
            println!(
                "printer: {counts:3} counts, {total:11} points, pi ~= {:.6}",
                4.0 * inside as f64 / total as f64
            );
        } else if m.data.len() == 24 && m.data[..8] == QUERY_MAGIC.to_le_bytes() {
            // The answer goes to the port that asked: no lookup of main's
            // name, whose binding may not have reached this node by gossip
            // yet in a short job.
            expected = Some((
                u64::from_le_bytes(m.data[8..16].try_into().expect("8")),
                m.from,
            ));
        }
        if let Some((_, asker)) = expected.filter(|(e, _)| counts >= *e) {
            mb.send(asker, &pair(inside, total))?;
            expected = None;
        }
    }
}

fn run_main(workers: u32, points: u64, inflight: u32) -> anyhow::Result<()> {
    if workers == 0 || points == 0 || inflight == 0 {
        bail!("workers, points and inflight must be at least 1");
    }
    let exe = std::env::current_exe()?.display().to_string();
    let mut mb = Mailbox::open()?.bound(MAIN)?;
    let printer: GlobalPid = process::spawn(&exe, &[exe.clone(), "printer".into()], &[])?;
    let w_arg = [exe.clone(), "worker".into(), points.to_string()];
    let (mut started, mut pending, mut completed) = (0u32, 0u32, 0u32);
    let mut per_node = std::collections::BTreeMap::<u16, u32>::new();
    loop {
        let new = (inflight - pending).min(workers - started);
        if new > 0 {
            for p in process::n_spawn(&exe, &w_arg, &[], new)? {
                *per_node.entry(p.node()).or_default() += 1;
            }
            started += new;
            pending += new;
        }
        let e = process::waitpid(None, false)?.context("no status")?;
        if e.pid == printer {
            bail!("the printer exited early (status {:#x})", e.status);
        }
        if !libc_exited_ok(e.status) {
            bail!("a worker failed (status {:#x})", e.status);
        }
        pending -= 1;
        completed += 1;
        if pending == 0 && completed >= workers {
            break;
        }
    }
    let mut q = QUERY_MAGIC.to_le_bytes().to_vec();
    q.extend((workers as u64).to_le_bytes());
    q.extend(0u64.to_le_bytes());
    mb.send(PRINTER, &q)?;
    let answer = mb
        .recv_timeout(Duration::from_secs(30))?
        .context("the printer did not answer")?;
    let (inside, total) = unpair(&answer.data).context("a malformed answer")?;
    process::kill(printer, 9)?;
    process::waitpid(Some(printer), false)?;
    println!(
        "pi ~= {:.6} from {total} points in {workers} workers",
        4.0 * inside as f64 / total as f64
    );
    let placement: Vec<String> = per_node.iter().map(|(n, k)| format!(" {n}:{k}")).collect();
    println!("workers per node:{}", placement.concat());
    Ok(())
}

/// WIFEXITED(status) && WEXITSTATUS(status) == 0.
fn libc_exited_ok(status: i32) -> bool {
    status & 0x7f == 0 && (status >> 8) & 0xff == 0
}
