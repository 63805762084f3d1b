//! `fabricd`, the node daemon.
//!
//! One control connection (Unix `SOCK_SEQPACKET`) is one mailbox: the first
//! request opens it and gets its port id and doorbell; when the connection
//! closes — cleanly or because the process died — the daemon withdraws the
//! mailbox's bindings, tells subscribers, marks its rings closed (waking any
//! peer blocked on them) and frees its shared memory.
//!
//! The daemon never touches message data. It creates each sender→receiver
//! ring on the sender's first `Connect`, passes the receiver its end with an
//! event and the sender its end with the reply (both with `SCM_RIGHTS`), and
//! keeps a mapping only to flag closure.
//!
//! One io_uring loop serves every connection ([`crate::ctlserver`]): it
//! accepts, receives requests and handles them, and sends replies and
//! events, which go through a bounded outbox per client so that a client
//! that stops reading cannot stall the daemon: when its outbox is full it
//! is disconnected.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prost::Message as _;

use crate::addr::{Address, PortId, Scope};
use crate::cluster::{ClusterConfig, ClusterError, ClusterView, Member, Membership};
use crate::ctlserver::{self, Outbox, Outgoing, Refused};
use crate::ctlsock;
use crate::ebpf::EbpfFabric;
use crate::forward::PeerLink;
use crate::inbound;
use crate::names::{self, Binding, NameError, NameTable};
use crate::proto::{self, request, response, server_message, ErrorCode};
use crate::remote;
use crate::ring::{self, Consumer, Doorbell, Producer};
use crate::ringpool::{self, RingPool};
use crate::segment::Segment;
use crate::wire::WirePort;

/// Environment variable naming the control socket, for daemon and clients.
pub const SOCKET_ENV: &str = "NEFELE_FABRICD_SOCKET";
/// Replies and events queued for one client before it is disconnected as
/// not reading.
pub const MAX_QUEUED_PACKETS_PER_CLIENT: usize = 4096;
/// Mailboxes one daemon serves at once.
pub const DEFAULT_MAX_MAILBOXES: usize = 4096;
/// Remote ports remembered as gone (see `State::gone_ports`).
pub const MAX_REMEMBERED_GONE_PORTS: usize = 4096;
/// Node incarnations remembered as once alive.
pub const MAX_REMEMBERED_INCARNATIONS: usize = 1 << 16;
/// Subscriptions one mailbox may hold.
pub const MAX_SUBSCRIPTIONS_PER_MAILBOX: usize = 1024;

/// The control socket path: `$NEFELE_FABRICD_SOCKET` if set, else
/// `/run/nefele/fabricd.sock` for root, else
/// `$XDG_RUNTIME_DIR/nefele/fabricd.sock`, else `/tmp/nefele-$UID/fabricd.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let uid = nix::unistd::Uid::effective();
    if uid.is_root() {
        return PathBuf::from("/run/nefele/fabricd.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("nefele/fabricd.sock"),
        None => PathBuf::from(format!("/tmp/nefele-{uid}/fabricd.sock")),
    }
}

