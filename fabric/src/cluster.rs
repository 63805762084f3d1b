//! Cluster membership for `fabricd`: which nodes are up, what they can
//! take, and which cluster-scope bindings each holds.
//!
//! Membership and failure detection are chitchat's (scuttlebutt gossip with
//! a phi-accrual failure detector, over UDP); nothing here is a protocol of
//! our own. Each node's gossiped state is a few keys:
//!
//! | key | value |
//! | --- | --- |
//! | `link` | the `ip:port` of its node-link listener (TCP, same port as gossip) |
//! | `cap` | `cores mem_available_bytes load_milli` |
//! | `b:<node>:<port>:<address>` | one cluster-scope binding (empty value) |
//!
//! so the replicated name table *is* the gossiped state: when a node is
//! declared dead its keys stop counting, which withdraws its bindings on
//! every other node. A loop (every [`SYNC_INTERVAL`], or at once when the
//! daemon's own bindings change or another node's binding keys arrive)
//! writes this node's keys and hands the daemon a [`ClusterView`] of the
//! live nodes; a change of this node's bindings is gossiped to every live
//! node at once instead of at the next gossip round.
//!
//! Nodes find each other through a seed list, or by broadcast: every node
//! announces its cluster id and gossip address on the subnet's broadcast
//! address ([`DISCOVERY_PORT`]) and gossips with whoever announces the same
//! cluster id.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chitchat::transport::UdpTransport;
use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig, ProtocolVersion};

use crate::addr::{Address, PortId};
use crate::names::Binding;

/// How often gossip runs unless configured otherwise.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(100);
/// What an incoming node link may hold for full receivers by default.
pub const DEFAULT_LINK_HELD_BYTES: usize = 16 << 20;
/// How often the view is recomputed and handed to the daemon.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// How often a node refreshes its gossiped capacity.
pub const CAPACITY_INTERVAL: Duration = Duration::from_secs(1);
/// UDP port broadcast discovery announces on.
pub const DISCOVERY_PORT: u16 = 7946;
/// How often a node announces itself by broadcast.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_millis(500);
/// The phi-accrual threshold: a node silent for about this many mean
/// heartbeat intervals is declared dead.
pub const PHI_THRESHOLD: f64 = 16.0;
/// Heartbeat intervals the detector averages, with the prior (weighing as
/// five intervals) among them. A short window keeps the prior's weight:
/// heartbeats arrive more often than the prior says (a node hears another's
/// through every third node too), and with a long window the detector
/// learnt that and declared a node dead after 0.9 s of silence — less than
/// what a 200 ms link flap costs once the neighbours' ARP entries must be
/// resolved again (about 1.1 s here). With this window it takes about 2 s,
/// still within [`ClusterConfig::failure_detection_bound`].
const SAMPLING_WINDOW: usize = 5;

const KEY_LINK: &str = "link";
const KEY_CAPACITY: &str = "cap";
const BINDING_PREFIX: &str = "b:";

/// How a node joins a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Nodes gossip only with nodes of the same cluster id.
    pub cluster_id: String,
    /// The address other nodes reach this one at: gossip (UDP) and node
    /// links (TCP) share the port. It must be a concrete address, not
    /// `0.0.0.0`, because it is what the node announces.
    pub listen: SocketAddr,
    /// Nodes to contact first; empty is fine with broadcast discovery.
    pub seeds: Vec<SocketAddr>,
    /// Announce and listen for nodes on the subnet's broadcast address.
    pub broadcast: bool,
    pub gossip_interval: Duration,
    /// Unacknowledged bytes each node link allows in flight: with the rings
    /// at both ends, what a sender can have outstanding to a slow remote
    /// receiver before it is pushed back.
    pub link_window_bytes: usize,
    /// Bytes an incoming node link may hold for receivers whose rings are
    /// full before it is read no more until they catch up (see
    /// [`crate::daemon`]'s node links).
    pub link_held_bytes: usize,
    /// Which RDMA device node links try before TCP.
    pub rdma: crate::rdma::RdmaMode,
}

impl ClusterConfig {
    /// A configuration with the default gossip interval and broadcast on.
    pub fn new(cluster_id: impl Into<String>, listen: SocketAddr) -> Self {
        ClusterConfig {
            cluster_id: cluster_id.into(),
            listen,
            seeds: Vec::new(),
            broadcast: true,
            gossip_interval: DEFAULT_GOSSIP_INTERVAL,
            link_window_bytes: crate::remote::DEFAULT_WINDOW_BYTES,
            link_held_bytes: DEFAULT_LINK_HELD_BYTES,
            rdma: crate::rdma::RdmaMode::Auto,
        }
    }

