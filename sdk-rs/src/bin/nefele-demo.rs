//! `nefele-demo`: a ping-pong between two processes over an embedded node,
//! printing the round-trip latency. Its `echo` and `sink` roles are also
//! the child processes of the SDK's integration tests.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use nefele::{Mailbox, Node, SendMode};

#[derive(Parser)]
#[command(
    version,
    about = "Nefele demo: a two-process ping-pong over an embedded node, with its latency"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Role>,
}

#[derive(Subcommand)]
enum Role {
    /// Start an embedded node, an echo process, and measure round trips (default).
    Pingpong {
        /// Round trips to time.
        #[arg(long, default_value_t = 100_000)]
        rounds: u32,
        /// Message size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Bind ADDRESS on the node at $NEFELE_FABRICD_SOCKET and send every
    /// message back to its sender, until a message "quit".
    Echo {
        #[arg(long)]
        bind: String,
    },
    /// Bind ADDRESS and never read: senders to it fill its ring and block.
    Sink {
        #[arg(long)]
        bind: String,
    },
}

fn main() -> std::process::ExitCode {
    fabric::cli::report("nefele-demo", run())
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().command.unwrap_or(Role::Pingpong {
        rounds: 100_000,
        size: 64,
    }) {
        Role::Pingpong { rounds, size } => pingpong(rounds, size),
        Role::Echo { bind } => echo(&bind),
        Role::Sink { bind } => {
            let _mb = Mailbox::open()?.bound(bind.as_str())?;
            println!("ready");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

fn echo(bind: &str) -> anyhow::Result<()> {
    let mut mb = Mailbox::open()?.bound(bind)?;
    let mut buf = Vec::new();
    loop {
        let Some(from) = mb.recv_into(&mut buf, None)? else {
            continue;
        };
        if buf == b"quit" {
            return Ok(());
        }
        mb.send_to_port(from, &buf, SendMode::RELIABLE)?;
    }
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pingpong(rounds: u32, size: usize) -> anyhow::Result<()> {
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let node = Node::embedded()?;
    println!("embedded node at {}", node.socket_path().display());
    let (key, val) = node.env();
    let exe = std::env::current_exe()?;
    let _child = KillOnDrop(
        Command::new(exe)
            .args(["echo", "--bind", "echo@{9000,1,1}"])
            .env(key, val)
            .spawn()
            .context("starting the echo process")?,
    );
    let mut mb = node.mailbox()?;
    if !mb.service_exists("echo@{9000,1,1}", Duration::from_secs(10))? {
        bail!("the echo process did not bind echo@{{9000,1,1}} within 10 s");
    }
    let to = mb.lookup("echo@{9000,1,1}")?[0];
    println!("echo process bound echo@{{9000,1,1}} as port {to}; {rounds} round trips of {size} bytes over shared memory");
    let msg = vec![0x5au8; size];
    let mut buf = Vec::with_capacity(size);
    for _ in 0..rounds.min(1000) {
        mb.send_to_port(to, &msg, SendMode::RELIABLE)?;
        mb.recv_into(&mut buf, None)?;
    }
    let mut rtt = Vec::with_capacity(rounds as usize);
    let t0 = Instant::now();
    for _ in 0..rounds {
        let t = Instant::now();
        mb.send_to_port(to, &msg, SendMode::RELIABLE)?;
        mb.recv_into(&mut buf, None)?;
        rtt.push(t.elapsed().as_nanos() as u64);
        if buf.len() != size {
            bail!("echo returned {} bytes, expected {size}", buf.len());
        }
    }
    let total = t0.elapsed();
    rtt.sort_unstable();
    let pct = |p: f64| rtt[((rtt.len() as f64 * p) as usize).min(rtt.len() - 1)];
    println!(
        "round trip: p50 {} ns, p99 {} ns, p99.9 {} ns ({rounds} rounds in {total:.2?})",
        pct(0.50),
        pct(0.99),
        pct(0.999)
    );
    mb.send_to_port(to, b"quit", SendMode::RELIABLE)?;
    Ok(())
}