/// How a daemon runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub socket_path: PathBuf,
    /// This node's id, the `node` part of every port id it gives out.
    pub node_id: u32,
    /// Data bytes of each ring it creates (a power of two).
    pub ring_capacity_bytes: usize,
    pub max_mailboxes: usize,
    /// Join a cluster (gossip, replicated names, node links); `None` runs
    /// a single node.
    pub cluster: Option<ClusterConfig>,
    /// Load the eBPF mailbox path at start (it needs root or CAP_BPF;
    /// without them the daemon says why and runs without it).
    pub ebpf: bool,
    /// Permissions given to the control socket (`None`, the default: as
    /// the umask leaves them). The `fabricd` command sets 0666 when run by
    /// root (see [`crate::cli::NodeArgs::socket_mode`]).
    pub socket_mode: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket_path: default_socket_path(),
            node_id: 1,
            ring_capacity_bytes: ring::DEFAULT_RING_CAPACITY_BYTES,
            max_mailboxes: DEFAULT_MAX_MAILBOXES,
            cluster: None,
            ebpf: true,
            socket_mode: None,
        }
    }
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("a fabricd is already serving {0}")]
    AlreadyRunning(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad configuration: {0}")]
    Config(std::io::Error),
    #[error("cannot listen for node links on {addr}: {source}")]
    NodeLinks {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

struct MailboxEntry {
    sock: Arc<OwnedFd>,
    outbox: Outbox,
    doorbell: Arc<Doorbell>,
    /// It takes its messages on the eBPF path (a pollable mailbox): senders
    /// are told to use that path instead of a ring.
    ebpf_receiver: bool,
    /// Its tenant: its process's uid, or the one root chose for it
    /// (`join_tenant`). The tenant policy applies to rings as well as to
    /// the eBPF path.
    tenant: u32,
    /// It has a socket on the eBPF path (where first messages to it arrive
    /// before their ring).
    ebpf_socket: bool,
}

#[derive(Default)]
pub(crate) struct State {
    mailboxes: HashMap<PortId, MailboxEntry>,
    /// (sender, receiver) → ring segment.
    rings: HashMap<(PortId, PortId), Arc<Segment>>,
    names: NameTable,
    subscriptions: Vec<(PortId, Address)>,
    clients_lost: u64,
    /// Connects the tenant policy refused, per source tenant (the kernel
    /// counts what it refuses on the eBPF path).
    connects_denied: HashMap<u32, u64>,
    /// Gateways to the other live nodes, by node id.
    peers: HashMap<u32, Arc<PeerLink>>,
    inbound: inbound::Inbound,
    /// Every node membership knows of (empty on a single node).
    members: Vec<Member>,
    /// Remote ports their node reported gone, newest last, so that a
    /// sender that connects to one again is refused at once (port ids are
    /// random and not reused). At most [`MAX_REMEMBERED_GONE_PORTS`].
    gone_ports: std::collections::VecDeque<PortId>,
    /// Local mailboxes that closed, with when (CLOCK_MONOTONIC ns), newest
    /// last: whether a first message sent on the eBPF path found its
    /// receiver (see `Connect.early_sent_ns`). At most
    /// [`MAX_REMEMBERED_GONE_PORTS`].
    closed_here: std::collections::VecDeque<(PortId, u64)>,
    /// (node, incarnation)s the failure detector has called alive: one of
    /// these that is not alive any more is lost, not still joining.
    seen_alive: std::collections::HashSet<(u32, u64)>,
    /// Direct links with one end here (sender, receiver): told
    /// [`proto::NodeLost`] when the other end's node is lost.
    direct: std::collections::HashSet<(PortId, PortId)>,
    /// The current connection of each direct link from a mailbox here
    /// (sender, receiver), kept open past the sender's process: see
    /// [`hold_direct_connection`].
    held_direct: HashMap<(PortId, PortId), OwnedFd>,
}

impl State {
    pub(crate) fn inbound_mut(&mut self) -> &mut inbound::Inbound {
        &mut self.inbound
    }

    /// Remembers that `port` is gone (see `gone_ports`).
    fn remember_gone(&mut self, port: PortId) {
        if !self.gone_ports.contains(&port) {
            if self.gone_ports.len() >= MAX_REMEMBERED_GONE_PORTS {
                self.gone_ports.pop_front();
            }
            self.gone_ports.push_back(port);
        }
    }
}

pub(crate) struct Shared {
    pub(crate) cfg: Config,
    /// Distinguishes this run of the daemon from earlier ones with the same
    /// node id (node links start their sequence numbers afresh).
    pub(crate) incarnation: u64,
    state: Mutex<State>,
    stopping: AtomicBool,
    membership: Mutex<Option<Membership>>,
    next_link: std::sync::atomic::AtomicU64,
    /// The eBPF mailbox path, or why this node runs without it.
    ebpf: Result<EbpfFabric, String>,
    /// The loop of outgoing TCP node links, once a first one is made.
    outbound: Mutex<Option<Arc<crate::outbound::Outbound>>>,
    /// The RDMA device node links try first, or why they use TCP only.
    pub(crate) rdma: Result<crate::rdma::RdmaDevice, String>,
    /// Node-link halves (outgoing and incoming) running over RDMA now.
    rdma_links: std::sync::atomic::AtomicUsize,
    /// Bytes incoming node links hold for receivers whose rings are full.
    held_bytes: std::sync::atomic::AtomicUsize,
    /// Direct links handed over to local mailboxes so far.
    direct_links_accepted: std::sync::atomic::AtomicU64,
    /// Rings made ahead, for `Connect`s.
    ring_pool: RingPool,
}

/// Counts a node-link half as running over RDMA while it lives.
pub(crate) struct RdmaLinkCount<'a>(&'a Shared);

impl Drop for RdmaLinkCount<'_> {
    fn drop(&mut self) {
        self.0.rdma_links.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in one connection's handler must not take the node down.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more node-link half over RDMA, until the guard drops.
    pub(crate) fn count_rdma_link(&self) -> RdmaLinkCount<'_> {
        self.rdma_links.fetch_add(1, Ordering::Relaxed);
        RdmaLinkCount(self)
    }

    /// Counts bytes incoming node links hold (or, negative, no longer hold).
    pub(crate) fn count_held_bytes(&self, delta: isize) {
        if delta >= 0 {
            self.held_bytes.fetch_add(delta as usize, Ordering::Relaxed);
        } else {
            self.held_bytes
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    /// A number no other node link of this daemon has.
    pub(crate) fn next_link_id(&self) -> u64 {
        self.next_link.fetch_add(1, Ordering::Relaxed)
    }

    /// The loop of outgoing TCP node links, started on first use.
    pub(crate) fn outbound(self: &Arc<Self>) -> std::io::Result<Arc<crate::outbound::Outbound>> {
        let mut o = self.outbound.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = o.as_ref() {
            return Ok(o.clone());
        }
        let started = crate::outbound::Outbound::start(self)?;
        *o = Some(started.clone());
        Ok(started)
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Closes and forgets the rings `(from, to)` that `which` picks: a
    /// local receiver sees its ring end, a local sender gets `PeerGone`.
    pub(crate) fn forget_rings(&self, which: impl Fn(PortId, PortId) -> bool) {
        forget_rings_in(&mut self.lock(), which);
    }

    /// A ring from remote port `from` to local mailbox `to`, its receiver
    /// told; `None` if there is no such mailbox.
    pub(crate) fn ring_from_remote(&self, from: PortId, to: PortId) -> Option<Producer> {
        let mut st = self.lock();
        let (seg, _, _) = make_ring(self, &mut st, from, to).ok()?;
        let doorbell = st.mailboxes.get(&to)?.doorbell.clone();
        drop(st);
        Producer::attach(seg, doorbell).ok()
    }

    /// Remembers that remote port `port` is gone.
    pub(crate) fn remember_gone(&self, port: PortId) {
        self.lock().remember_gone(port);
    }

    /// Runs `f` on the gateway to `node`, if there is one.
    pub(crate) fn tell_peer(&self, node: u32, f: impl FnOnce(&PeerLink)) {
        let peer = self.lock().peers.get(&node).cloned();
        if let Some(p) = peer {
            f(&p);
        }
    }

    /// Gives gossip this node's cluster-scope bindings.
    fn gossip_bindings(&self, st: &State) {
        if let Some(m) = &*self.membership.lock().unwrap_or_else(|p| p.into_inner()) {
            let me = self.cfg.node_id;
            m.set_local_bindings(
                st.names
                    .bindings()
                    .iter()
                    .filter(|b| b.port.node == me && b.address.scope() == Scope::Cluster),
            );
        }
    }
}

/// A running daemon; dropping it stops it and removes its socket.
pub struct Daemon {
    shared: Arc<Shared>,
    link_listener: Option<Arc<std::net::TcpListener>>,
    control_stop: ctlserver::StopHandle,
    control_thread: Option<JoinHandle<()>>,
}

impl Daemon {
    /// Listens on `cfg.socket_path` and serves in background threads.
    pub fn start(cfg: Config) -> Result<Daemon, StartError> {
        ring::check_capacity(cfg.ring_capacity_bytes).map_err(StartError::Config)?;
        let path = cfg.socket_path.clone();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StartError::Listen {
                path: path.clone(),
                source,
            })?;
        }
        if path.exists() {
            if ctlsock::connect(&path).is_ok() {
                return Err(StartError::AlreadyRunning(path));
            }
            // A stale socket from a daemon that died.
            let _ = std::fs::remove_file(&path);
        }
        let listener = Arc::new(ctlsock::listen(&path).map_err(|source| StartError::Listen {
            path: path.clone(),
            source,
        })?);
        if let Some(mode) = cfg.socket_mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(
                |source| StartError::Listen {
                    path: path.clone(),
                    source,
                },
            )?;
        }
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let cluster = cfg.cluster.clone();
        let cfg_ring_capacity = cfg.ring_capacity_bytes;
        let ebpf = if cfg.ebpf {
            EbpfFabric::load().map_err(|e| {
                eprintln!("fabricd: ebpf: unavailable ({e}); running without the eBPF path");
                e.to_string()
            })
        } else {
            Err(EBPF_DISABLED.to_string())
        };
        let rdma = match &cluster {
            Some(c) => c.rdma.resolve(),
            None => Err(RDMA_SINGLE_NODE.to_string()),
        };
        if let Ok(device) = &rdma {
            eprintln!("fabricd: node links try RDMA first, over {}", device.name());
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                names: NameTable::new(cfg.node_id),
                ..State::default()
            }),
            cfg,
            incarnation,
            stopping: AtomicBool::new(false),
            membership: Mutex::new(None),
            next_link: std::sync::atomic::AtomicU64::new(1),
            ebpf,
            rdma,
            rdma_links: std::sync::atomic::AtomicUsize::new(0),
            held_bytes: std::sync::atomic::AtomicUsize::new(0),
            direct_links_accepted: std::sync::atomic::AtomicU64::new(0),
            outbound: Mutex::new(None),
            ring_pool: RingPool::start(cfg_ring_capacity),
        });
        let mut link_listener = None;
        if let Some(cc) = cluster {
            let listener = std::net::TcpListener::bind(cc.listen)
                .map(Arc::new)
                .map_err(|source| StartError::NodeLinks {
                    addr: cc.listen,
                    source,
                })?;
            {
                let (shared, listener) = (shared.clone(), listener.clone());
                std::thread::Builder::new()
                    .name("fabricd-links".into())
                    .spawn(move || inbound::accept_loop(shared, listener))
                    .map_err(|source| StartError::NodeLinks {
                        addr: cc.listen,
                        source,
                    })?;
            }
            link_listener = Some(listener);
            let weak = Arc::downgrade(&shared);
            let node = shared.cfg.node_id;
            let m = Membership::start(cc, node, incarnation, move |view| {
                if let Some(shared) = weak.upgrade() {
                    apply_view(&shared, view);
                }
            });
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    shared.stopping.store(true, Ordering::SeqCst);
                    shutdown_listener(&link_listener);
                    return Err(e.into());
                }
            };
            *shared.membership.lock().unwrap_or_else(|p| p.into_inner()) = Some(m);
        }
        let server = ctlserver::Server::new(listener.clone(), MAX_QUEUED_PACKETS_PER_CLIENT)
            .map_err(|source| StartError::Listen {
                path: path.clone(),
                source,
            })?;
        let control_stop = server.stop_handle();
        let control_thread = {
            let control = Control(shared.clone());
            std::thread::Builder::new()
                .name("fabricd-control".into())
                .spawn(move || {
                    if let Err(e) = server.run(&control) {
                        eprintln!("fabricd: the control loop failed: {e}");
                    }
                })
                .map_err(|source| StartError::Listen { path, source })?
        };
        Ok(Daemon {
            shared,
            link_listener,
            control_stop,
            control_thread: Some(control_thread),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.shared.cfg.socket_path
    }

    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    /// Current counters.
    pub fn stats(&self) -> proto::Stats {
        stats_of(&self.shared)
    }

    /// Blocks until the daemon stops (it stops only when dropped or killed).
    pub fn wait(mut self) {
        if let Some(t) = self.control_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Leave the cluster first, so no new links come up meanwhile.
        let membership = self
            .shared
            .membership
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(membership);
        shutdown_listener(&self.link_listener);
        let peers: Vec<Arc<PeerLink>> = self.shared.lock().peers.drain().map(|(_, p)| p).collect();
        for p in &peers {
            p.stop();
        }
        // What local senders handed to the gateways still reaches the other
        // nodes (bounded: a dead peer does not hold us up for long).
        let deadline = std::time::Instant::now() + remote::CLOSE_LINGER;
        for p in &peers {
            p.finish(deadline);
        }
        // The control loop stops accepting, closes every client connection
        // (each mailbox cleaned up as when its process goes) and returns.
        self.control_stop.stop();
        if let Some(t) = self.control_thread.take() {
            let _ = t.join();
        }
        self.shared.ring_pool.stop();
        let _ = std::fs::remove_file(&self.shared.cfg.socket_path);
    }
}

