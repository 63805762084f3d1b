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
    /// Where programs shipped from other nodes are kept, by content
    /// (default: /var/cache/nefele/bin as root, else ~/.cache/nefele/bin).
    #[arg(long, env = procmgr::ship::CACHE_DIR_ENV)]
    cache_dir: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    fabric::cli::report("procmgrd", run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let socket = cli
        .socket
        .unwrap_or_else(fabric::daemon::default_socket_path);
    let mut pm = procmgr::daemon::ProcMgr::open(&socket)?;
    if let Some(dir) = cli.cache_dir {
        pm = pm.cache_dir(dir);
    }
    pm.run()
}
