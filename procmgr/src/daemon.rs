//! `procmgrd`: starts processes for callers, reports their exits, kills
//! them on request.
//!
//! One mailbox, one loop: requests arrive as messages, and so do exits —
//! each child has a reaper thread that waits for exactly that child (never
//! `waitpid(-1)`, which would steal other children of the hosting process)
//! and reports its status to the loop over an in-process mailbox.
//!
//! Children's stdout and stderr are pipes: a capture thread per child keeps
//! the last [`MAX_LOG_BYTES`] of each for `logs` and copies them on to the
//! daemon's own stdout and stderr (so a node in a terminal still shows its
//! processes' output). When a process that
//! Nefele started exits, its still-running children are killed (SIGKILL):
//! an orphaned worker has nobody to report to.
//!
//! Across the cluster: a client always asks its own node's procmgrd (the
//! *origin*). It places the processes ([`Placement`](proto::Placement):
//! power of two choices on gossiped load, or spread) and forwards each
//! remote part to that node's procmgrd, which starts them and reports their
//! exits back to the origin. So the origin holds the record of every
//! process it placed, wherever it runs: waits (also "any child") are
//! answered there, kills are forwarded to the right node, and when a node
//! is lost (its procmgrd's binding withdrawn by membership) its processes
//! end with the status [`pid::NODE_LOST`]. Forwarded requests never block
//! the loop: their answers arrive as messages like everything else.
//!
//! A node's processes outlive its procmgrd if it is killed outright
//! (SIGKILL): nothing can wait for them any more, and the origin reports
//! them `NODE_LOST` once membership declares the node dead.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric::addr::PortId;
use fabric::client::Mailbox;
use fabric::ring::SendMode;
use prost::Message as _;

use crate::pid::{self, GlobalPid};
use crate::proto::{self, request, response, ErrorCode};
use crate::{service_address, PID_ENV};

/// Most processes one procmgrd tracks at once (running or not yet waited for).
pub const MAX_PROCESSES: usize = 4096;
/// Most processes one request may start.
pub const MAX_SPAWN_COUNT: u32 = 1024;
/// How often the nodes of running remote processes are checked.
pub const NODE_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// How long a request forwarded to another node's procmgrd may go
/// unanswered before it fails.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests forwarded to other nodes and not yet answered.
pub const MAX_FORWARDED: usize = 4096;
/// Bytes of each process's stdout and of its stderr kept for `logs` (the
/// newest; older bytes are dropped, and a reader is told where its data
/// starts).
pub const MAX_LOG_BYTES: usize = 1 << 20;
/// Processes whose output is kept; beyond that the oldest finished go.
pub const MAX_LOGGED_PROCESSES: usize = 1024;
/// Largest chunk one `logs` answer carries.
pub const MAX_LOG_CHUNK_BYTES: usize = 256 << 10;

/// One captured output stream: its newest bytes and where they start.
#[derive(Default)]
struct LogStream {
    buf: std::collections::VecDeque<u8>,
    /// Offset of `buf[0]` in the whole stream.
    start: u64,
    closed: bool,
}

impl LogStream {
    fn append(&mut self, bytes: &[u8]) {
        self.buf.extend(bytes);
        let excess = self.buf.len().saturating_sub(MAX_LOG_BYTES);
        if excess > 0 {
            self.buf.drain(..excess);
            self.start += excess as u64;
        }
    }

    fn chunk(&self, offset: u64, max: usize) -> proto::LogChunk {
        let from = offset.max(self.start);
        let skip = (from - self.start) as usize;
        let data: Vec<u8> = self.buf.iter().skip(skip).take(max).copied().collect();
        proto::LogChunk {
            data,
            offset: from,
            closed: self.closed,
        }
    }
}

/// A process's stdout and stderr, as captured.
#[derive(Default)]
struct ProcLog {
    streams: [LogStream; 2],
}

type SharedLog = Arc<Mutex<ProcLog>>;

struct Proc {
    parent: u64,
    path: String,
    /// 0 for a process on another node (placed there by this procmgrd).
    os_pid: u32,
    /// POSIX status once exited.
    status: Option<i32>,
    /// The node whose procmgrd placed this process here, to report its
    /// exit to; `None` when this procmgrd placed it.
    origin: Option<u32>,
    /// Its cgroups, if it has limits (removed when it exits).
    groups: crate::cgroup::Groups,
}

impl Proc {
    fn is_remote(&self) -> bool {
        self.os_pid == 0
    }
}

/// A spawn request waiting for other nodes' parts.
struct SpawnGroup {
    to: PortId,
    id: u64,
    parent: u64,
    path: String,
    pids: Vec<u64>,
    remaining: usize,
    error: Option<String>,
}

/// What a request forwarded to another node's procmgrd was for.
enum Forwarded {
    Spawn {
        group: u64,
    },
    /// A kill or a logs request for a process of that node: its answer
    /// goes to `client`, if anyone (orphan kills have nobody).
    Relay {
        client: Option<(PortId, u64)>,
    },
    /// A chunk of a program being shipped here.
    Fetch {
        shipment: u64,
    },
}