/// [`Shared::forget_rings`] with the state already locked.
fn forget_rings_in(st: &mut State, which: impl Fn(PortId, PortId) -> bool) {
    let gone: Vec<(PortId, PortId)> = st
        .rings
        .keys()
        .filter(|(f, t)| which(*f, *t))
        .copied()
        .collect();
    for key in gone {
        let seg = st.rings.remove(&key).expect("listed above");
        let (from, to) = key;
        if let Some(receiver) = st.mailboxes.get(&to) {
            ring::close_sender_side(&seg);
            receiver.doorbell.notice();
        }
        if st.mailboxes.contains_key(&from) {
            ring::close_receiver_side(&seg);
        }
    }
}

fn shutdown_listener(l: &Option<Arc<std::net::TcpListener>>) {
    if let Some(l) = l {
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&**l),
            nix::sys::socket::Shutdown::Both,
        );
    }
}

/// Brings this node in line with what membership sees: gateways to the
/// live nodes (and none to the others, whose rings are closed), and their
/// cluster-scope bindings in the name table (subscribers told of each
/// change).
fn apply_view(shared: &Arc<Shared>, view: ClusterView) {
    let me = shared.cfg.node_id;
    let mut st = shared.lock();
    for m in view.members.iter().filter(|m| m.alive) {
        if st.seen_alive.len() < MAX_REMEMBERED_INCARNATIONS {
            st.seen_alive.insert((m.node, m.incarnation));
        }
    }
    // Each other node's newest incarnation (older ones are gone for good).
    let mut newest: HashMap<u32, &Member> = HashMap::new();
    for m in view.members.iter().filter(|m| m.node != me) {
        let e = newest.entry(m.node).or_insert(m);
        if m.incarnation > e.incarnation {
            *e = m;
        }
    }
    // A node is up if the failure detector says so, or — while it is new,
    // before two heartbeats have reached us — if it has opened a node link
    // to us. One that was alive and is not any more is lost.
    let seen_alive = &st.seen_alive;
    let inbound = &st.inbound;
    let alive: HashMap<u32, &Member> = newest
        .iter()
        .filter(|(_, m)| {
            m.alive
                || (!seen_alive.contains(&(m.node, m.incarnation))
                    && inbound.is_current(m.node, m.incarnation))
        })
        .map(|(n, m)| (*n, *m))
        .collect();
    let lost_incarnation = |node: u32, inc: u64| {
        newest.get(&node).is_some_and(|m| {
            m.incarnation > inc
                || (m.incarnation == inc && !m.alive && seen_alive.contains(&(node, inc)))
        })
    };
    let mut stale_inbound = Vec::new();
    st.inbound.for_each(|node, inc| {
        if lost_incarnation(node, inc) {
            stale_inbound.push(node);
        }
    });
    st.inbound.remove(&stale_inbound);
    let mut stopped = Vec::new();
    st.peers.retain(|node, link| {
        let keep = alive
            .get(node)
            .is_some_and(|m| m.incarnation == link.incarnation && !link.is_dead());
        if !keep {
            stopped.push(link.clone());
        }
        keep
    });
    // Gateways to nodes that are gone (dead, or restarted as a new
    // incarnation): their rings are closed now — senders blocked on them
    // wake with `PeerGone` — rather than when the gateway gets round
    // to it. (Rings from a lost node end when its incoming link does.)
    let lost: Vec<(PortId, PortId)> = stopped
        .iter()
        .filter(|l| {
            alive
                .get(&l.node)
                .is_none_or(|m| m.incarnation != l.incarnation)
        })
        .flat_map(|l| l.rings())
        .collect();
    if !lost.is_empty() {
        forget_rings_in(&mut st, |from, to| lost.contains(&(from, to)));
    }
    let lost_nodes: Vec<u32> = stopped
        .iter()
        .filter(|l| {
            alive
                .get(&l.node)
                .is_none_or(|m| m.incarnation != l.incarnation)
        })
        .map(|l| l.node)
        .collect();
    let ended: Vec<(PortId, PortId)> = st
        .direct
        .iter()
        .filter(|(from, to)| lost_nodes.contains(&from.node) || lost_nodes.contains(&to.node))
        .copied()
        .collect();
    for (from, to) in ended {
        st.direct.remove(&(from, to));
        // Its node is gone: nothing more can be delivered on it.
        st.held_direct.remove(&(from, to));
        let (here, there) = if from.node == me {
            (from, to)
        } else {
            (to, from)
        };
        let lost = proto::NodeLost { node: there.node };
        send_event(&st, here, proto::event::Body::NodeLost(lost), Vec::new());
    }
    for (node, m) in &alive {
        if !st.peers.contains_key(node) {
            match PeerLink::start(shared, m) {
                Ok(link) => {
                    st.peers.insert(*node, link);
                }
                Err(e) => eprintln!("fabricd: cannot start the gateway to node {node}: {e}"),
            }
        }
    }
    let current: Vec<Binding> = st
        .names
        .bindings()
        .iter()
        .filter(|b| b.port.node != me)
        .cloned()
        .collect();
    for b in &current {
        if !view.remote_bindings.contains(b) && st.names.unbind(&b.address, b.port).is_ok() {
            publish(&st, me, b, false);
        }
    }
    for b in view.remote_bindings {
        if !current.contains(&b) {
            if let Ok(b) = st.names.bind(b.address, b.port, b.tenant) {
                publish(&st, me, &b, true);
            }
        }
    }
    st.members = view.members;
    drop(st);
    for link in stopped {
        link.stop();
    }
}

