//! What the command-line tools share.

use std::process::ExitCode;

/// Ends a tool: on error prints `tool: error: cause: …` on one line (never a
/// backtrace, whatever `RUST_BACKTRACE` says: users need the reason, not
/// our stack) and exits with status 1.
pub fn report(tool: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT (what `nefele down` and Ctrl-C send), caught from
/// the moment this is made, so that a daemon can stop cleanly: its socket
/// file removed, what its gateways hold forwarded, the cluster told it
/// leaves. Make it before the daemon serves: a stop requested as soon as
/// the socket answers must not meet the default action (death, the socket
/// file left behind).
pub struct StopSignals(signal_hook::iterator::Signals);

impl StopSignals {
    pub fn catch() -> std::io::Result<StopSignals> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        Ok(StopSignals(signal_hook::iterator::Signals::new([
            SIGTERM, SIGINT,
        ])?))
    }

    /// Waits for one of them (or one that came already) and returns it.
    pub fn wait(mut self) -> i32 {
        self.0
            .forever()
            .next()
            .unwrap_or(signal_hook::consts::SIGTERM)
    }
}

/// How a node daemon joins a cluster: the flags `fabricd` and `nefele up`
/// share.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NodeArgs {
    /// This node's id (the node part of every port id it gives out).
    /// Default: 1 on a single node; in a cluster, the low 16 bits of the
    /// --listen IPv4 address (10.77.0.3 is node 3).
    #[arg(long)]
    pub node_id: Option<u32>,
    /// Join a cluster: the address (ip:port) other nodes reach this one at,
    /// for gossip (UDP) and node links (TCP). Without it the node runs alone.
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Nodes of the cluster can only see nodes with the same cluster id.
    #[arg(long, default_value = "nefele", requires = "listen")]
    pub cluster_id: String,
    /// A node to contact first (repeatable). Without seeds, nodes find each
    /// other by broadcast on the --listen address's subnet.
    #[arg(long = "seed", value_name = "IP:PORT", requires = "listen")]
    pub seeds: Vec<std::net::SocketAddr>,
    /// Do not announce or look for nodes by broadcast (seeds only).
    #[arg(long, requires = "listen")]
    pub no_broadcast: bool,
    /// Run without the eBPF mailbox path (otherwise loaded at start when
    /// the daemon may: root or CAP_BPF).
    #[arg(long)]
    pub no_ebpf: bool,
    /// Permissions of the control socket, in octal. Default: 666 for a
    /// daemon run by root (every local user may open mailboxes; each is
    /// the tenant of its uid, and the tenant policy keeps tenants apart),
    /// otherwise as the umask leaves them. A client needs write permission.
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,
    /// Node links over TCP only (otherwise they try the machine's first
    /// RDMA device, when built with the `rdma` feature and one exists).
    #[arg(long, requires = "listen")]
    pub no_rdma: bool,
}

/// An octal file mode such as `660` or `0666`.
fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "{s:?} is not an octal mode from 000 to 777 (say 660)"
        )),
    }
}

impl NodeArgs {
    /// The cluster configuration these flags ask for, if any.
    pub fn cluster(&self) -> Option<crate::cluster::ClusterConfig> {
        let listen = self.listen?;
        let mut c = crate::cluster::ClusterConfig::new(self.cluster_id.clone(), listen);
        c.seeds = self.seeds.clone();
        c.broadcast = !self.no_broadcast;
        if self.no_rdma {
            c.rdma = crate::rdma::RdmaMode::Off;
        }
        Some(c)
    }

    /// The node id: given, implied by the cluster address, or 1.
    pub fn node_id(&self) -> u32 {
        self.node_id
            .or_else(|| self.listen.map(crate::cluster::node_id_for))
            .unwrap_or(1)
    }

    /// A daemon configuration for `socket_path` with these flags.
    pub fn daemon_config(&self, socket_path: std::path::PathBuf) -> crate::daemon::Config {
        let root = nix::unistd::Uid::effective().is_root();
        crate::daemon::Config {
            socket_path,
            node_id: self.node_id(),
            cluster: self.cluster(),
            ebpf: !self.no_ebpf,
            socket_mode: self.socket_mode.or(root.then_some(0o666)),
            ..Default::default()
        }
    }
}