/// A forwarded spawn waiting for its program to arrive from its origin.
struct PendingSpawn {
    from: PortId,
    id: u64,
    via: bool,
    spawn: proto::Spawn,
}

/// A program being fetched from `origin`, and the spawns that wait for it
/// (several forwarded spawns of one program share one transfer).
struct Shipment {
    origin: u32,
    path: String,
    cwd: String,
    fetching: crate::ship::Fetching,
    spawns: Vec<PendingSpawn>,
    started: Instant,
}

struct Sent {
    what: Forwarded,
    node: u32,
    at: Instant,
}

struct Waiter {
    to: PortId,
    id: u64,
    pid: u64,
    parent: u64,
}

/// A procmgrd serving the node of the fabricd at `socket`.
pub struct ProcMgr {
    mailbox: Mailbox,
    reaper: Arc<Mutex<Mailbox>>,
    socket: PathBuf,
    node: u16,
    /// Random per start, so a restarted procmgrd does not reuse pids.
    generation: u16,
    /// The local part of the next global pid: a node-local sequence
    /// number, known before the fork so the child's environment can carry
    /// its global pid.
    next_local: u32,
    procs: HashMap<u64, Proc>,
    waiters: Vec<Waiter>,
    /// Children's stdout is captured only, not also copied to ours.
    discard_stdout: bool,
    /// Where the cgroup v1 controllers are mounted.
    cgroup_root: PathBuf,
    /// Captured output of this node's processes, oldest first.
    logs: HashMap<u64, SharedLog>,
    log_order: std::collections::VecDeque<u64>,
    groups: HashMap<u64, SpawnGroup>,
    forwarded: HashMap<u64, Sent>,
    next_forward: u64,
    /// Where the next SPREAD placement starts looking, so equal nodes
    /// take turns.
    spread_cursor: usize,
    /// The live nodes as last asked of fabricd, and when: placement asks
    /// again at most every [`NODE_CHECK_INTERVAL`] (what it places itself
    /// it counts anyway).
    live_nodes: Option<(Instant, Vec<fabric::proto::NodeInfo>)>,
    /// Programs other nodes fetch from here.
    source: crate::ship::Source,
    /// Programs fetched from other nodes, by content.
    cache: crate::ship::Cache,
    shipments: HashMap<u64, Shipment>,
    next_shipment: u64,
}

impl ProcMgr {
    /// Opens its mailboxes on the fabricd at `socket` and binds the
    /// node's procmgr address.
    pub fn open(socket: &Path) -> anyhow::Result<ProcMgr> {
        let mut mailbox = Mailbox::open_at(socket)?;
        let node = mailbox.port().node;
        mailbox.bind(&service_address(node))?;
        let reaper = Arc::new(Mutex::new(Mailbox::open_at(socket)?));
        Ok(ProcMgr {
            mailbox,
            reaper,
            socket: socket.to_path_buf(),
            node: node as u16,
            generation: rand::random(),
            next_local: 1,
            procs: HashMap::new(),
            waiters: Vec::new(),
            discard_stdout: false,
            cgroup_root: PathBuf::from(crate::cgroup::DEFAULT_ROOT),
            logs: HashMap::new(),
            log_order: std::collections::VecDeque::new(),
            groups: HashMap::new(),
            forwarded: HashMap::new(),
            next_forward: 1,
            spread_cursor: 0,
            live_nodes: None,
            source: Default::default(),
            cache: crate::ship::Cache::new(crate::ship::Cache::default_dir()),
            shipments: HashMap::new(),
            next_shipment: 1,
        })
    }