fn nodes_of(shared: &Shared) -> proto::NodeList {
    let me = shared.cfg.node_id;
    let (members, links): (Vec<Member>, HashMap<u32, &'static str>) = {
        let st = shared.lock();
        let links = st
            .peers
            .iter()
            .map(|(node, p)| (*node, p.link_kind()))
            .collect();
        (st.members.clone(), links)
    };
    let info = |m: &Member| proto::NodeInfo {
        node: m.node,
        incarnation: m.incarnation,
        address: m.link.to_string(),
        alive: m.alive,
        cores: m.capacity.cores,
        mem_available_bytes: m.capacity.mem_available_bytes,
        load_milli: m.capacity.load_milli,
        link: links.get(&m.node).copied().unwrap_or_default().to_string(),
    };
    let mut nodes: Vec<proto::NodeInfo> = members.iter().map(info).collect();
    if !members.iter().any(|m| m.node == me) {
        // A single node (or one whose first gossip round is still due).
        let cap = crate::cluster::Capacity::of_this_machine();
        nodes.push(proto::NodeInfo {
            node: me,
            incarnation: shared.incarnation,
            address: shared
                .cfg
                .cluster
                .as_ref()
                .map_or(String::new(), |c| c.listen.to_string()),
            alive: true,
            cores: cap.cores,
            mem_available_bytes: cap.mem_available_bytes,
            load_milli: cap.load_milli,
            link: String::new(),
        });
    }
    nodes.sort_by_key(|n| n.node);
    proto::NodeList {
        nodes,
        self_node: me,
    }
}

fn stats_of(shared: &Shared) -> proto::Stats {
    let (ebpf, ebpf_mailboxes, kernel_denied) = match &shared.ebpf {
        Ok(f) => ("available".to_string(), f.mailboxes() as u32, f.denied()),
        Err(why) if why == EBPF_DISABLED => (why.clone(), 0, Vec::new()),
        Err(why) => (format!("unavailable ({why})"), 0, Vec::new()),
    };
    let rdma = match &shared.rdma {
        Ok(device) => device.name(),
        Err(why) if why == crate::rdma::RDMA_OFF || why == RDMA_SINGLE_NODE => why.clone(),
        Err(why) => format!("unavailable ({why})"),
    };
    let me = shared.cfg.node_id;
    let st = shared.lock();
    let mut denied: std::collections::BTreeMap<u32, u64> =
        st.connects_denied.iter().map(|(&t, &n)| (t, n)).collect();
    for (tenant, n) in kernel_denied {
        *denied.entry(tenant).or_default() += n;
    }
    let ebpf_denied = denied
        .into_iter()
        .map(|(tenant, count)| proto::TenantCount { tenant, count })
        .collect();
    proto::Stats {
        rdma,
        rdma_links: shared.rdma_links.load(Ordering::Relaxed) as u32,
        link_held_bytes: shared.held_bytes.load(Ordering::Relaxed) as u64,
        paused_pairs: st.peers.values().map(|p| p.paused_pairs() as u32).sum(),
        direct_links_in: st.direct.iter().filter(|(_, to)| to.node == me).count() as u32,
        direct_links_accepted: shared.direct_links_accepted.load(Ordering::Relaxed),
        mailboxes: st.mailboxes.len() as u32,
        bindings: st.names.len() as u32,
        rings: st.rings.len() as u32,
        shm_segments: (st.rings.len() + st.mailboxes.len()) as u32,
        rings_ready: shared.ring_pool.ready() as u32,
        ring_pool: shared.ring_pool.target() as u32,
        subscriptions: st.subscriptions.len() as u32,
        clients_lost: st.clients_lost,
        ebpf,
        ebpf_mailboxes,
        ebpf_denied,
    }
}

/// What `Stats.rdma` says on a node that is not in a cluster.
const RDMA_SINGLE_NODE: &str = "no node links (single node)";

/// What `Stats.ebpf` says when the eBPF path was turned off (`--no-ebpf`).
const EBPF_DISABLED: &str = "disabled";

/// An eBPF socket for mailbox `me`; with `receive`, the mailbox takes its
/// messages there from now on.
fn ebpf_open(
    shared: &Shared,
    sock: &OwnedFd,
    me: PortId,
    req: proto::EbpfOpen,
    has: Option<OwnedFd>,
) -> Reply {
    let fabric = match &shared.ebpf {
        Ok(f) => f,
        Err(why) => {
            return (
                error_body(
                    ErrorCode::ErrorLimit,
                    format!("the eBPF path is not available on this node: {why}"),
                ),
                Vec::new(),
            )
        }
    };
    let tenant = client_tenant(sock, req.tenant);
    let window = crate::ebpf::DEFAULT_WINDOW_BYTES;
    let port = WirePort {
        node: me.node,
        port: me.port,
    };
    let fds = match has {
        // The mailbox has its socket (Open.early): only what it asks of it
        // changes.
        Some(socket) => match fabric.retag(&socket, port, tenant) {
            Ok(()) => Vec::new(),
            Err(e) => {
                return (
                    error_body(ErrorCode::ErrorBadRequest, format!("eBPF socket: {e}")),
                    Vec::new(),
                )
            }
        },
        None => match ebpf_socket(fabric, me, tenant) {
            Ok(s) => vec![s],
            Err(e) => {
                return (
                    error_body(ErrorCode::ErrorInternal, format!("eBPF socket: {e}")),
                    Vec::new(),
                )
            }
        },
    };
    let mut st = shared.lock();
    let mut moved = false;
    if let Some(m) = st.mailboxes.get_mut(&me) {
        m.ebpf_receiver |= req.receive;
        moved = m.tenant != tenant;
        m.tenant = tenant;
        m.ebpf_socket = true;
    }
    if moved {
        close_forbidden_rings(shared, &st, |(from, to)| from == me || to == me);
        // Its names move with it: subscribers of the old tenant see them
        // go, those of the new one see them come.
        let node = shared.cfg.node_id;
        let retenanted = st.names.retenant(me, tenant);
        for (old, new) in &retenanted {
            publish(&st, node, old, false);
            publish(&st, node, new, true);
        }
        if !retenanted.is_empty() {
            shared.gossip_bindings(&st);
        }
    }
    drop(st);
    (
        response::Body::EbpfOpened(proto::EbpfOpened {
            port: Some(me.into()),
            window_bytes: window as u32,
            tenant,
        }),
        fds,
    )
}

fn encode(msg: server_message::Body) -> Vec<u8> {
    proto::ServerMessage { body: Some(msg) }.encode_to_vec()
}

fn error_body(code: ErrorCode, message: impl Into<String>) -> response::Body {
    response::Body::Error(proto::Error {
        code: code as i32,
        message: message.into(),
    })
}

/// Queues a packet for `entry`'s client; a client that lets its outbox fill
/// up is cut off (its reader then cleans up).
fn enqueue(entry: &MailboxEntry, out: Outgoing) {
    queue_or_cut_off(&entry.outbox, &entry.sock, out);
}

fn queue_or_cut_off(outbox: &Outbox, sock: &OwnedFd, out: Outgoing) {
    match outbox.push(out) {
        Ok(()) | Err(Refused::Closed) => {}
        Err(Refused::Full) => {
            eprintln!("fabricd: a client left {MAX_QUEUED_PACKETS_PER_CLIENT} packets unread; disconnecting it");
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(sock),
                nix::sys::socket::Shutdown::Both,
            );
        }
    }
}

