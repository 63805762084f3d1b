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
    /// Wait (at most --timeout-ms) until ADDRESS exists, send MESSAGE to it,
    /// and print the reply and the port it came from.
    Ask {
        #[arg(long)]
        to: String,
        #[arg(long)]
        message: String,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Exit 0 if ADDRESS exists within --timeout-ms, else 1.
    Exists {
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 0)]
        timeout_ms: u64,
    },
    /// Send 64 KiB messages to ADDRESS until a send fails (at most
    /// --max-messages); print the error and how long the last send took.
    Flood {
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 1_000_000)]
        max_messages: u64,
    },
    /// Send COUNT numbered messages (8-byte little-endian sequence numbers,
    /// padded with zeros to --size bytes) to ADDRESS, reliably.
    Stream {
        #[arg(long)]
        to: String,
        #[arg(long)]
        count: u64,
        /// Bytes per message (at least 8).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(8..=(64 << 20)))]
        size: u64,
        /// Print "sent" and kill itself (SIGKILL) after the last send
        /// instead of closing its mailbox: what it sent must arrive anyway.
        #[arg(long)]
        then_die: bool,
    },
    /// Bind ADDRESS, receive COUNT numbered messages (at most --timeout-ms)
    /// and check that they come in order, none missing, none twice.
    Count {
        #[arg(long)]
        bind: String,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
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
        Role::Ask {
            to,
            message,
            timeout_ms,
        } => {
            let mut mb = Mailbox::open()?;
            if !mb.service_exists(to.as_str(), Duration::from_millis(timeout_ms))? {
                bail!("nothing is bound to {to} (waited {timeout_ms} ms)");
            }
            mb.send(to.as_str(), message.as_bytes())?;
            let mut buf = Vec::new();
            let deadline = Instant::now() + Duration::from_millis(timeout_ms);
            let Some(from) = mb.recv_into(&mut buf, Some(deadline))? else {
                bail!("no reply from {to} within {timeout_ms} ms");
            };
            println!("{from} {}", String::from_utf8_lossy(&buf));
            Ok(())
        }
        Role::Exists { to, timeout_ms } => {
            let exists =
                Mailbox::open()?.service_exists(to.as_str(), Duration::from_millis(timeout_ms))?;
            std::process::exit(if exists { 0 } else { 1 });
        }
        Role::Flood { to, max_messages } => {
            let mut mb = Mailbox::open()?;
            if !mb.service_exists(to.as_str(), Duration::from_secs(5))? {
                bail!("nothing is bound to {to}");
            }
            let chunk = vec![0xa5u8; 64 << 10];
            println!("flooding");
            for _ in 0..max_messages {
                let t = Instant::now();
                if let Err(e) = mb.send(to.as_str(), &chunk) {
                    println!("failed after {} ms: {e}", t.elapsed().as_millis());
                    return Ok(());
                }
            }
            bail!("{max_messages} sends to {to} all succeeded")
        }
        Role::Stream {
            to,
            count,
            size,
            then_die,
        } => {
            let mut mb = Mailbox::open()?;
            if !mb.service_exists(to.as_str(), Duration::from_secs(5))? {
                bail!("nothing is bound to {to}");
            }
            let port = mb.lookup(to.as_str())?[0];
            let mut msg = vec![0u8; size as usize];
            for i in 0..count {
                msg[..8].copy_from_slice(&i.to_le_bytes());
                mb.send_to_port(port, &msg, SendMode::RELIABLE)?;
            }
            if then_die {
                println!("sent");
                nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL)?;
            }
            // What is still in flight is delivered after the mailbox closes.
            Ok(())
        }
        Role::Count {
            bind,
            count,
            timeout_ms,
        } => {
            let mut mb = Mailbox::open()?.bound(bind.as_str())?;
            println!("ready");
            let deadline = Instant::now() + Duration::from_millis(timeout_ms);
            let mut buf = Vec::new();
            for i in 0..count {
                if mb.recv_into(&mut buf, Some(deadline))?.is_none() {
                    bail!("only {i} of {count} messages within {timeout_ms} ms");
                }
                let got = <[u8; 8]>::try_from(buf.as_slice())
                    .ok()
                    .map(u64::from_le_bytes);
                if got != Some(i) {
                    bail!("message {i} was {got:?}: out of order, lost or repeated");
                }
            }
            println!("all {count} in order");
            Ok(())
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