    /// The documented bound on how long a dead node stays "alive" on the
    /// others: the phi threshold times the (prior) heartbeat interval, plus
    /// a gossip round for the news and a sync for the view.
    pub fn failure_detection_bound(&self) -> Duration {
        self.heartbeat_prior().mul_f64(PHI_THRESHOLD) + self.gossip_interval + SYNC_INTERVAL
    }

    fn heartbeat_prior(&self) -> Duration {
        self.gossip_interval * 2
    }
}

/// The node id a cluster address implies when none is given: the low 16
/// bits of its IPv4 address (so `10.77.0.3` is node 3), never 0.
pub fn node_id_for(listen: SocketAddr) -> u32 {
    match listen.ip() {
        IpAddr::V4(v4) => (u32::from(v4) & 0xffff).max(1),
        IpAddr::V6(v6) => (u128::from(v6) as u32 & 0xffff).max(1),
    }
}

/// What a node offers for placement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub cores: u32,
    pub mem_available_bytes: u64,
    /// One-minute load average × 1000.
    pub load_milli: u32,
}

impl Capacity {
    /// This machine's, read from the kernel.
    pub fn of_this_machine() -> Capacity {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let mem_available_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemAvailable:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kib| kib.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib * 1024);
        let load_milli = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0, |l| (l * 1000.0) as u32);
        Capacity {
            cores,
            mem_available_bytes,
            load_milli,
        }
    }

    fn encode(&self) -> String {
        format!(
            "{} {} {}",
            self.cores, self.mem_available_bytes, self.load_milli
        )
    }

    fn decode(s: &str) -> Option<Capacity> {
        let mut it = s.split_whitespace();
        Some(Capacity {
            cores: it.next()?.parse().ok()?,
            mem_available_bytes: it.next()?.parse().ok()?,
            load_milli: it.next()?.parse().ok()?,
        })
    }
}

/// One node as gossip sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node: u32,
    /// Changes each time the node's daemon starts.
    pub incarnation: u64,
    /// Its node-link (TCP) address.
    pub link: SocketAddr,
    pub alive: bool,
    pub capacity: Capacity,
}

/// The cluster as one sync saw it.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// Every known node, this one included, alive or dead.
    pub members: Vec<Member>,
    /// The cluster-scope bindings of the *other* live nodes.
    pub remote_bindings: Vec<Binding>,
}

fn binding_key(b: &Binding) -> String {
    format!(
        "{BINDING_PREFIX}{}:{}:{}:{}",
        b.port.node, b.port.port, b.tenant, b.address
    )
}

fn parse_binding_key(key: &str) -> Option<Binding> {
    let rest = key.strip_prefix(BINDING_PREFIX)?;
    let mut parts = rest.splitn(4, ':');
    let node = parts.next()?.parse().ok()?;
    let port = parts.next()?.parse().ok()?;
    let tenant = parts.next()?.parse().ok()?;
    let address: Address = parts.next()?.parse().ok()?;
    Some(Binding {
        address,
        port: PortId { node, port },
        tenant,
    })
}

fn parse_member(id: &ChitchatId, alive: bool, state: &chitchat::NodeState) -> Option<Member> {
    Some(Member {
        node: id.node_id.parse().ok()?,
        incarnation: id.generation_id,
        link: state.get(KEY_LINK)?.parse().ok()?,
        alive,
        capacity: state
            .get(KEY_CAPACITY)
            .and_then(Capacity::decode)
            .unwrap_or_default(),
    })
}

/// Why membership could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the cluster address must be a concrete address peers can reach, not {0}")]
    Unspecified(SocketAddr),
    #[error("cannot start gossip on {addr}: {reason}")]
    Gossip { addr: SocketAddr, reason: String },
}

struct Inner {
    /// This node's cluster-scope bindings, as the daemon last set them.
    local_bindings: Mutex<BTreeSet<String>>,
    wake: tokio::sync::Notify,
    stopping: AtomicBool,
}

/// This node's membership: running while it lives.
pub struct Membership {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
    cfg: ClusterConfig,
}