fn send_event(st: &State, to: PortId, event: proto::event::Body, fds: Vec<OwnedFd>) {
    if let Some(entry) = st.mailboxes.get(&to) {
        let bytes = encode(server_message::Body::Event(proto::Event {
            body: Some(event),
        }));
        enqueue(
            entry,
            Outgoing {
                bytes,
                fds,
                notice: Some(entry.doorbell.clone()),
            },
        );
    }
}

/// Hands a direct link's connection (its HELLO read by the node-link
/// acceptor) to the local mailbox it is for, or turns it away when there is
/// no such mailbox here.
pub(crate) fn hand_direct(shared: &Shared, pending: crate::remote::PendingConnection) {
    let Some((from, to)) = pending.direct else {
        return pending.refuse();
    };
    let mut st = shared.lock();
    if to.node != shared.cfg.node_id || !st.mailboxes.contains_key(&to) {
        drop(st);
        return pending.refuse();
    }
    let hello = pending.hello;
    let mut pending = pending;
    let handed = pending
        .answer_fresh()
        .and_then(|answered| Ok((answered, pending.into_handoff()?)));
    match handed {
        Ok((answered, fd)) => {
            st.direct.insert((from, to));
            shared.direct_links_accepted.fetch_add(1, Ordering::Relaxed);
            let ev = proto::DirectLink {
                from: Some(from.into()),
                window_bytes: hello.window_bytes,
                node: hello.identity.node,
                incarnation: hello.identity.incarnation,
                link: hello.identity.link,
                to_incarnation: hello.identity.to_incarnation,
                answered,
            };
            send_event(&st, to, proto::event::Body::DirectLink(ev), vec![fd]);
        }
        Err(e) => eprintln!("fabricd: a direct link from {from} to {to} failed: {e}"),
    }
}

/// `from` on another node, which had a direct link to `to` here, is gone:
/// `to` ends the link once it has read what the connection still holds.
pub(crate) fn direct_sender_gone(shared: &Shared, from: PortId, to: PortId) {
    let mut st = shared.lock();
    if st.direct.remove(&(from, to)) {
        let ev = proto::DirectEnded {
            from: Some(from.into()),
        };
        send_event(&st, to, proto::event::Body::DirectEnded(ev), Vec::new());
    }
}

/// How long a dead sender's direct connections may take to deliver what
/// they still hold before they are cut (their receiver is not reading).
pub const DIRECT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Keeps `conn`, the connection mailbox `port` now sends to `d.to` over,
/// open in the daemon (see [`proto::DirectConnection`]). A process that is
/// killed closes its sockets, and a TCP socket closed with data unread
/// (the receiver's acks) is reset, throwing away what was not yet sent;
/// while the daemon holds the socket too, it stays open and its bytes go
/// out. [`finish_direct_connections`] closes it once the mailbox is gone.
fn hold_direct_connection(
    shared: &Shared,
    port: Option<PortId>,
    d: proto::DirectConnection,
    conn: Option<OwnedFd>,
) {
    let (Some(from), Some(to), Some(conn)) = (port, d.to.map(PortId::from), conn) else {
        eprintln!(
            "fabricd: a DirectConnection without a mailbox, destination or connection; ignored"
        );
        return;
    };
    let mut st = shared.lock();
    if !st.direct.contains(&(from, to)) {
        // Not a link this daemon gave out, or its node is lost already.
        return;
    }
    st.held_direct.insert((from, to), conn);
}