    /// Looks for the cgroup v1 controllers under `root` instead of
    /// [`DEFAULT_ROOT`](crate::cgroup::DEFAULT_ROOT).
    pub fn cgroup_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.cgroup_root = root.into();
        self
    }

    /// Keeps programs shipped from other nodes in `dir` instead of
    /// [`Cache::default_dir`](crate::ship::Cache::default_dir).
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache = crate::ship::Cache::new(dir);
        self
    }

    /// Sends the children's stdout to /dev/null (their stderr still comes
    /// through): for benchmarks that print their own results.
    pub fn discard_stdout(mut self) -> Self {
        self.discard_stdout = true;
        self
    }

    /// Serves in a thread of this process (embedded single nodes, tests,
    /// benchmarks), until the fabric connection is lost.
    pub fn spawn_thread(self) -> std::io::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
        std::thread::Builder::new()
            .name("procmgrd".into())
            .spawn(move || self.run())
    }

    /// Serves until the fabric connection is lost.
    pub fn run(mut self) -> anyhow::Result<()> {
        let reaper_port = lock(&self.reaper).port();
        let mut buf = Vec::new();
        let mut last_check = Instant::now();
        loop {
            let got = self
                .mailbox
                .recv_into(&mut buf, Some(Instant::now() + NODE_CHECK_INTERVAL))?;
            if last_check.elapsed() >= NODE_CHECK_INTERVAL {
                self.check_nodes();
                last_check = Instant::now();
            }
            let Some(from) = got else {
                continue;
            };
            let req = match proto::Request::decode(&buf[..]) {
                Ok(r) => r,
                Err(e) => {
                    self.answer(
                        from,
                        0,
                        false,
                        error(
                            ErrorCode::ErrorBadRequest,
                            format!("undecodable request: {e}"),
                        ),
                    );
                    continue;
                }
            };
            let via = req.from_procmgr;
            match req.body {
                Some(request::Body::ChildExited(e))
                    if from == reaper_port
                        || self.procs.get(&e.pid).is_some_and(|p| p.is_remote()) =>
                {
                    self.exited(e.pid, e.status)
                }
                Some(request::Body::ChildExited(_)) => self.answer(
                    from,
                    req.id,
                    via,
                    error(ErrorCode::ErrorBadRequest, "not accepted from outside"),
                ),
                Some(request::Body::Spawn(s)) => self.spawn(from, req.id, via, s),
                Some(request::Body::Wait(w)) => self.wait(from, req.id, w),
                Some(request::Body::Kill(k)) => self.kill_request(from, req.id, via, k),
                Some(request::Body::Logs(l)) => self.logs_request(from, req.id, via, l),
                Some(request::Body::Fetch(f)) => {
                    let body = match self.source.chunk(&f.path, &f.cwd, f.offset, f.max_bytes) {
                        Ok(c) => response::Body::BinaryChunk(c),
                        Err(msg) => error(ErrorCode::ErrorSpawnFailed, msg),
                    };
                    self.answer(from, req.id, via, body);
                }
                Some(request::Body::List(_)) => {
                    let processes = self
                        .procs
                        .iter()
                        .map(|(&pid, p)| proto::ProcessInfo {
                            pid,
                            parent: p.parent,
                            path: p.path.clone(),
                            running: p.status.is_none(),
                            status: p.status.unwrap_or(0),
                            os_pid: p.os_pid,
                        })
                        .collect();
                    self.answer(
                        from,
                        req.id,
                        via,
                        response::Body::Listed(proto::Listed { processes }),
                    );
                }
                Some(request::Body::Reply(r)) => self.forwarded_reply(r),
                None => self.answer(
                    from,
                    req.id,
                    via,
                    error(ErrorCode::ErrorBadRequest, "empty request"),
                ),
            }
        }
    }

    fn reply(&mut self, to: PortId, id: u64, body: response::Body) {
        self.answer(to, id, false, body)
    }

    /// Answers request `id` of `to`: a client gets a `Response`, a
    /// forwarding procmgrd a `Request` carrying it (its loop takes
    /// requests).
    fn answer(&mut self, to: PortId, id: u64, via_procmgr: bool, body: response::Body) {
        let response = proto::Response {
            id,
            body: Some(body),
        };
        let bytes = if via_procmgr {
            proto::Request {
                id,
                body: Some(request::Body::Reply(response)),
                from_procmgr: false,
            }
            .encode_to_vec()
        } else {
            response.encode_to_vec()
        };
        // A caller that died before its answer is not an error of ours.
        if let Err(e) = self.mailbox.send_to_port(to, &bytes, SendMode::RELIABLE) {
            eprintln!("procmgrd: cannot answer {to}: {e}");
        }
    }

    /// Sends `body` to the procmgrd of `node`, expecting an answer about
    /// `what`; false if it cannot be reached.
    fn forward(&mut self, node: u32, body: request::Body, what: Forwarded) -> bool {
        if self.forwarded.len() >= MAX_FORWARDED {
            return false;
        }
        let id = self.next_forward;
        self.next_forward += 1;
        let bytes = proto::Request {
            id,
            body: Some(body),
            from_procmgr: true,
        }
        .encode_to_vec();
        if self.mailbox.send(&service_address(node), &bytes).is_err() {
            return false;
        }
        self.forwarded.insert(
            id,
            Sent {
                what,
                node,
                at: Instant::now(),
            },
        );
        true
    }

    fn spawn(&mut self, from: PortId, id: u64, via: bool, s: proto::Spawn) {
        let count = s.count.max(1);
        let refuse = |code, msg: String| error(code, msg);
        let refused = if count > MAX_SPAWN_COUNT {
            Some(refuse(
                ErrorCode::ErrorLimit,
                format!("at most {MAX_SPAWN_COUNT} processes per request"),
            ))
        } else if self.procs.len() + count as usize > MAX_PROCESSES {
            Some(refuse(
                ErrorCode::ErrorLimit,
                format!("this node tracks at most {MAX_PROCESSES} processes; wait for some"),
            ))
        } else if s.path.is_empty() {
            Some(refuse(
                ErrorCode::ErrorBadRequest,
                "spawn needs a path".into(),
            ))
        } else {
            None
        };
        if let Some(body) = refused {
            return self.answer(from, id, via, body);
        }
        // A part another node's procmgrd placed here: its program is
        // fetched from there if this node does not have it.
        if s.origin != 0 {
            if s.origin != self.node as u32 && crate::ship::locate(&s.path, &s.cwd).is_none() {
                return self.ship(PendingSpawn {
                    from,
                    id,
                    via,
                    spawn: s,
                });
            }
            let body = match self.start_here(&s, count, Some(s.origin), Path::new(&s.path)) {
                Ok(pids) => response::Body::Spawned(proto::Spawned { pids }),
                Err(e) => e,
            };
            return self.answer(from, id, via, body);
        }
        let parts = match self.place(&s, count) {
            Ok(p) => p,
            Err(msg) => return self.answer(from, id, via, error(ErrorCode::ErrorSpawnFailed, msg)),
        };
        let here = parts
            .iter()
            .find(|(n, _)| *n == self.node as u32)
            .map_or(0, |(_, k)| *k);
        let pids = if here > 0 {
            match self.start_here(&s, here, None, Path::new(&s.path)) {
                Ok(p) => p,
                Err(e) => return self.answer(from, id, via, e),
            }
        } else {
            Vec::new()
        };
        let group_id = self.next_forward;
        let mut group = SpawnGroup {
            to: from,
            id,
            parent: s.parent,
            path: s.path.clone(),
            pids,
            remaining: 0,
            error: None,
        };
        let me = self.node as u32;
        for &(node, k) in parts.iter().filter(|(n, _)| *n != me) {
            let part = proto::Spawn {
                count: k,
                placement: proto::Placement::Local as i32,
                origin: self.node as u32,
                ..s.clone()
            };
            if self.forward(
                node,
                request::Body::Spawn(part),
                Forwarded::Spawn { group: group_id },
            ) {
                group.remaining += 1;
            } else {
                group.error = Some(format!("node {node}'s procmgrd cannot be reached"));
                break;
            }
        }
        self.groups.insert(group_id, group);
        self.settle(group_id);
    }

    /// Answers a spawn once every part is in: all pids, or an error (and
    /// the processes that did start are killed).
    fn settle(&mut self, group_id: u64) {
        if self.groups.get(&group_id).is_none_or(|g| g.remaining > 0) {
            return;
        }
        let g = self.groups.remove(&group_id).expect("checked");
        match g.error {
            None => self.reply(
                g.to,
                g.id,
                response::Body::Spawned(proto::Spawned { pids: g.pids }),
            ),
            Some(msg) => {
                for p in &g.pids {
                    self.kill_any(*p, libc::SIGKILL, None);
                }
                self.reply(
                    g.to,
                    g.id,
                    error(
                        ErrorCode::ErrorSpawnFailed,
                        format!("cannot start {}: {msg}", g.path),
                    ),
                );
            }
        }
    }

    fn forwarded_reply(&mut self, r: proto::Response) {
        let Some(sent) = self.forwarded.remove(&r.id) else {
            return; // late: it timed out, or its node was lost
        };
        match sent.what {
            Forwarded::Spawn { group } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    return;
                };
                g.remaining -= 1;
                match r.body {
                    Some(response::Body::Spawned(sp)) => {
                        for &pid in &sp.pids {
                            self.procs.insert(
                                pid,
                                Proc {
                                    parent: g.parent,
                                    path: g.path.clone(),
                                    os_pid: 0,
                                    status: None,
                                    origin: None,
                                    groups: Default::default(),
                                },
                            );
                        }
                        g.pids.extend(sp.pids);
                    }
                    Some(response::Body::Error(e)) => {
                        g.error
                            .get_or_insert(format!("on node {}: {}", sent.node, e.message));
                    }
                    _ => {
                        g.error
                            .get_or_insert(format!("node {} answered nonsense", sent.node));
                    }
                }
                self.settle(group);
            }
            Forwarded::Relay { client } => {
                if let (Some((to, id)), Some(body)) = (client, r.body) {
                    self.reply(to, id, body);
                }
            }
            Forwarded::Fetch { shipment } => self.shipped(shipment, r.body),
        }
    }

    /// Fetches the program of `p` from its origin (joining a transfer of
    /// the same program from there already under way); `p` starts when
    /// the program is in the cache.
    fn ship(&mut self, p: PendingSpawn) {
        let (origin, path, cwd) = (p.spawn.origin, p.spawn.path.clone(), p.spawn.cwd.clone());
        if let Some(sh) = self
            .shipments
            .values_mut()
            .find(|sh| sh.origin == origin && sh.path == path && sh.cwd == cwd)
        {
            sh.spawns.push(p);
            return;
        }
        let id = self.next_shipment;
        self.next_shipment += 1;
        self.shipments.insert(
            id,
            Shipment {
                origin,
                path,
                cwd,
                fetching: Default::default(),
                spawns: vec![p],
                started: Instant::now(),
            },
        );
        self.fetch_next(id);
    }

    /// Asks the shipment's origin for its next chunk.
    fn fetch_next(&mut self, id: u64) {
        let sh = &self.shipments[&id];
        let (origin, fetch) = (
            sh.origin,
            proto::Fetch {
                path: sh.path.clone(),
                cwd: sh.cwd.clone(),
                offset: sh.fetching.next_offset(),
                max_bytes: 0,
            },
        );
        if !self.forward(
            origin,
            request::Body::Fetch(fetch),
            Forwarded::Fetch { shipment: id },
        ) {
            self.shipment_done(
                id,
                Err(format!("node {origin}'s procmgrd cannot be reached")),
            );
        }
    }

    /// An answer to a fetch of shipment `id`.
    fn shipped(&mut self, id: u64, body: Option<response::Body>) {
        let Some(sh) = self.shipments.get_mut(&id) else {
            return;
        };
        let taken = match body {
            Some(response::Body::BinaryChunk(c)) => sh.fetching.take(&self.cache, &c),
            Some(response::Body::Error(e)) => Err(e.message),
            _ => Err("an answer that is not a chunk of it".into()),
        };
        match taken {
            Ok(None) => self.fetch_next(id),
            Ok(Some(program)) => self.shipment_done(id, Ok(program)),
            Err(msg) => self.shipment_done(id, Err(msg)),
        }
    }

    /// Starts the spawns that waited for shipment `id`, or fails them.
    fn shipment_done(&mut self, id: u64, result: Result<PathBuf, String>) {
        let Some(sh) = self.shipments.remove(&id) else {
            return;
        };
        match &result {
            Ok(program) => eprintln!(
                "procmgrd: {} from node {} is {} ({} ms)",
                sh.path,
                sh.origin,
                program.display(),
                sh.started.elapsed().as_millis()
            ),
            Err(msg) => eprintln!(
                "procmgrd: cannot ship {} from node {}: {msg}",
                sh.path, sh.origin
            ),
        }
        for p in sh.spawns {
            let count = p.spawn.count.max(1);
            let body = match &result {
                Ok(program) => match self.start_here(&p.spawn, count, Some(sh.origin), program) {
                    Ok(pids) => response::Body::Spawned(proto::Spawned { pids }),
                    Err(e) => e,
                },
                Err(msg) => error(
                    ErrorCode::ErrorSpawnFailed,
                    format!(
                        "{} is not on node {} and could not be shipped from node {}: {msg}",
                        sh.path, self.node, sh.origin
                    ),
                ),
            };
            self.answer(p.from, p.id, p.via, body);
        }
    }

    /// Processes of nodes that are gone end with [`pid::NODE_LOST`];
    /// requests forwarded to them (or unanswered too long) fail.
    fn check_nodes(&mut self) {
        let mut nodes: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.is_remote() && p.status.is_none())
            .map(|(&pid, _)| GlobalPid(pid).node() as u32)
            .chain(self.forwarded.values().map(|s| s.node))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut lost = Vec::new();
        for n in nodes {
            if !matches!(
                self.mailbox
                    .service_exists(&service_address(n), Duration::ZERO),
                Ok(true)
            ) {
                lost.push(n);
            }
        }
        let orphaned: Vec<u64> = self
            .procs
            .iter()
            .filter(|(&pid, p)| {
                p.is_remote()
                    && p.status.is_none()
                    && lost.contains(&(GlobalPid(pid).node() as u32))
            })
            .map(|(&pid, _)| pid)
            .collect();
        for pid in orphaned {
            self.exited(pid, pid::NODE_LOST);
        }
        let failed: Vec<u64> = self
            .forwarded
            .iter()
            .filter(|(_, s)| lost.contains(&s.node) || s.at.elapsed() > FORWARD_TIMEOUT)
            .map(|(&id, _)| id)
            .collect();
        for id in failed {
            let node = self.forwarded[&id].node;
            let message = if lost.contains(&node) {
                format!("node {node} was lost")
            } else {
                format!("node {node} did not answer within {FORWARD_TIMEOUT:?}")
            };
            self.forwarded_reply(proto::Response {
                id,
                body: Some(error(ErrorCode::ErrorNoProcess, message)),
            });
        }
    }

    fn live_nodes(&mut self) -> Result<Vec<fabric::proto::NodeInfo>, String> {
        if let Some((at, nodes)) = &self.live_nodes {
            if at.elapsed() < NODE_CHECK_INTERVAL {
                return Ok(nodes.clone());
            }
        }
        let nodes: Vec<fabric::proto::NodeInfo> = self
            .mailbox
            .nodes()
            .map_err(|e| format!("cannot list the cluster's nodes: {e}"))?
            .nodes
            .into_iter()
            .filter(|n| n.alive)
            .collect();
        self.live_nodes = Some((Instant::now(), nodes.clone()));
        Ok(nodes)
    }

    /// Where `count` processes of `s` go: (node, how many) pairs.
    fn place(&mut self, s: &proto::Spawn, count: u32) -> Result<Vec<(u32, u32)>, String> {
        use proto::Placement;
        let me = self.node as u32;
        let placement = match s.placement() {
            Placement::Default if count == 1 => Placement::Any,
            Placement::Default => Placement::Spread,
            p => p,
        };
        let nodes: Vec<fabric::proto::NodeInfo> = match placement {
            Placement::Local => return Ok(vec![(me, count)]),
            Placement::Node if s.node == me => return Ok(vec![(me, count)]),
            _ => self.live_nodes()?,
        };
        if placement == Placement::Node {
            return if nodes.iter().any(|n| n.node == s.node) {
                Ok(vec![(s.node, count)])
            } else {
                Err(format!(
                    "node {} is not a live member of the cluster",
                    s.node
                ))
            };
        }
        if nodes.len() <= 1 {
            return Ok(vec![(me, count)]);
        }
        // Load per core: the gossiped load average, plus what this
        // procmgrd runs there (news the gossip may not carry yet), plus
        // what this request has placed so far.
        let mut running: HashMap<u32, u32> = HashMap::new();
        for (&pid, p) in &self.procs {
            if p.status.is_none() {
                *running.entry(GlobalPid(pid).node() as u32).or_default() += 1;
            }
        }
        let mut placed: Vec<u32> = vec![0; nodes.len()];
        let score = |i: usize, placed: &[u32]| {
            let n = &nodes[i];
            (f64::from(n.load_milli) / 1000.0
                + f64::from(*running.get(&n.node).unwrap_or(&0))
                + f64::from(placed[i]))
                / f64::from(n.cores.max(1))
        };
        for _ in 0..count {
            let pick = if placement == Placement::Spread {
                let start = self.spread_cursor % nodes.len();
                self.spread_cursor = self.spread_cursor.wrapping_add(1);
                (0..nodes.len())
                    .map(|k| (start + k) % nodes.len())
                    .min_by(|&a, &b| score(a, &placed).total_cmp(&score(b, &placed)))
                    .expect("nodes")
            } else {
                let a = rand::random_range(0..nodes.len());
                let b = (a + rand::random_range(1..nodes.len())) % nodes.len();
                if score(b, &placed) < score(a, &placed) {
                    b
                } else {
                    a
                }
            };
            placed[pick] += 1;
        }
        Ok(nodes
            .iter()
            .zip(placed)
            .filter(|(_, k)| *k > 0)
            .map(|(n, k)| (n.node, k))
            .collect())
    }

    /// Starts `count` copies of `program` (`s.path`, or where it was
    /// shipped to) here; on failure kills those that started.
    fn start_here(
        &mut self,
        s: &proto::Spawn,
        count: u32,
        origin: Option<u32>,
        program: &Path,
    ) -> Result<Vec<u64>, response::Body> {
        let mut pids = Vec::with_capacity(count as usize);
        for _ in 0..count {
            match self.start_one(s, origin, program) {
                Ok(p) => pids.push(p),
                Err(e) => {
                    for p in &pids {
                        self.kill_any(*p, libc::SIGKILL, None);
                    }
                    return Err(error(
                        ErrorCode::ErrorSpawnFailed,
                        format!("cannot start {} on node {}: {e}", s.path, self.node),
                    ));
                }
            }
        }
        Ok(pids)
    }

    fn start_one(
        &mut self,
        s: &proto::Spawn,
        origin: Option<u32>,
        program: &Path,
    ) -> std::io::Result<u64> {
        let mut cmd = Command::new(program);
        match s.argv.split_first() {
            Some((arg0, rest)) => {
                cmd.arg0(arg0).args(rest);
            }
            // A shipped program still sees the path it was asked by.
            None => {
                cmd.arg0(&s.path);
            }
        }
        for kv in &s.env {
            match kv.split_once('=') {
                Some((k, v)) => cmd.env(k, v),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("environment entry {kv:?} has no '='"),
                    ))
                }
            };
        }
        if !s.cwd.is_empty() {
            cmd.current_dir(&s.cwd);
        }
        // No pre_exec hook (e.g. PR_SET_PDEATHSIG): with one, std forks
        // instead of using posix_spawn, which from a large multi-threaded
        // process costs about a millisecond more per spawn.
        let gpid = GlobalPid::new(self.node, self.generation, self.next_local).0;
        let groups = match &s.limits {
            Some(l) => crate::cgroup::prepare(&self.cgroup_root, &GlobalPid(gpid).to_string(), l)
                .map_err(std::io::Error::other)?,
            None => Default::default(),
        };
        if !groups.is_empty() {
            let g = groups.clone();
            // SAFETY: the hook only opens, writes and closes files (see
            // `Groups::join_from_child`), all async-signal-safe. With it std
            // forks instead of using posix_spawn; only limited spawns pay.
            unsafe {
                use std::os::unix::process::CommandExt as _;
                cmd.pre_exec(move || g.join_from_child());
            }
        }
        cmd.env(fabric::daemon::SOCKET_ENV, &self.socket)
            .env(PID_ENV, gpid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                groups.remove();
                return Err(e);
            }
        };
        let log = SharedLog::default();
        let outputs = (child.stdout.take(), child.stderr.take());
        {
            let (log, echo_stdout) = (log.clone(), !self.discard_stdout);
            let capture = std::thread::Builder::new()
                .name(format!("out-{}", child.id()))
                .spawn(move || capture(outputs, &log, echo_stdout));
            if let Err(e) = capture {
                eprintln!("procmgrd: cannot capture the output of {}: {e}", child.id());
            }
        }
        self.keep_log(gpid, log);
        let os_pid = child.id();
        self.next_local = self.next_local.wrapping_add(1).max(1);
        self.procs.insert(
            gpid,
            Proc {
                parent: s.parent,
                path: s.path.clone(),
                os_pid,
                status: None,
                origin,
                groups,
            },
        );
        let reaper = self.reaper.clone();
        let to = self.mailbox.port();
        let reaper_thread = std::thread::Builder::new()
            .name(format!("reap-{os_pid}"))
            .spawn(move || {
                let mut child = child;
                let status = match child.wait() {
                    Ok(st) => pid::encode(st),
                    Err(_) => pid::NODE_LOST,
                };
                let msg = proto::Request {
                    id: 0,
                    body: Some(request::Body::ChildExited(proto::ChildExited {
                        pid: gpid,
                        status,
                    })),
                    from_procmgr: false,
                };
                let _ = lock(&reaper).send_to_port(to, &msg.encode_to_vec(), SendMode::RELIABLE);
            });
        if let Err(e) = reaper_thread {
            eprintln!("procmgrd: cannot start a reaper thread for {os_pid}: {e}");
        }
        Ok(gpid)
    }

    fn exited(&mut self, pid: u64, status: i32) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        p.status = Some(status);
        p.groups.remove();
        let parent = p.parent;
        let origin = p.origin;
        // Orphans of a Nefele process are killed: nobody is left to wait.
        let orphans: Vec<u64> = self
            .procs
            .iter()
            .filter(|(_, c)| c.parent == pid && c.status.is_none())
            .map(|(&c, _)| c)
            .collect();
        for o in orphans {
            self.kill_any(o, libc::SIGKILL, None);
        }
        if let Some(origin) = origin {
            // Placed here by another node: its procmgrd keeps the record.
            self.procs.remove(&pid);
            let msg = proto::Request {
                id: 0,
                body: Some(request::Body::ChildExited(proto::ChildExited {
                    pid,
                    status,
                })),
                from_procmgr: false,
            };
            if let Err(e) = self
                .mailbox
                .send(&service_address(origin), &msg.encode_to_vec())
            {
                eprintln!(
                    "procmgrd: cannot report the exit of {} to node {origin}: {e}",
                    GlobalPid(pid)
                );
            }
            return;
        }
        if let Some(i) = self
            .waiters
            .iter()
            .position(|w| w.pid == pid || (w.pid == 0 && w.parent == parent))
        {
            let w = self.waiters.remove(i);
            self.procs.remove(&pid);
            self.reply(
                w.to,
                w.id,
                response::Body::Waited(proto::Waited { pid, status }),
            );
        }
        // Nobody waits for the dead parent's exited orphans: drop them.
        self.procs
            .retain(|_, c| !(c.parent == pid && c.status.is_some()));
    }

    fn wait(&mut self, from: PortId, id: u64, w: proto::Wait) {
        let done = if w.pid != 0 {
            match self.procs.get(&w.pid) {
                None => Some(error(
                    ErrorCode::ErrorNoChild,
                    format!("no process {} to wait for", GlobalPid(w.pid)),
                )),
                Some(p) => p.status.map(|status| {
                    self.procs.remove(&w.pid);
                    response::Body::Waited(proto::Waited { pid: w.pid, status })
                }),
            }
        } else {
            let mine: Vec<(u64, Option<i32>)> = self
                .procs
                .iter()
                .filter(|(_, p)| p.parent == w.parent)
                .map(|(&k, p)| (k, p.status))
                .collect();
            if mine.is_empty() {
                Some(error(ErrorCode::ErrorNoChild, "no children to wait for"))
            } else {
                mine.into_iter()
                    .find_map(|(k, st)| st.map(|s| (k, s)))
                    .map(|(k, status)| {
                        self.procs.remove(&k);
                        response::Body::Waited(proto::Waited { pid: k, status })
                    })
            }
        };
        match done {
            Some(body) => self.reply(from, id, body),
            None if w.nohang => self.reply(
                from,
                id,
                response::Body::Waited(proto::Waited { pid: 0, status: 0 }),
            ),
            None => self.waiters.push(Waiter {
                to: from,
                id,
                pid: w.pid,
                parent: w.parent,
            }),
        }
    }

    fn kill_request(&mut self, from: PortId, id: u64, via: bool, k: proto::Kill) {
        if let Some(body) = self.kill_any(k.pid, k.signal, Some((from, id))) {
            self.answer(from, id, via, body);
        }
    }

    /// Kills `pid` here, or forwards the kill to its node (whose answer
    /// goes to `client`, if any): `None` when forwarded.
    fn kill_any(
        &mut self,
        pid: u64,
        signal: i32,
        client: Option<(PortId, u64)>,
    ) -> Option<response::Body> {
        let node = GlobalPid(pid).node() as u32;
        let here = node == self.node as u32 || self.procs.get(&pid).is_some_and(|p| !p.is_remote());
        if here {
            return Some(self.kill(proto::Kill { pid, signal }));
        }
        if self.forward(
            node,
            request::Body::Kill(proto::Kill { pid, signal }),
            Forwarded::Relay { client },
        ) {
            None
        } else {
            Some(error(
                ErrorCode::ErrorNoProcess,
                format!("node {node} of {} cannot be reached", GlobalPid(pid)),
            ))
        }
    }

    fn logs_request(&mut self, from: PortId, id: u64, via: bool, l: proto::Logs) {
        let node = GlobalPid(l.pid).node() as u32;
        if node != self.node as u32 && !self.logs.contains_key(&l.pid) {
            let client = Some((from, id));
            if !self.forward(node, request::Body::Logs(l), Forwarded::Relay { client }) {
                self.answer(
                    from,
                    id,
                    via,
                    error(
                        ErrorCode::ErrorNoProcess,
                        format!("node {node} of {} cannot be reached", GlobalPid(l.pid)),
                    ),
                );
            }
            return;
        }
        let body = match (self.logs.get(&l.pid), l.stream) {
            (Some(log), 1 | 2) => {
                let max = match l.max_bytes as usize {
                    0 => MAX_LOG_CHUNK_BYTES,
                    n => n.min(MAX_LOG_CHUNK_BYTES),
                };
                response::Body::LogChunk(lock(log).streams[l.stream as usize - 1].chunk(l.offset, max))
            }
            (Some(_), s) => error(
                ErrorCode::ErrorBadRequest,
                format!("stream {s}: 1 is stdout, 2 is stderr"),
            ),
            (None, _) => error(
                ErrorCode::ErrorNoProcess,
                format!(
                    "no output kept for {} (not a process of this node, or one of the oldest {} gone)",
                    GlobalPid(l.pid),
                    MAX_LOGGED_PROCESSES
                ),
            ),
        };
        self.answer(from, id, via, body);
    }

    /// Keeps `log` for `gpid`, dropping the oldest finished logs beyond
    /// [`MAX_LOGGED_PROCESSES`].
    fn keep_log(&mut self, gpid: u64, log: SharedLog) {
        self.logs.insert(gpid, log);
        self.log_order.push_back(gpid);
        while self.log_order.len() > MAX_LOGGED_PROCESSES {
            let finished = self.log_order.iter().position(|p| {
                self.logs
                    .get(p)
                    .is_none_or(|l| lock(l).streams.iter().all(|s| s.closed))
            });
            let Some(i) = finished else { break };
            let old = self.log_order.remove(i).expect("present");
            self.logs.remove(&old);
        }
    }

    fn kill(&mut self, k: proto::Kill) -> response::Body {
        match self.procs.get(&k.pid) {
            Some(p) if p.status.is_none() && !p.is_remote() => {
                let sig = match nix::sys::signal::Signal::try_from(k.signal) {
                    Ok(s) => Some(s),
                    Err(_) if k.signal == 0 => None,
                    Err(_) => {
                        return error(
                            ErrorCode::ErrorBadRequest,
                            format!("{} is not a signal", k.signal),
                        )
                    }
                };
                match nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.os_pid as i32), sig) {
                    Ok(()) => response::Body::Ok(true),
                    Err(e) => error(
                        ErrorCode::ErrorNoProcess,
                        format!("kill {}: {e}", GlobalPid(k.pid)),
                    ),
                }
            }
            _ => error(
                ErrorCode::ErrorNoProcess,
                format!("no running process {}", GlobalPid(k.pid)),
            ),
        }
    }
}

