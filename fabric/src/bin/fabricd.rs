//! `fabricd`: the Nefele node daemon (name table, ring hand-over).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fabric::daemon::{self, Config, Daemon, SOCKET_ENV};

/// The Nefele node daemon: gives mailboxes their port ids, keeps the node's
/// name table, hands out shared-memory rings and cleans up after processes
/// that die.
///
/// Default control socket: $NEFELE_FABRICD_SOCKET, else /run/nefele/fabricd.sock
/// for root, else $XDG_RUNTIME_DIR/nefele/fabricd.sock, else
/// /tmp/nefele-$UID/fabricd.sock.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Control socket path.
    #[arg(long, env = SOCKET_ENV, global = true)]
    socket: Option<PathBuf>,
    #[command(flatten)]
    node: fabric::cli::NodeArgs,
    /// Data bytes of each sender→receiver ring (a power of two, 4 KiB..1 GiB).
    #[arg(long, default_value_t = fabric::ring::DEFAULT_RING_CAPACITY_BYTES)]
    ring_capacity_bytes: usize,
    /// Most mailboxes served at once.
    #[arg(long, default_value_t = daemon::DEFAULT_MAX_MAILBOXES)]
    max_mailboxes: usize,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve in the foreground (the default).
    Run,
    /// Print a running daemon's counters.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Let tenant SRC's mailboxes send to tenant DST's (root only).
    ///
    /// One direction; a tenant always reaches itself, and no other tenant
    /// unless allowed. The kernel enforces the policy on the eBPF path and
    /// fabricd when a sender asks for a ring.
    /// Tenants are uids, or what root clients join.
    Allow {
        /// The sending tenant.
        src: u32,
        /// The receiving tenant.
        dst: u32,
    },
    /// Withdraw an `allow` (root only).
    ///
    /// SRC's messages to DST are refused again (and counted), on the eBPF
    /// path and on rings, those made before included.
    Revoke {
        /// The sending tenant.
        src: u32,
        /// The receiving tenant.
        dst: u32,
    },
}

/// `fabricd allow` and `fabricd revoke`.
fn set_tenant_policy(
    socket_path: &std::path::Path,
    src: u32,
    dst: u32,
    allow: bool,
) -> anyhow::Result<()> {
    let mut mb = fabric::client::Mailbox::open_at(socket_path)?;
    mb.set_tenant_policy(src, dst, allow)
        .context("changing the tenant policy")?;
    let verb = if allow {
        "may now send"
    } else {
        "may no longer send"
    };
    println!("tenant {src} {verb} to tenant {dst}");
    Ok(())
}

fn main() -> std::process::ExitCode {
    fabric::cli::report("fabricd", run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let socket_path = cli
        .socket
        .clone()
        .unwrap_or_else(daemon::default_socket_path);
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let cfg = Config {
                ring_capacity_bytes: cli.ring_capacity_bytes,
                max_mailboxes: cli.max_mailboxes,
                ..cli.node.daemon_config(socket_path)
            };
            let stop = fabric::cli::StopSignals::catch().context("catching SIGTERM and SIGINT")?;
            let d = Daemon::start(cfg)?;
            eprintln!(
                "fabricd: node {} serving {}{}; ebpf: {}; rdma: {}",
                d.config().node_id,
                d.socket_path().display(),
                d.config()
                    .cluster
                    .as_ref()
                    .map_or(String::new(), |c| format!(
                        "; cluster {:?} at {}",
                        c.cluster_id, c.listen
                    )),
                d.stats().ebpf,
                d.stats().rdma
            );
            let signal = stop.wait();
            eprintln!("fabricd: stopping (signal {signal})");
            drop(d);
            Ok(())
        }
        Command::Allow { src, dst } => set_tenant_policy(&socket_path, src, dst, true),
        Command::Revoke { src, dst } => set_tenant_policy(&socket_path, src, dst, false),
        Command::Status { json } => {
            let mut mb = fabric::client::Mailbox::open_at(&socket_path)?;
            let s = mb
                .daemon_stats()
                .context("asking fabricd for its counters")?;
            // Our own status mailbox is counted; leave it out.
            let mailboxes = s.mailboxes.saturating_sub(1);
            let shm = s.shm_segments.saturating_sub(1);
            if json {
                let status = serde_json::json!({
                    "socket": socket_path.display().to_string(),
                    "node": mb.port().node,
                    "mailboxes": mailboxes,
                    "bindings": s.bindings,
                    "rings": s.rings,
                    "rings_ready": s.rings_ready,
                    "ring_pool": s.ring_pool,
                    "shm_segments": shm,
                    "subscriptions": s.subscriptions,
                    "ebpf": s.ebpf,
                    "ebpf_mailboxes": s.ebpf_mailboxes,
                    "ebpf_denied": s.ebpf_denied.iter().map(|c| serde_json::json!({"tenant": c.tenant, "messages": c.count})).collect::<Vec<_>>(),
                    "rdma": s.rdma,
                    "rdma_links": s.rdma_links,
                    "link_held_bytes": s.link_held_bytes,
                    "paused_pairs": s.paused_pairs,
                    "direct_links_in": s.direct_links_in,
                    "direct_links_accepted": s.direct_links_accepted,
                });
                println!("{status}");
            } else {
                println!("socket         {}", socket_path.display());
                println!("node           {}", mb.port().node);
                println!("mailboxes      {mailboxes}");
                println!("bindings       {}", s.bindings);
                println!("rings          {}", s.rings);
                println!(
                    "rings ready    {} of {} (made ahead for senders' first sends)",
                    s.rings_ready, s.ring_pool
                );
                println!("shm segments   {shm}");
                println!("subscriptions  {}", s.subscriptions);
                println!("ebpf           {}", s.ebpf);
                if s.ebpf == "available" {
                    println!("ebpf sockets   {}", s.ebpf_mailboxes);
                }
                // Refused by the tenant policy: in the kernel, and rings
                // refused by this daemon.
                if s.ebpf_denied.is_empty() {
                    println!("denied         none");
                }
                for c in &s.ebpf_denied {
                    let plural = if c.count == 1 { "" } else { "s" };
                    println!(
                        "denied         tenant {}: {} message{plural}",
                        c.tenant, c.count
                    );
                }
                println!("rdma           {}", s.rdma);
                println!("rdma links     {}", s.rdma_links);
                println!(
                    "held bytes     {} (by incoming node links, for full receivers)",
                    s.link_held_bytes
                );
                println!(
                    "paused pairs   {} (at this node's gateways, their receivers full)",
                    s.paused_pairs
                );
                println!(
                    "direct links   {} (from mailboxes on other nodes, bypassing the node links; {} since start)",
                    s.direct_links_in, s.direct_links_accepted
                );
            }
            Ok(())
        }
    }
}