/// Closes a gone mailbox's direct connections gracefully, in a thread of
/// their own: FIN after what they still hold, then whatever the receiver
/// still says is read (and dropped) until it closes too, at most
/// [`DIRECT_DRAIN_TIMEOUT`]. Closing with its acks unread would reset the
/// connection and lose what the kernel had not sent yet.
fn finish_direct_connections(conns: Vec<OwnedFd>) {
    if conns.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("fabricd-direct-close".into())
        .spawn(move || {
            let deadline = Instant::now() + DIRECT_DRAIN_TIMEOUT;
            for conn in conns {
                let mut s = std::net::TcpStream::from(conn);
                // It may be shut down already (a mailbox that closed says
                // CLOSE and sends its FIN itself); the reads still wait.
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut sink = [0u8; 4096];
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
                        break;
                    }
                    match std::io::Read::read(&mut s, &mut sink) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("fabricd: cannot close direct connections gracefully: {e}");
    }
}

/// Tells the subscribers that see `binding` (see [`names::visible`]) that
/// it appeared or went.
fn publish(st: &State, node: u32, binding: &Binding, published: bool) {
    for (sub, query) in &st.subscriptions {
        let Some(tenant) = st.mailboxes.get(sub).map(|m| m.tenant) else {
            continue;
        };
        if names::visible(query, binding, node, tenant) {
            let ev = proto::TopologyEvent {
                published,
                binding: Some(binding.into()),
            };
            send_event(st, *sub, proto::event::Body::Topology(ev), Vec::new());
        }
    }
}

/// The control connections' requests, as the io_uring loop hands them
/// over; a connection's state is the mailbox it opened.
struct Control(Arc<Shared>);

impl ctlserver::Handler for Control {
    type Conn = Option<PortId>;

    fn packet(
        &self,
        port: &mut Option<PortId>,
        sock: &Arc<OwnedFd>,
        outbox: &Outbox,
        bytes: &[u8],
        mut attached: Vec<OwnedFd>,
    ) {
        let (id, (body, fds)) = match proto::Request::decode(bytes) {
            Ok(proto::Request {
                body: Some(request::Body::DirectConnection(d)),
                ..
            }) => {
                // No response: the sender is in the middle of a send.
                return hold_direct_connection(&self.0, *port, d, attached.pop());
            }
            Ok(req) => (
                req.id,
                handle(&self.0, sock, outbox, port, req.body, attached),
            ),
            Err(e) => (
                0,
                (
                    error_body(
                        ErrorCode::ErrorBadRequest,
                        format!("undecodable request: {e}"),
                    ),
                    Vec::new(),
                ),
            ),
        };
        let bytes = encode(server_message::Body::Response(proto::Response {
            id,
            body: Some(body),
        }));
        queue_or_cut_off(
            outbox,
            sock,
            Outgoing {
                bytes,
                fds,
                notice: None,
            },
        );
    }

    fn closed(&self, port: Option<PortId>) {
        if let Some(p) = port {
            cleanup(&self.0, p);
        }
    }
}

type Reply = (response::Body, Vec<OwnedFd>);

fn handle(
    shared: &Arc<Shared>,
    sock: &Arc<OwnedFd>,
    tx: &Outbox,
    port: &mut Option<PortId>,
    body: Option<request::Body>,
    attached: Vec<OwnedFd>,
) -> Reply {
    let node = shared.cfg.node_id;
    let Some(body) = body else {
        return (
            error_body(ErrorCode::ErrorBadRequest, "empty request"),
            Vec::new(),
        );
    };
    let me = match (&body, *port) {
        (request::Body::Open(o), None) => return open(shared, sock, tx, port, o.early),
        (request::Body::Open(_), Some(_)) => {
            return (
                error_body(
                    ErrorCode::ErrorBadRequest,
                    "this connection already has a mailbox",
                ),
                Vec::new(),
            )
        }
        (request::Body::Stats(_), _) => {
            return (
                response::Body::Stats(Box::new(stats_of(shared))),
                Vec::new(),
            )
        }
        (request::Body::Nodes(_), _) => {
            return (response::Body::Nodes(nodes_of(shared)), Vec::new())
        }
        (request::Body::TenantPolicy(p), _) => return (tenant_policy(shared, sock, p), Vec::new()),
        (request::Body::Bindings(_), _) => {
            let bindings = shared
                .lock()
                .names
                .bindings()
                .iter()
                .map(Into::into)
                .collect();
            return (
                response::Body::Bindings(proto::BindingList { bindings }),
                Vec::new(),
            );
        }
        (_, None) => {
            return (
                error_body(ErrorCode::ErrorBadRequest, "open a mailbox first"),
                Vec::new(),
            )
        }
        (_, Some(p)) => p,
    };
    let parse = |s: &str| {
        s.parse::<Address>().map_err(|e| {
            (
                error_body(ErrorCode::ErrorBadRequest, e.to_string()),
                Vec::new(),
            )
        })
    };
    let name_err = |e: NameError| {
        let code = match e {
            NameError::AlreadyBound { .. } => ErrorCode::ErrorAlreadyBound,
            NameError::NotBound { .. } => ErrorCode::ErrorNotBound,
            NameError::Full => ErrorCode::ErrorLimit,
            NameError::PortNotBindable => ErrorCode::ErrorBadRequest,
        };
        (error_body(code, e.to_string()), Vec::new())
    };
    let mut st = shared.lock();
    let ok = (response::Body::Ok(true), Vec::new());
    let binding = matches!(body, request::Body::Bind(_));
    // The caller's tenant, in which the names it binds live and the names
    // it resolves are looked up.
    let Some(tenant) = st.mailboxes.get(&me).map(|m| m.tenant) else {
        return (
            error_body(ErrorCode::ErrorBadRequest, "the mailbox is closing"),
            Vec::new(),
        );
    };
    match body {
        request::Body::Open(_)
        | request::Body::Stats(_)
        | request::Body::Nodes(_)
        | request::Body::TenantPolicy(_)
        | request::Body::Bindings(_) => {
            unreachable!("handled above")
        }
        request::Body::Bind(proto::Bind { address })
        | request::Body::Unbind(proto::Unbind { address }) => {
            let addr = match parse(&address) {
                Ok(a) => a,
                Err(r) => return r,
            };
            let changed = if binding {
                st.names.bind(addr, me, tenant)
            } else {
                st.names.unbind(&addr, me)
            };
            match changed {
                Ok(b) => {
                    publish(&st, node, &b, binding);
                    shared.gossip_bindings(&st);
                    ok
                }
                Err(e) => name_err(e),
            }
        }
        request::Body::Lookup(l) => {
            let addr = match parse(&l.address) {
                Ok(a) => a,
                Err(r) => return r,
            };
            let (ports, candidates) = match addr {
                Address::Port(p) if st.mailboxes.contains_key(&p) => (vec![p], 1),
                // A port of a live node: its node would know more, but the
                // first send finds out.
                Address::Port(p) if st.peers.contains_key(&p.node) => (vec![p], 1),
                Address::Port(_) => (Vec::new(), 0),
                _ => st.names.lookup_counted(&addr, tenant),
            };
            let reply = proto::LookupReply {
                ports: ports.into_iter().map(Into::into).collect(),
                candidates: candidates as u32,
            };
            (response::Body::Lookup(reply), Vec::new())
        }
        request::Body::Subscribe(s) => {
            let addr = match parse(&s.address) {
                Ok(a) => a,
                Err(r) => return r,
            };
            if st.subscriptions.iter().filter(|(p, _)| *p == me).count()
                >= MAX_SUBSCRIPTIONS_PER_MAILBOX
            {
                return (
                    error_body(
                        ErrorCode::ErrorLimit,
                        format!(
                            "at most {MAX_SUBSCRIPTIONS_PER_MAILBOX} subscriptions per mailbox"
                        ),
                    ),
                    Vec::new(),
                );
            }
            st.subscriptions.push((me, addr.clone()));
            // The reply is queued after these events; the client handles
            // both in order, so it never misses a binding.
            let current: Vec<Binding> = st
                .names
                .bindings()
                .iter()
                .filter(|b| names::visible(&addr, b, node, tenant))
                .cloned()
                .collect();
            for b in &current {
                let ev = proto::TopologyEvent {
                    published: true,
                    binding: Some(b.into()),
                };
                send_event(&st, me, proto::event::Body::Topology(ev), Vec::new());
            }
            ok
        }
        request::Body::Unsubscribe(s) => {
            let addr = match parse(&s.address) {
                Ok(a) => a,
                Err(r) => return r,
            };
            match st
                .subscriptions
                .iter()
                .position(|(p, a)| *p == me && *a == addr)
            {
                Some(i) => {
                    st.subscriptions.swap_remove(i);
                    ok
                }
                None => (
                    error_body(
                        ErrorCode::ErrorNotBound,
                        format!("not subscribed to {addr}"),
                    ),
                    Vec::new(),
                ),
            }
        }
        request::Body::Connect(c) => connect(shared, &mut st, me, c),
        request::Body::DirectConnection(_) => unreachable!("handled without a response"),
        request::Body::EbpfOpen(req) => {
            drop(st);
            ebpf_open(shared, sock, me, req, attached.into_iter().next())
        }
    }
}

fn open(
    shared: &Shared,
    sock: &Arc<OwnedFd>,
    tx: &Outbox,
    port: &mut Option<PortId>,
    early: bool,
) -> Reply {
    let fail = |code, msg: String| (error_body(code, msg), Vec::new());
    let bell_seg = match Segment::memfd("nefele-doorbell", ring::DOORBELL_BYTES) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                ErrorCode::ErrorInternal,
                format!("cannot create a doorbell: {e}"),
            )
        }
    };
    let bell_fd = match bell_seg.fd().map(|f| f.try_clone_to_owned()) {
        Some(Ok(fd)) => fd,
        _ => return fail(ErrorCode::ErrorInternal, "cannot share the doorbell".into()),
    };
    let doorbell = match Doorbell::new(bell_seg) {
        Ok(d) => Arc::new(d),
        Err(e) => return fail(ErrorCode::ErrorInternal, e.to_string()),
    };
    let tenant = client_tenant(sock, None);
    let mut st = shared.lock();
    if st.mailboxes.len() >= shared.cfg.max_mailboxes {
        return fail(
            ErrorCode::ErrorLimit,
            format!(
                "this node serves at most {} mailboxes",
                shared.cfg.max_mailboxes
            ),
        );
    }
    let id = loop {
        let candidate = PortId {
            node: shared.cfg.node_id,
            port: rand::random::<u32>().max(1),
        };
        if !st.mailboxes.contains_key(&candidate) {
            break candidate;
        }
    };
    st.mailboxes.insert(
        id,
        MailboxEntry {
            sock: sock.clone(),
            outbox: tx.clone(),
            doorbell,
            ebpf_receiver: false,
            tenant,
            ebpf_socket: false,
        },
    );
    drop(st);
    *port = Some(id);
    // Its socket on the eBPF path, if it wants one and the node has it
    // (made outside the lock: it takes a loopback connection); made before
    // the port is known to anyone, so a first message to the port always
    // finds it.
    let window = crate::ebpf::DEFAULT_WINDOW_BYTES;
    let socket = match (&shared.ebpf, early) {
        (Ok(fabric), true) => match ebpf_socket(fabric, id, tenant) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("fabricd: no eBPF socket for mailbox {id}: {e}");
                None
            }
        },
        _ => None,
    };
    if socket.is_some() {
        if let Some(m) = shared.lock().mailboxes.get_mut(&id) {
            m.ebpf_socket = true;
        }
    }
    let opened = proto::Opened {
        port: Some(id.into()),
        ring_capacity_bytes: shared.cfg.ring_capacity_bytes as u32,
        ebpf_window_bytes: socket.is_some().then_some(window as u32),
        ebpf_tenant: tenant,
    };
    let mut fds = vec![bell_fd];
    fds.extend(socket);
    (response::Body::Opened(opened), fds)
}