impl Membership {
    /// Joins (or founds) the cluster as `node`/`incarnation`, announcing
    /// `link` for node links; `on_view` gets every new view, from the
    /// membership thread.
    pub fn start(
        cfg: ClusterConfig,
        node: u32,
        incarnation: u64,
        on_view: impl Fn(ClusterView) + Send + 'static,
    ) -> Result<Membership, ClusterError> {
        if cfg.listen.ip().is_unspecified() {
            return Err(ClusterError::Unspecified(cfg.listen));
        }
        let inner = Arc::new(Inner {
            local_bindings: Mutex::new(BTreeSet::new()),
            wake: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Gossip {
                addr: cfg.listen,
                reason: e.to_string(),
            })?;
        let chitchat_cfg = ChitchatConfig {
            chitchat_id: ChitchatId::new(node.to_string(), incarnation, cfg.listen),
            cluster_id: cfg.cluster_id.clone(),
            gossip_interval: cfg.gossip_interval,
            listen_addr: cfg.listen,
            seed_nodes: cfg.seeds.iter().map(ToString::to_string).collect(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: PHI_THRESHOLD,
                initial_interval: cfg.heartbeat_prior(),
                sampling_window_size: SAMPLING_WINDOW,
                dead_node_grace_period: Duration::from_secs(3600),
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let initial = vec![
            (KEY_LINK.to_string(), cfg.listen.to_string()),
            (
                KEY_CAPACITY.to_string(),
                Capacity::of_this_machine().encode(),
            ),
        ];
        let handle = runtime
            .block_on(chitchat::spawn_chitchat(
                chitchat_cfg,
                initial,
                &UdpTransport,
            ))
            .map_err(|e| ClusterError::Gossip {
                addr: cfg.listen,
                reason: format!("{e:#}"),
            })?;
        let discovery = if cfg.broadcast {
            Some(Discovery::open(&cfg).map_err(|e| ClusterError::Gossip {
                addr: cfg.listen,
                reason: format!("broadcast discovery: {e}"),
            })?)
        } else {
            None
        };
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("fabricd-gossip".into())
                .spawn(move || {
                    runtime.block_on(sync_loop(handle, inner, discovery, on_view));
                })
                .map_err(|e| ClusterError::Gossip {
                    addr: cfg.listen,
                    reason: e.to_string(),
                })?
        };
        Ok(Membership {
            inner,
            thread: Some(thread),
            cfg,
        })
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// Sets this node's cluster-scope bindings (all of them); gossip
    /// carries them to the other nodes.
    pub fn set_local_bindings<'a>(&self, bindings: impl IntoIterator<Item = &'a Binding>) {
        let keys: BTreeSet<String> = bindings.into_iter().map(binding_key).collect();
        let mut current = self
            .inner
            .local_bindings
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *current != keys {
            *current = keys;
            self.inner.wake.notify_one();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn sync_loop(
    handle: chitchat::ChitchatHandle,
    inner: Arc<Inner>,
    discovery: Option<Discovery>,
    on_view: impl Fn(ClusterView),
) {
    let chitchat = handle.chitchat();
    let self_id = handle.chitchat_id().clone();
    // A binding another node gossips to this one is handed to the daemon
    // at once, not at the next turn of this loop (a program that spawns a
    // process on another node right after binding a name waits for it).
    let _binding_changes = {
        let inner = inner.clone();
        chitchat
            .lock()
            .await
            .subscribe_event(BINDING_PREFIX, move |_| inner.wake.notify_one())
    };
    let mut last_capacity = Instant::now();
    let mut last_announce: Option<Instant> = None;
    while !inner.stopping.load(Ordering::SeqCst) {
        if let Some(d) = &discovery {
            if last_announce.is_none_or(|t| t.elapsed() >= DISCOVERY_INTERVAL) {
                d.announce();
                last_announce = Some(Instant::now());
            }
            for peer in d.heard() {
                let _ = handle.gossip(peer);
            }
        }
        let wanted = inner
            .local_bindings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (view, peers) = {
            let mut cc = chitchat.lock().await;
            let me = cc.self_node_state();
            let stale: Vec<String> = me
                .key_values()
                .filter(|(k, _)| k.starts_with(BINDING_PREFIX) && !wanted.contains(*k))
                .map(|(k, _)| k.to_string())
                .collect();
            let mut changed = !stale.is_empty();
            for k in stale {
                me.delete(&k);
            }
            for k in &wanted {
                if !me.contains_key(k) {
                    me.set(k, "");
                    changed = true;
                }
            }
            if last_capacity.elapsed() >= CAPACITY_INTERVAL {
                me.set(KEY_CAPACITY, Capacity::of_this_machine().encode());
                last_capacity = Instant::now();
            }
            let live: BTreeSet<ChitchatId> = cc.live_nodes().cloned().collect();
            let mut view = ClusterView::default();
            for (id, state) in cc.node_states() {
                let alive = live.contains(id);
                let Some(member) = parse_member(id, alive, state) else {
                    continue;
                };
                if alive && *id != self_id {
                    view.remote_bindings.extend(
                        state
                            .key_values()
                            .filter_map(|(k, _)| parse_binding_key(k))
                            // Only what the node holds itself: a binding
                            // key names its port, whose node must match.
                            .filter(|b| b.port.node == member.node),
                    );
                }
                view.members.push(member);
            }
            // This node's bindings changed: gossip with every live node now
            // rather than at the next gossip round (up to
            // `gossip_interval` away), so they learn of it within a round
            // trip.
            let peers: Vec<SocketAddr> = if changed {
                live.iter()
                    .filter(|id| **id != self_id)
                    .map(|id| id.gossip_advertise_addr)
                    .collect()
            } else {
                Vec::new()
            };
            (view, peers)
        };
        for peer in peers {
            let _ = handle.gossip(peer);
        }
        on_view(view);
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
        }
    }
    let _ = handle.shutdown().await;
}

/// Broadcast discovery: "nefele <cluster id> <gossip addr>" datagrams on
/// the subnet's broadcast address.
struct Discovery {
    socket: UdpSocket,
    message: Vec<u8>,
    cluster_id: String,
    own: SocketAddr,
    target: SocketAddr,
}

impl Discovery {
    fn open(cfg: &ClusterConfig) -> std::io::Result<Discovery> {
        let socket = socket2_broadcast(cfg.listen.ip())?;
        let target = match cfg.listen.ip() {
            IpAddr::V4(ip) => SocketAddr::new(IpAddr::V4(broadcast_of(ip)), DISCOVERY_PORT),
            IpAddr::V6(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "broadcast discovery needs an IPv4 address; give --seed instead",
                ))
            }
        };
        Ok(Discovery {
            socket,
            message: format!("nefele {} {}", cfg.cluster_id, cfg.listen).into_bytes(),
            cluster_id: cfg.cluster_id.clone(),
            own: cfg.listen,
            target,
        })
    }

    fn announce(&self) {
        let _ = self.socket.send_to(&self.message, self.target);
    }

    /// Gossip addresses announced by nodes of our cluster since last asked.
    fn heard(&self) -> Vec<SocketAddr> {
        let mut found = Vec::new();
        let mut buf = [0u8; 512];
        // Bounded: at most this many datagrams per sync.
        for _ in 0..64 {
            let Ok((n, _)) = self.socket.recv_from(&mut buf) else {
                break;
            };
            let text = String::from_utf8_lossy(&buf[..n]);
            let mut parts = text.split_whitespace();
            if parts.next() != Some("nefele") || parts.next() != Some(self.cluster_id.as_str()) {
                continue;
            }
            if let Some(Ok(addr)) = parts.next().map(str::parse::<SocketAddr>) {
                if addr != self.own && !found.contains(&addr) {
                    found.push(addr);
                }
            }
        }
        found
    }
}

/// The broadcast address of `ip`'s subnet, from its interface's address
/// and netmask (an address added without `brd` has no broadcast address of
/// its own); the limited broadcast address if no interface has `ip`.
fn broadcast_of(ip: Ipv4Addr) -> Ipv4Addr {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Ipv4Addr::BROADCAST;
    };
    for ifa in addrs {
        let (Some(a), Some(mask)) = (ifa.address, ifa.netmask) else {
            continue;
        };
        if let (Some(a), Some(mask)) = (a.as_sockaddr_in(), mask.as_sockaddr_in()) {
            if a.ip() == ip {
                return Ipv4Addr::from(u32::from(ip) | !u32::from(mask.ip()));
            }
        }
    }
    Ipv4Addr::BROADCAST
}

/// A non-blocking UDP socket on the discovery port that may broadcast and
/// that several nodes on one host (namespaces aside) may share.
fn socket2_broadcast(_ip: IpAddr) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true)?;
    // Bound to the wildcard address: broadcasts are delivered to sockets
    // bound to it, not to the interface's own address.
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(0, 0, 0, 0, DISCOVERY_PORT),
    )?;
    Ok(UdpSocket::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_keys_round_trip() {
        for a in ["printer@{8080,1,1}", "{1000,3,3}", "printer", "x@{1,0,9}"] {
            let b = Binding {
                address: a.parse().unwrap(),
                port: PortId {
                    node: 3,
                    port: 4_000_000_000,
                },
                tenant: 1000,
            };
            assert_eq!(parse_binding_key(&binding_key(&b)), Some(b));
        }
        assert_eq!(parse_binding_key("b:3:x"), None);
        assert_eq!(parse_binding_key("b:3:4:x"), None, "a key without a tenant");
        assert_eq!(parse_binding_key("link"), None);
    }

    #[test]
    fn capacity_round_trips_and_is_read() {
        let c = Capacity::of_this_machine();
        assert!(c.cores >= 1);
        assert!(c.mem_available_bytes > 0);
        assert_eq!(Capacity::decode(&c.encode()), Some(c));
    }

    #[test]
    fn node_ids_come_from_the_address() {
        assert_eq!(node_id_for("10.77.0.3:7000".parse().unwrap()), 3);
        assert_eq!(node_id_for("10.77.1.2:7000".parse().unwrap()), 258);
        assert_eq!(node_id_for("10.77.0.0:7000".parse().unwrap()), 1);
    }
}
