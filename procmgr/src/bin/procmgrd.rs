//! `procmgrd`: the Nefele process manager of one node.

use std::path::PathBuf;

use clap::Parser;

/// The Nefele process manager: serves spawn, wait, kill and list requests
/// for its node over the fabric (at procmgr@{1000,N,N}, N being the node id
/// of the fabricd it connects to). `nefele up` runs it together with a
/// fabricd.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// fabricd control socket.
    #[arg(long, env = fabric::daemon::SOCKET_ENV)]
    socket: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    fabric::cli::report("procmgrd", run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let socket = cli
        .socket
        .unwrap_or_else(fabric::daemon::default_socket_path);
    procmgr::daemon::ProcMgr::open(&socket)?.run()
}