/// A new socket on the eBPF path for mailbox `id` of `tenant`.
fn ebpf_socket(fabric: &EbpfFabric, id: PortId, tenant: u32) -> std::io::Result<OwnedFd> {
    let port = WirePort {
        node: id.node,
        port: id.port,
    };
    let endpoint = fabric.endpoint(port, tenant, crate::ebpf::DEFAULT_WINDOW_BYTES)?;
    Ok(endpoint.socket().try_clone()?.into())
}

/// The uid of the process at the other end of a control connection.
fn peer_uid(sock: &OwnedFd) -> Option<u32> {
    nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.uid())
}

/// Changes the eBPF path's tenant policy for a root client.
fn tenant_policy(shared: &Shared, sock: &OwnedFd, p: &proto::TenantPolicy) -> response::Body {
    let uid = peer_uid(sock);
    if uid != Some(0) {
        let who = uid.map_or("unknown".to_string(), |u| u.to_string());
        return error_body(
            ErrorCode::ErrorBadRequest,
            format!("only root may change the tenant policy (the caller's uid is {who})"),
        );
    }
    let fabric = match &shared.ebpf {
        Ok(f) => f,
        Err(why) => {
            return error_body(
                ErrorCode::ErrorBadRequest,
                format!(
                    "this node runs without the eBPF path ({why}): it has no policy map, and each of its mailboxes reaches its own tenant only"
                ),
            )
        }
    };
    let done = if p.allow {
        fabric.allow(p.src_tenant, p.dst_tenant)
    } else {
        fabric
            .revoke(p.src_tenant, p.dst_tenant)
            .map(|()| close_forbidden_rings(shared, &shared.lock(), |_| true))
    };
    match done {
        Ok(()) => response::Body::Ok(true),
        Err(e) => error_body(
            ErrorCode::ErrorInternal,
            format!("changing the tenant policy map: {e}"),
        ),
    }
}

/// Closes to new messages (see [`ring::revoke`]) the rings between
/// mailboxes of this node that the tenant policy no longer lets through,
/// of those whose (sender, receiver) `which` picks: after a revoke, or a
/// mailbox's move to another tenant. Their senders' next `Connect` is
/// refused.
fn close_forbidden_rings(shared: &Shared, st: &State, which: impl Fn((PortId, PortId)) -> bool) {
    let tenant = |p: &PortId| st.mailboxes.get(p).map(|m| m.tenant);
    for (&pair, seg) in &st.rings {
        if let (true, Some(src), Some(dst)) = (which(pair), tenant(&pair.0), tenant(&pair.1)) {
            if !permits(shared, src, dst) {
                ring::revoke(seg);
            }
        }
    }
}

/// A client's tenant: its uid, or the one it asks for if it is root
/// (until the tenancy ledger assigns them).
fn client_tenant(sock: &OwnedFd, requested: Option<u32>) -> u32 {
    let uid = peer_uid(sock).unwrap_or(u32::MAX);
    match requested {
        Some(t) if uid == 0 => t,
        _ => uid,
    }
}

/// A ring for a `Connect`: a ready one from the pool, or else a fresh one
/// (not populated here: this runs in the control loop, and the sender's
/// mapping allocates its pages).
fn take_ring(shared: &Shared) -> std::io::Result<Segment> {
    match shared.ring_pool.take() {
        Some(seg) => Ok(seg),
        None => ringpool::new_ring(shared.cfg.ring_capacity_bytes, false),
    }
}

/// Creates the ring from `from` to local mailbox `to` and hands the receiver
/// its end (an event). Returns the segment, an fd of it for the sender, and
/// an fd of the receiver's doorbell.
fn make_ring(
    shared: &Shared,
    st: &mut State,
    from: PortId,
    to: PortId,
) -> Result<(Arc<Segment>, OwnedFd, OwnedFd), (ErrorCode, String)> {
    let Some(receiver) = st.mailboxes.get(&to) else {
        return Err((
            ErrorCode::ErrorNoSuchMailbox,
            format!("no mailbox {to} on this node"),
        ));
    };
    if st
        .rings
        .get(&(from, to))
        .is_some_and(|seg| ring::revoked(seg))
    {
        // A revoke closed it, and its sender dropped it on hearing so (the
        // receiver drains what it holds): a new ring replaces it.
        st.rings.remove(&(from, to));
    }
    if st.rings.contains_key(&(from, to)) {
        return Err((
            ErrorCode::ErrorBadRequest,
            format!("{from} already has a ring to {to}"),
        ));
    }
    let cap = shared.cfg.ring_capacity_bytes;
    let made = (|| -> std::io::Result<(Segment, OwnedFd, OwnedFd, OwnedFd)> {
        let seg = take_ring(shared)?;
        let fd = seg.fd().expect("memfd").try_clone_to_owned()?;
        let fd2 = seg.fd().expect("memfd").try_clone_to_owned()?;
        let bell = receiver
            .doorbell
            .segment()
            .fd()
            .expect("memfd doorbell")
            .try_clone_to_owned()?;
        Ok((seg, fd, fd2, bell))
    })();
    let (seg, for_receiver, for_sender, bell) = made.map_err(|e| {
        (
            ErrorCode::ErrorInternal,
            format!("cannot create a ring: {e}"),
        )
    })?;
    let seg = Arc::new(seg);
    st.rings.insert((from, to), seg.clone());
    let ev = proto::RingAttached {
        from: Some(from.into()),
        ring_capacity_bytes: cap as u32,
    };
    send_event(
        st,
        to,
        proto::event::Body::RingAttached(ev),
        vec![for_receiver],
    );
    Ok((seg, for_sender, bell))
}

/// A ring from local mailbox `from` to remote port `to`, drained by the
/// gateway to `to`'s node. Returns fds of the ring and the gateway's
/// doorbell.
/// The gateway to `node` if it is a live member, started now for a node new
/// enough that our failure detector has not called it alive yet, but which
/// has linked to us (so it is up): e.g. a reply to its first message.
fn live_peer(shared: &Arc<Shared>, st: &mut State, node: u32) -> Option<Arc<PeerLink>> {
    if !st.peers.contains_key(&node) {
        let joining = st
            .members
            .iter()
            .filter(|m| m.node == node && st.inbound.is_current(m.node, m.incarnation))
            .max_by_key(|m| m.incarnation)
            .cloned();
        if let Some(m) = joining {
            if let Ok(link) = PeerLink::start(shared, &m) {
                st.peers.insert(m.node, link);
            }
        }
    }
    st.peers.get(&node).filter(|p| !p.is_dead()).cloned()
}

fn gateway_ring(
    shared: &Arc<Shared>,
    st: &mut State,
    from: PortId,
    to: PortId,
) -> Result<(OwnedFd, OwnedFd), (ErrorCode, String)> {
    if st.gone_ports.contains(&to) {
        return Err((
            ErrorCode::ErrorNoSuchMailbox,
            format!("{to} is gone (its node reported it)"),
        ));
    }
    let Some(peer) = live_peer(shared, st, to.node) else {
        return Err((
            ErrorCode::ErrorNoSuchMailbox,
            format!(
                "node {} of {to} is not a live member of this cluster",
                to.node
            ),
        ));
    };
    if st.rings.contains_key(&(from, to)) {
        return Err((
            ErrorCode::ErrorBadRequest,
            format!("{from} already has a ring to {to}"),
        ));
    }
    let made = (|| -> std::io::Result<(Arc<Segment>, Consumer, OwnedFd, OwnedFd)> {
        let seg = take_ring(shared)?;
        let ring_fd = seg.fd().expect("memfd").try_clone_to_owned()?;
        let bell = peer
            .doorbell
            .segment()
            .fd()
            .expect("memfd doorbell")
            .try_clone_to_owned()?;
        let seg = Arc::new(seg);
        let consumer = Consumer::attach(seg.clone())?;
        Ok((seg, consumer, ring_fd, bell))
    })();
    let (seg, consumer, ring_fd, bell) = made.map_err(|e| {
        (
            ErrorCode::ErrorInternal,
            format!("cannot create a ring: {e}"),
        )
    })?;
    st.rings.insert((from, to), seg);
    peer.add_ring(from, to, consumer);
    Ok((ring_fd, bell))
}