/// Copies a child's stdout and stderr into its log until both end, and
/// also to this daemon's own (stdout only if `echo_stdout`), so a node run
/// in a terminal still shows its processes' output.
fn capture(
    (stdout, stderr): (
        Option<std::process::ChildStdout>,
        Option<std::process::ChildStderr>,
    ),
    log: &SharedLog,
    echo_stdout: bool,
) {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let mut open: Vec<(usize, Box<dyn Read + Send>, std::os::fd::OwnedFd)> = Vec::new();
    if let Some(s) = stdout {
        if let Ok(fd) = s.as_fd().try_clone_to_owned() {
            open.push((0, Box::new(s), fd));
        }
    }
    if let Some(s) = stderr {
        if let Ok(fd) = s.as_fd().try_clone_to_owned() {
            open.push((1, Box::new(s), fd));
        }
    }
    let mut buf = vec![0u8; 64 << 10];
    while !open.is_empty() {
        let mut fds: Vec<nix::poll::PollFd> = open
            .iter()
            .map(|(_, _, fd)| nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN))
            .collect();
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE).is_err() {
            continue; // EINTR
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let mut k = 0;
        let mut i = 0;
        while i < open.len() {
            if !ready[k] {
                i += 1;
                k += 1;
                continue;
            }
            k += 1;
            let stream = open[i].0;
            match open[i].1.read(&mut buf) {
                Ok(0) | Err(_) => {
                    lock(log).streams[stream].closed = true;
                    open.remove(i);
                    continue;
                }
                Ok(n) => {
                    lock(log).streams[stream].append(&buf[..n]);
                    if stream == 1 {
                        let _ = std::io::stderr().write_all(&buf[..n]);
                    } else if echo_stdout {
                        let _ = std::io::stdout().write_all(&buf[..n]);
                    }
                }
            }
            i += 1;
        }
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> response::Body {
    response::Body::Error(proto::Error {
        code: code as i32,
        message: message.into(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
