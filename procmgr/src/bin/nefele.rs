//! `nefele`: run programs on Nefele and manage their processes.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use procmgr::client::ProcClient;
use procmgr::pid::GlobalPid;

/// Run programs on Nefele and manage their processes.
///
/// `nefele run PROGRAM` needs nothing else: it starts a single-node fabric
/// and process manager inside itself. The other commands talk to a node
/// started with `nefele up`, found through $NEFELE_FABRICD_SOCKET or the
/// default socket path.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// fabricd control socket (default: $NEFELE_FABRICD_SOCKET, else the
    /// documented default path).
    #[arg(long, env = fabric::daemon::SOCKET_ENV, global = true)]
    socket: Option<PathBuf>,
    /// Print one JSON object per line instead of text (errors too, on
    /// stderr: {"error": "…"}); `logs` gives {"pid", "stream", "offset",
    /// "data"} per chunk.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run PROGRAM on an embedded single-node Nefele and exit with its status.
    Run {
        program: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Serve this node (fabricd and procmgrd) in the foreground; with
    /// --listen it joins (or founds) a cluster.
    Up {
        #[command(flatten)]
        node: fabric::cli::NodeArgs,
        /// Where programs shipped from other nodes are kept, by content
        /// (default: /var/cache/nefele/bin as root, else
        /// ~/.cache/nefele/bin).
        #[arg(long, env = procmgr::ship::CACHE_DIR_ENV)]
        cache_dir: Option<PathBuf>,
    },
    /// List the cluster's nodes with their state and capacity.
    Nodes,
    /// List the bindings this node knows, its own and the cluster's, each
    /// with the tenant of the mailbox that bound it (a name resolves only
    /// within its tenant, and tenant 0's for everyone).
    Names,
    /// Stop this node (the process serving the socket: `nefele up` or
    /// fabricd) and wait until it is gone (at most 10 s). The cluster
    /// notices within its failure-detection bound.
    Down,
    /// List the processes of the cluster (every live node's procmgrd).
    Ps {
        /// Only what this node's procmgrd tracks (the processes it runs
        /// and those it placed elsewhere), without asking the others.
        #[arg(long)]
        local: bool,
    },
    /// Start PROGRAM (N copies with -n) somewhere in the cluster and print
    /// the global pids (node.generation.local).
    Spawn {
        #[arg(short = 'n', long, default_value_t = 1)]
        count: u32,
        /// Where: default (one process: any; several: spread), local, any
        /// (power of two choices on load), spread (over the nodes).
        #[arg(long, value_enum, default_value_t = PlacementArg::Default)]
        placement: PlacementArg,
        /// Start them on this node (overrides --placement).
        #[arg(long)]
        node: Option<u32>,
        /// Memory limit per process (cgroup v1 memory.limit_in_bytes), in
        /// bytes or with a K, M or G suffix: 64M.
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        /// Most processes and threads per process (cgroup v1 pids.max).
        #[arg(long)]
        pids: Option<u32>,
        /// CPU weight per process (cgroup v1 cpu.shares; 1024 is the default).
        #[arg(long)]
        cpu_shares: Option<u32>,
        program: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Send a signal (default SIGTERM) to a process.
    Kill {
        pid: String,
        #[arg(short, long, default_value_t = libc::SIGTERM)]
        signal: i32,
    },
    /// Wait for processes to exit and print each one's status (in the
    /// order given). Several show a progress bar on a terminal.
    Wait {
        #[arg(required = true, num_args = 1..)]
        pids: Vec<String>,
    },
    /// Print a process's captured output (stdout; --stderr for stderr),
    /// from any node. procmgrd keeps the last 1 MiB of each stream.
    Logs {
        pid: String,
        /// Its stderr instead of its stdout.
        #[arg(long)]
        stderr: bool,
        /// Keep printing new output until the process closes the stream.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PlacementArg {
    Default,
    Local,
    Any,
    Spread,
}

/// "65536", "64K", "64M", "2G" (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size: give bytes, or a number with K, M or G"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s} is too large"))
}

fn parse_pid(s: &str) -> anyhow::Result<GlobalPid> {
    let parts: Vec<&str> = s.split('.').collect();
    match parts.as_slice() {
        [n, g, l] => Ok(GlobalPid::new(n.parse()?, g.parse()?, l.parse()?)),
        [raw] => Ok(GlobalPid(raw.parse().with_context(|| {
            format!("{s:?} is not a global pid (node.generation.local, or a number)")
        })?)),
        _ => bail!("{s:?} is not a global pid (node.generation.local, or a number)"),
    }
}

fn describe(status: i32) -> String {
    if status == procmgr::pid::NODE_LOST {
        "node lost".into()
    } else if libc::WIFEXITED(status) {
        format!("exited {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Err(e) if json => {
            eprintln!("{}", serde_json::json!({"error": format!("{e:#}")}));
            std::process::ExitCode::FAILURE
        }
        result => fabric::cli::report("nefele", result),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(fabric::daemon::default_socket_path);
    match cli.command {
        Cmd::Run { program, args } => {
            let dir = std::env::temp_dir().join(format!("nefele-run-{}", std::process::id()));
            let cfg = fabric::daemon::Config {
                socket_path: dir.join("fabricd.sock"),
                ..Default::default()
            };
            let daemon = fabric::daemon::Daemon::start(cfg)?;
            procmgr::daemon::ProcMgr::open(daemon.socket_path())?.spawn_thread()?;
            let mut client = ProcClient::open_at(daemon.socket_path())?;
            let path = resolve(&program)?;
            let mut argv = vec![program.clone()];
            argv.extend(args);
            let pid = client.spawn(&path, &argv, &[], 1)?[0];
            let exited = client
                .wait(Some(pid), false)?
                .context("the program's status was lost")?;
            drop(client);
            drop(daemon);
            let _ = std::fs::remove_dir_all(&dir);
            let st = exited.status;
            if json {
                // stdout is the program's.
                eprintln!(
                    "{}",
                    serde_json::json!({"pid": exited.pid.to_string(), "status": st, "state": describe(st)})
                );
            }
            std::process::exit(if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else if libc::WIFSIGNALED(st) {
                128 + libc::WTERMSIG(st)
            } else {
                1
            });
        }
        Cmd::Up { node, cache_dir } => {
            let stop = fabric::cli::StopSignals::catch()?;
            let daemon = fabric::daemon::Daemon::start(node.daemon_config(socket.clone()))?;
            let node_id = daemon.config().node_id;
            let mut pm = procmgr::daemon::ProcMgr::open(daemon.socket_path())?;
            if let Some(dir) = cache_dir {
                pm = pm.cache_dir(dir);
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({"node": node_id, "socket": socket.display().to_string(), "state": "up"})
                );
            } else {
                eprintln!(
                    "nefele: node {node_id} up at {}; processes inherit this terminal's output",
                    socket.display()
                );
            }
            // `nefele down` (SIGTERM) or Ctrl-C: the daemon stops cleanly
            // (socket file removed, the cluster told) and the process ends.
            let daemon = std::sync::Arc::new(std::sync::Mutex::new(Some(daemon)));
            let on_signal = daemon.clone();
            std::thread::Builder::new()
                .name("nefele-stop".into())
                .spawn(move || {
                    let signal = stop.wait();
                    eprintln!("nefele: node {node_id} stopping (signal {signal})");
                    drop(on_signal.lock().unwrap_or_else(|p| p.into_inner()).take());
                    std::process::exit(0);
                })?;
            let result = pm.run();
            drop(daemon.lock().unwrap_or_else(|p| p.into_inner()).take());
            result
        }
        Cmd::Nodes => {
            let list = fabric::client::Mailbox::open_at(&socket)?.nodes()?;
            if !json {
                println!(
                    "{:>5}  {:<5}  {:<21}  {:>5}  {:>10}  {:>6}  LINK",
                    "NODE", "STATE", "ADDRESS", "CORES", "MEM FREE", "LOAD"
                );
            }
            for n in list.nodes {
                let state = if n.alive { "alive" } else { "dead" };
                let me = if n.node == list.self_node {
                    "  (this node)"
                } else {
                    ""
                };
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"node": n.node, "state": state, "address": n.address, "cores": n.cores, "mem_available_bytes": n.mem_available_bytes, "load": f64::from(n.load_milli) / 1000.0, "link": n.link, "self": n.node == list.self_node})
                    );
                } else {
                    println!(
                        "{:>5}  {:<5}  {:<21}  {:>5}  {:>7} MiB  {:>6.2}  {}{me}",
                        n.node,
                        state,
                        if n.address.is_empty() {
                            "-"
                        } else {
                            &n.address
                        },
                        n.cores,
                        n.mem_available_bytes >> 20,
                        f64::from(n.load_milli) / 1000.0,
                        if n.link.is_empty() { "-" } else { &n.link }
                    );
                }
            }
            Ok(())
        }
        Cmd::Names => {
            let mut list = fabric::client::Mailbox::open_at(&socket)?.bindings()?;
            list.sort_by_key(|b| (b.address.to_string(), b.port));
            for b in list {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"address": b.address.to_string(), "port": b.port.to_string(), "node": b.port.node, "tenant": b.tenant})
                    );
                } else {
                    println!(
                        "{:<32} {:<16} tenant {}",
                        b.address.to_string(),
                        b.port,
                        b.tenant
                    );
                }
            }
            Ok(())
        }
        Cmd::Down => {
            let pid = fabric::client::Mailbox::open_at(&socket)?.daemon_pid()?;
            if pid == std::process::id() {
                bail!("the daemon at {} is this process", socket.display());
            }
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .with_context(|| format!("signalling the daemon (pid {pid})"))?;
            let t0 = std::time::Instant::now();
            let bar = spinner(&format!("stopping the node (pid {pid})"), json);
            while fabric::ctlsock::connect(&socket).is_ok() {
                if t0.elapsed() > std::time::Duration::from_secs(10) {
                    bail!("the daemon (pid {pid}) still answers 10 s after SIGTERM");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            bar.finish_and_clear();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"socket": socket.display().to_string(), "pid": pid, "state": "down"})
                );
            } else {
                eprintln!("nefele: node at {} is down (pid {pid})", socket.display());
            }
            Ok(())
        }
        Cmd::Ps { local } => {
            let mut c = ProcClient::open_at(&socket)?;
            // Every live node's procmgrd, each process once: from the node
            // it runs on (the node that placed it also keeps a record).
            let mut by_pid: std::collections::BTreeMap<u64, procmgr::proto::ProcessInfo> =
                Default::default();
            let lists = if local {
                vec![c.list()?]
            } else {
                let mut lists = Vec::new();
                for node in c.live_nodes()? {
                    match c.list_on(node) {
                        Ok(l) => lists.push(l),
                        Err(e) => eprintln!("nefele: node {node} did not answer: {e}"),
                    }
                }
                lists
            };
            for p in lists.into_iter().flatten() {
                let better = by_pid
                    .get(&p.pid)
                    .is_none_or(|q| q.os_pid == 0 && p.os_pid != 0);
                if better {
                    by_pid.insert(p.pid, p);
                }
            }
            if !json {
                println!(
                    "{:<20} {:>5} {:>8}  {:<18} PATH",
                    "PID", "NODE", "OS PID", "STATE"
                );
            }
            for p in by_pid.into_values() {
                let state = if p.running {
                    "running".to_string()
                } else {
                    describe(p.status)
                };
                let node = GlobalPid(p.pid).node();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"pid": GlobalPid(p.pid).to_string(), "node": node, "parent": GlobalPid(p.parent).to_string(), "os_pid": p.os_pid, "path": p.path, "state": state})
                    );
                } else {
                    println!(
                        "{:<20} {:>5} {:>8}  {:<18} {}",
                        GlobalPid(p.pid).to_string(),
                        node,
                        p.os_pid,
                        state,
                        p.path
                    );
                }
            }
            Ok(())
        }
        Cmd::Spawn {
            count,
            placement,
            node,
            memory,
            pids,
            cpu_shares,
            program,
            args,
        } => {
            let limits = (memory.is_some() || pids.is_some() || cpu_shares.is_some()).then(|| {
                procmgr::proto::Limits {
                    memory_bytes: memory.unwrap_or(0),
                    pids: pids.unwrap_or(0),
                    cpu_shares: cpu_shares.unwrap_or(0),
                }
            });
            use procmgr::client::Placement;
            let placement = match (node, placement) {
                (Some(n), _) => Placement::Node(n),
                (None, PlacementArg::Default) => Placement::Default,
                (None, PlacementArg::Local) => Placement::Local,
                (None, PlacementArg::Any) => Placement::Any,
                (None, PlacementArg::Spread) => Placement::Spread,
            };
            let mut c = ProcClient::open_at(&socket)?;
            let mut argv = vec![program.clone()];
            argv.extend(args);
            let path = resolve(&program)?;
            // One request: a spinner while the nodes start them (and fetch
            // the program if they lack it).
            let bar = spinner(&format!("starting {count} × {program}"), json || count < 2);
            let spawned = c.spawn_limited(&path, &argv, &[], count, placement, limits);
            bar.finish_and_clear();
            for p in spawned? {
                if json {
                    println!("{}", serde_json::json!({"pid": p.to_string()}));
                } else {
                    println!("{p}");
                }
            }
            Ok(())
        }
        Cmd::Kill { pid, signal } => {
            let pid = parse_pid(&pid)?;
            ProcClient::open_at(&socket)?.kill(pid, signal)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"pid": pid.to_string(), "signal": signal, "sent": true})
                );
            }
            Ok(())
        }
        Cmd::Logs {
            pid,
            stderr,
            follow,
        } => {
            use std::io::Write as _;
            let pid = parse_pid(&pid)?;
            let stream = if stderr { 2 } else { 1 };
            let mut client = ProcClient::open_at(&socket)?;
            let mut offset = 0u64;
            let mut out = std::io::stdout().lock();
            loop {
                let chunk = client.logs(pid, stream, offset)?;
                if chunk.offset > offset && !json {
                    eprintln!(
                        "nefele: {} bytes of {pid}'s output were dropped (procmgrd keeps the last 1 MiB)",
                        chunk.offset - offset
                    );
                }
                offset = chunk.offset + chunk.data.len() as u64;
                if !chunk.data.is_empty() {
                    if json {
                        let line = serde_json::json!({"pid": pid.to_string(), "stream": if stderr {"stderr"} else {"stdout"}, "offset": chunk.offset, "data": String::from_utf8_lossy(&chunk.data)});
                        writeln!(out, "{line}")?;
                    } else {
                        out.write_all(&chunk.data)?;
                    }
                    out.flush()?;
                    continue;
                }
                if chunk.closed || !follow {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        Cmd::Wait { pids } => {
            let pids = pids
                .iter()
                .map(|p| parse_pid(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut client = ProcClient::open_at(&socket)?;
            let bar = progress(pids.len() as u64, "exited", json);
            for pid in pids {
                let e = client
                    .wait(Some(pid), false)
                    .with_context(|| format!("waiting for {pid}"))?
                    .context("no status")?;
                let line = if json {
                    serde_json::json!({"pid": e.pid.to_string(), "status": e.status, "state": describe(e.status)}).to_string()
                } else {
                    format!("{} {}", e.pid, describe(e.status))
                };
                bar.suspend(|| println!("{line}"));
                bar.inc(1);
            }
            bar.finish_and_clear();
            Ok(())
        }
    }
}

/// A bar of `len` steps on stderr, drawn only on a terminal and not when
/// `quiet` (JSON output).
fn progress(len: u64, what: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet || len < 2 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what} ({{elapsed}})"
        ))
        .expect("a valid template"),
    );
    bar
}

/// A spinner saying `what` on stderr, drawn only on a terminal and not
/// when `quiet`.
fn spinner(what: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(what.to_string());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// An absolute path for PROGRAM: as given if it has a '/', else from $PATH.
fn resolve(program: &str) -> anyhow::Result<String> {
    if program.contains('/') {
        let p =
            std::fs::canonicalize(program).with_context(|| format!("no program at {program}"))?;
        return Ok(p.display().to_string());
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return Ok(candidate.display().to_string());
        }
    }
    bail!("{program} is not in $PATH; give a path")
}