fn connect(shared: &Arc<Shared>, st: &mut State, from: PortId, c: proto::Connect) -> Reply {
    let direct = c.direct;
    let Some(to) = c.to.map(PortId::from) else {
        return (
            error_body(ErrorCode::ErrorBadRequest, "connect without a destination"),
            Vec::new(),
        );
    };
    // Where node links run over TCP, a client that can takes its own
    // connection to a remote receiver (no gateway, no link loop between).
    if direct && to.node != shared.cfg.node_id && shared.rdma.is_err() {
        if st.gone_ports.contains(&to) {
            return (
                error_body(
                    ErrorCode::ErrorNoSuchMailbox,
                    format!("{to} is gone (its node reported it)"),
                ),
                Vec::new(),
            );
        }
        if let Some(peer) = live_peer(shared, st, to.node) {
            let window = shared
                .cfg
                .cluster
                .as_ref()
                .map_or(crate::remote::DEFAULT_WINDOW_BYTES, |c| c.link_window_bytes);
            let reply = proto::Connected {
                to: Some(to.into()),
                ring_capacity_bytes: window as u32,
                ebpf: false,
                direct_addr: peer.link_addr.to_string(),
                to_incarnation: peer.incarnation,
                early_reached: false,
            };
            st.direct.insert((from, to));
            return (response::Body::Connected(reply), Vec::new());
        }
    }
    // A receiver that closed after this sender's first message reached it
    // (on the eBPF path): that message was delivered, as one written into
    // a ring just before its receiver closed.
    let closed = st
        .closed_here
        .iter()
        .find(|(p, _)| *p == to)
        .map(|&(_, at)| at);
    if to.node == shared.cfg.node_id && !st.mailboxes.contains_key(&to) {
        if let Some(at) = closed.filter(|&at| c.early_sent_ns != 0 && at >= c.early_sent_ns) {
            return (
                error_body(
                    ErrorCode::ErrorGone,
                    format!("mailbox {to} closed after your first message reached it ({at} ns)"),
                ),
                Vec::new(),
            );
        }
    }
    if let Some(refused) = tenant_refusal(shared, st, from, to) {
        return (refused, Vec::new());
    }
    let early_reached = early_reached(shared, st, from, to);
    if c.early_sent_ns != 0 {
        // Its first message waits in its socket: the receiver looks there
        // when its doorbell says so (making the ring takes longer).
        if let Some(receiver) = st.mailboxes.get(&to) {
            receiver.doorbell.notice();
        }
    }
    if to.node == shared.cfg.node_id && st.mailboxes.get(&to).is_some_and(|m| m.ebpf_receiver) {
        return (
            response::Body::Connected(proto::Connected {
                to: Some(to.into()),
                ebpf: true,
                early_reached,
                ..Default::default()
            }),
            Vec::new(),
        );
    }
    let made = if to.node == shared.cfg.node_id {
        make_ring(shared, st, from, to).map(|(_, ring, bell)| (ring, bell))
    } else {
        gateway_ring(shared, st, from, to)
    };
    match made {
        Ok((ring, bell)) => (
            response::Body::Connected(proto::Connected {
                to: Some(to.into()),
                ring_capacity_bytes: shared.cfg.ring_capacity_bytes as u32,
                early_reached,
                ..Default::default()
            }),
            vec![ring, bell],
        ),
        Err((code, message)) => (error_body(code, message), Vec::new()),
    }
}

/// Whether a first message `from` sent to `to` on the eBPF path before
/// its Connect arrived: both have sockets there (the caller checked that
/// the tenant policy lets it through, as the program did).
fn early_reached(shared: &Shared, st: &State, from: PortId, to: PortId) -> bool {
    let has_socket = |p: &PortId| st.mailboxes.get(p).is_some_and(|m| m.ebpf_socket);
    shared.ebpf.is_ok() && has_socket(&from) && has_socket(&to)
}

/// Whether the tenant policy lets tenant `src`'s mailboxes reach tenant
/// `dst`'s. Without the eBPF path (no policy map) a tenant reaches only
/// itself.
fn permits(shared: &Shared, src: u32, dst: u32) -> bool {
    match &shared.ebpf {
        Ok(fabric) => fabric.permits(src, dst),
        Err(_) => src == dst,
    }
}

/// The refusal of a `Connect` from `from` to `to`, a mailbox of this node,
/// if the tenant policy keeps `from`'s tenant from `to`'s (counted as
/// denied): rings and the eBPF path obey the same policy, so a process
/// cannot reach another tenant's mailbox by asking for a ring. Without the
/// eBPF path (no policy map) mailboxes reach their own tenant's only.
fn tenant_refusal(
    shared: &Shared,
    st: &mut State,
    from: PortId,
    to: PortId,
) -> Option<response::Body> {
    let tenant = |p: &PortId| st.mailboxes.get(p).map(|m| m.tenant);
    let (src, dst) = (tenant(&from)?, tenant(&to)?);
    if permits(shared, src, dst) {
        return None;
    }
    *st.connects_denied.entry(src).or_default() += 1;
    Some(error_body(
        ErrorCode::ErrorDenied,
        format!(
            "tenant {src} may not reach tenant {dst} (root lets it with `fabricd allow {src} {dst}`)"
        ),
    ))
}

fn cleanup(shared: &Shared, port: PortId) {
    let mut st = shared.lock();
    st.mailboxes.remove(&port);
    if st.closed_here.len() >= MAX_REMEMBERED_GONE_PORTS {
        st.closed_here.pop_front();
    }
    st.closed_here
        .push_back((port, crate::futex::monotonic_ns()));
    st.clients_lost += 1;
    for b in st.names.withdraw(port) {
        publish(&st, shared.cfg.node_id, &b, false);
    }
    st.subscriptions.retain(|(p, _)| *p != port);
    let me = shared.cfg.node_id;
    let ended: Vec<(PortId, PortId)> = st
        .direct
        .iter()
        .filter(|&&(from, to)| from == port || to == port)
        .copied()
        .collect();
    let mut held = Vec::new();
    for (from, to) in ended {
        st.direct.remove(&(from, to));
        held.extend(st.held_direct.remove(&(from, to)));
        if from == port && to.node != me {
            if let Some(peer) = st.peers.get(&to.node) {
                peer.sender_gone(from, to);
            }
        }
    }
    finish_direct_connections(held);
    shared.gossip_bindings(&st);
    let rings = std::mem::take(&mut st.rings);
    for ((from, to), seg) in rings {
        if from == port {
            ring::close_sender_side(&seg);
            if let Some(r) = st.mailboxes.get(&to) {
                r.doorbell.notice();
            } else if let Some(gateway) = st.peers.get(&to.node) {
                gateway.doorbell.notice();
            }
        } else if to == port {
            ring::close_receiver_side(&seg);
        } else {
            st.rings.insert((from, to), seg);
        }
    }
}
