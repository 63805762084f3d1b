//! Node links: how a message reaches a mailbox on another node.
//!
//! A sender never sees the network. Its first send to a port of node N
//! gets it a ring like any other, but the ring's consumer is this daemon's
//! *gateway* for N: one thread per peer node that drains every such ring
//! and writes each message, prefixed by its destination and source port,
//! to one reliable [`RemoteTx`] link to N's daemon (all mailboxes
//! multiplexed on it). On N, one thread per incoming link reads the
//! messages and pushes each into a ring from the (remote) source to the
//! local destination, which N's daemon creates on the first message like a
//! local `Connect` would; the receiving mailbox sees an ordinary ring from
//! the remote port.
//!
//! Backpressure is end to end: a full destination ring blocks N's link
//! thread, which stops reading, so acks stop, the link's window fills, the
//! gateway blocks, and the sender's ring fills. (It is per node pair: one
//! slow mailbox holds up the others behind it on the same link.)
//!
//! Errors travel back as control messages: when N cannot deliver to a
//! mailbox (none, or it died), it says RECEIVER_GONE and the gateway closes
//! that sender's ring, so its next send fails with `PeerGone`; when a local
//! sender goes, the gateway says SENDER_GONE and N closes the ring to the
//! receiver. When N itself dies, membership declares it dead and every ring
//! to it is closed at once: blocked senders wake with `PeerGone`.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::addr::PortId;
use crate::cluster::Member;
use crate::daemon::Shared;
use crate::futex::Check;
use crate::rdma::{DeviceVerbs, RdmaRx, RdmaTx};
use crate::remote::{self, LinkIdentity, PendingConnection, RemoteRx, RemoteTx};
use crate::ring::{self, poll_fair, Consumer, Doorbell, Found, Producer, SendError, SendMode};
use crate::segment::Segment;
use crate::transport::{LinkRx, LinkTx};

/// How long a node link tries to reconnect before it gives up (membership
/// usually declares a dead node dead sooner).
pub const NODE_LINK_RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a gateway spins for the next message before it parks: a
/// mailbox's. (Spinning longer, 200 µs, gained 10% at p50 and lost at p99
/// on 2 vCPUs, where the spinning gateways compete with the applications.)
const GATEWAY_SPIN: Duration = crate::futex::DEFAULT_SPIN;
/// How often link threads look whether they should stop.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Connections of one peer queued for its link thread.
const MAX_PENDING_CONNECTIONS: usize = 4;

/// Every message on a node link starts with two port ids.
const HEADER_BYTES: usize = 16;
/// Control messages have a first port id of node 0; its port says which.
const CONTROL_NODE: u32 = 0;
/// "Nothing can be delivered from `a` to `b` any more."
const RECEIVER_GONE: u32 = 1;
/// "`a` will send nothing more to `b`."
const SENDER_GONE: u32 = 2;

fn put_port(out: &mut Vec<u8>, p: PortId) {
    out.extend_from_slice(&p.node.to_le_bytes());
    out.extend_from_slice(&p.port.to_le_bytes());
}

fn get_port(b: &[u8]) -> PortId {
    PortId {
        node: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
        port: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
    }
}

/// A data message: destination, source, payload.
fn split(msg: &[u8]) -> Option<(PortId, PortId, &[u8])> {
    if msg.len() < HEADER_BYTES {
        return None;
    }
    Some((
        get_port(&msg[..8]),
        get_port(&msg[8..16]),
        &msg[HEADER_BYTES..],
    ))
}

fn control(kind: u32, from: PortId, to: PortId) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_BYTES + 8);
    put_port(
        &mut m,
        PortId {
            node: CONTROL_NODE,
            port: kind,
        },
    );
    put_port(&mut m, from);
    put_port(&mut m, to);
    m
}

struct GatewayRing {
    from: PortId,
    to: PortId,
    consumer: Consumer,
}

/// The outgoing half of the link to one peer node: its gateway thread and
/// what local threads hand it.
pub(crate) struct PeerLink {
    pub node: u32,
    pub incarnation: u64,
    /// Local senders' rings to the peer ring this; shared memory, so it can
    /// be handed to their processes.
    pub doorbell: Arc<Doorbell>,
    pending: Mutex<Vec<GatewayRing>>,
    /// Every ring handed to this gateway (sender, receiver), so that when
    /// the node is lost exactly these are closed — not the rings of a new
    /// incarnation of the same node id, whose gateway is another.
    handed: Mutex<Vec<(PortId, PortId)>>,
    control: Mutex<Vec<Vec<u8>>>,
    stop: AtomicBool,
    dead: AtomicBool,
    /// What the gateway runs over: one of [`LINK_KINDS`].
    kind: std::sync::atomic::AtomicUsize,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What `nefele nodes` shows of a peer's link, by [`PeerLink::kind`].
const LINK_KINDS: [&str; 4] = ["connecting", "tcp", "rdma", "down"];
const LINK_TCP: usize = 1;
const LINK_RDMA: usize = 2;
const LINK_DOWN: usize = 3;

impl PeerLink {
    /// Starts the gateway for `member` (which connects in its own thread).
    pub fn start(shared: &Arc<Shared>, member: &Member) -> std::io::Result<Arc<PeerLink>> {
        let link = Arc::new(PeerLink {
            node: member.node,
            incarnation: member.incarnation,
            doorbell: Arc::new(Doorbell::new(Segment::memfd(
                "nefele-gateway",
                ring::DOORBELL_BYTES,
            )?)?),
            pending: Mutex::new(Vec::new()),
            handed: Mutex::new(Vec::new()),
            control: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            kind: std::sync::atomic::AtomicUsize::new(0),
            thread: Mutex::new(None),
        });
        let (shared, l, addr) = (shared.clone(), link.clone(), member.link);
        let window_bytes = shared
            .cfg
            .cluster
            .as_ref()
            .map_or(remote::DEFAULT_WINDOW_BYTES, |c| c.link_window_bytes);
        let thread = std::thread::Builder::new()
            .name(format!("fabricd-to-{}", member.node))
            .spawn(move || {
                let identity = LinkIdentity {
                    node: shared.cfg.node_id,
                    incarnation: shared.incarnation,
                    link: shared.next_link_id(),
                    to_incarnation: l.incarnation,
                };
                let mut rings = Vec::new();
                let hello = remote::Hello {
                    window_bytes: window_bytes as u64,
                    identity,
                };
                if let Some(tx) = rdma_link(&shared, l.node, addr, &hello) {
                    let _counted = shared.count_rdma_link();
                    l.kind.store(LINK_RDMA, Ordering::Relaxed);
                    gateway_loop(&shared, &l, tx, &mut rings);
                } else {
                    match RemoteTx::connect_as(
                        addr,
                        window_bytes,
                        identity,
                        NODE_LINK_RECONNECT_TIMEOUT,
                    ) {
                        Ok(tx) => {
                            l.kind.store(LINK_TCP, Ordering::Relaxed);
                            gateway_loop(&shared, &l, tx.allow_header(HEADER_BYTES), &mut rings)
                        }
                        Err(e) => eprintln!("fabricd: no link to node {} at {addr}: {e}", l.node),
                    }
                }
                l.kind.store(LINK_DOWN, Ordering::Relaxed);
                l.dead.store(true, Ordering::SeqCst);
                // Whatever is still queued can never be sent: its senders
                // get `PeerGone` (a consumer closes its ring when dropped).
                rings.append(&mut lock(&l.pending));
                let keys: Vec<(PortId, PortId)> = rings.iter().map(|r| (r.from, r.to)).collect();
                drop(rings);
                shared.forget_rings(|from, to| keys.contains(&(from, to)));
            })?;
        *lock(&link.thread) = Some(thread);
        Ok(link)
    }

    /// Waits (at most until `deadline`) for the gateway to have forwarded
    /// what it had and closed its link; after [`PeerLink::stop`].
    pub fn finish(&self, deadline: Instant) {
        let Some(t) = lock(&self.thread).take() else {
            return;
        };
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }

    /// What the link runs over, as `nefele nodes` shows it.
    pub fn link_kind(&self) -> &'static str {
        LINK_KINDS[self.kind.load(Ordering::Relaxed)]
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Hands the gateway a new ring from a local sender.
    pub fn add_ring(&self, from: PortId, to: PortId, consumer: Consumer) {
        lock(&self.handed).push((from, to));
        lock(&self.pending).push(GatewayRing { from, to, consumer });
        self.doorbell.notice();
    }

    fn send_control(&self, msg: Vec<u8>) {
        lock(&self.control).push(msg);
        self.doorbell.notice();
    }

    /// The rings ever handed to this gateway.
    pub fn rings(&self) -> Vec<(PortId, PortId)> {
        lock(&self.handed).clone()
    }

    /// Tells the peer that `from` (there) can no longer reach `to` (here).
    pub fn receiver_gone(&self, from: PortId, to: PortId) {
        self.send_control(control(RECEIVER_GONE, from, to));
    }

    /// Stops the gateway once it has forwarded what its rings hold; the
    /// rings are closed as it exits.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.doorbell.notice();
    }
}

/// How long an RDMA handshake (over TCP) may take.
const RDMA_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// The sending half of a node link over this node's RDMA device, if it has
/// one and the peer accepts; `None` means TCP. An RDMA link that breaks is
/// not resumed (the queue pair is the reliability layer, not TCP's
/// sequence numbers): its senders get `PeerGone`.
fn rdma_link(
    shared: &Shared,
    node: u32,
    addr: std::net::SocketAddr,
    hello: &remote::Hello,
) -> Option<RdmaTx<DeviceVerbs>> {
    let device = shared.rdma.as_ref().ok()?;
    let window_bytes = hello.window_bytes as usize;
    let attempt = || -> std::io::Result<Option<RdmaTx<DeviceVerbs>>> {
        let end = device.open(window_bytes)?;
        let Some(peer) = remote::offer_rdma(addr, hello, end.address(), RDMA_HANDSHAKE_TIMEOUT)?
        else {
            return Ok(None);
        };
        let tx = RdmaTx::new(end.connect(&peer)?, window_bytes)?;
        Ok(Some(tx.allow_header(HEADER_BYTES)))
    };
    match attempt() {
        Ok(Some(tx)) => Some(tx),
        Ok(None) => {
            eprintln!("fabricd: node {node} takes no RDMA link from us; using TCP");
            None
        }
        Err(e) => {
            eprintln!(
                "fabricd: no RDMA link to node {node} over {} ({e}); using TCP",
                device.name()
            );
            None
        }
    }
}

/// Answers an RDMA offer: the receiving half of the link over this node's
/// device, or `None` (the offer refused, so the peer uses TCP).
fn accept_rdma(
    shared: &Shared,
    pending: remote::PendingConnection,
    offer: &[u8],
) -> Option<RdmaRx<DeviceVerbs>> {
    let Ok(device) = shared.rdma.as_ref() else {
        pending.refuse();
        return None;
    };
    let window_bytes = pending.hello.window_bytes as usize;
    let node = pending.hello.identity.node;
    let end = match device.open(window_bytes) {
        Ok(end) => end,
        Err(e) => {
            eprintln!(
                "fabricd: cannot open {} for node {node}: {e}",
                device.name()
            );
            pending.refuse();
            return None;
        }
    };
    let address = end.address().to_vec();
    // Receives are posted before the peer hears our address, so its first
    // send finds one.
    let rx = match end
        .connect(offer)
        .and_then(|verbs| RdmaRx::new(verbs, window_bytes))
    {
        Ok(rx) => rx,
        Err(e) => {
            eprintln!("fabricd: no RDMA link from node {node}: {e}");
            pending.refuse();
            return None;
        }
    };
    pending.accept_rdma(&address).ok()?;
    Some(rx)
}

enum Wake {
    Notice,
    Message(usize),
    Closed(usize),
}

/// Forwards from the rings in `rings` (and those handed over later) until
/// the link breaks or is stopped; the rings are left to the caller.
fn gateway_loop(
    shared: &Shared,
    link: &PeerLink,
    mut tx: impl LinkTx,
    rings: &mut Vec<GatewayRing>,
) {
    let mut next = 0;
    let mut msg = Vec::new();
    let mut frame = Vec::new();
    let mut seen = link.doorbell.notices();
    loop {
        rings.append(&mut lock(&link.pending));
        for c in std::mem::take(&mut *lock(&link.control)) {
            if tx.send(&c, SendMode::RELIABLE, None).is_err() {
                return;
            }
        }
        let woke = link.doorbell.wait_until(
            GATEWAY_SPIN,
            Some(Instant::now() + STOP_CHECK_INTERVAL),
            |check| {
                if check == Check::Full && link.doorbell.notices() != seen {
                    return Some(Wake::Notice);
                }
                match poll_fair(rings, &mut next, &mut msg, check, |r| &mut r.consumer)? {
                    Found::Message(i) => Some(Wake::Message(i)),
                    Found::Closed(i) => Some(Wake::Closed(i)),
                }
            },
        );
        match woke {
            // Idle: all forwarded that was there.
            None if link.stop.load(Ordering::SeqCst) => return,
            None => {}
            Some(Wake::Notice) => seen = link.doorbell.notices(),
            Some(Wake::Message(i)) => {
                frame.clear();
                put_port(&mut frame, rings[i].to);
                put_port(&mut frame, rings[i].from);
                frame.extend_from_slice(&msg);
                match tx.send(&frame, SendMode::RELIABLE, None) {
                    Ok(()) => {}
                    Err(SendError::PeerGone) => return,
                    Err(e) => {
                        // Only this message's ring suffers: its sender gets
                        // `PeerGone` from now on.
                        eprintln!("fabricd: cannot forward to node {}: {e}", link.node);
                        let r = rings.swap_remove(i);
                        shared.forget_rings(|f, t| f == r.from && t == r.to);
                    }
                }
            }
            Some(Wake::Closed(i)) => {
                let r = rings.swap_remove(i);
                lock(&link.handed).retain(|k| *k != (r.from, r.to));
                if tx
                    .send(
                        &control(SENDER_GONE, r.from, r.to),
                        SendMode::RELIABLE,
                        None,
                    )
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

struct InboundLink {
    incarnation: u64,
    link: u64,
    handoff: SyncSender<PendingConnection>,
}

/// The incoming halves of node links: the newest per peer node.
#[derive(Default)]
pub(crate) struct Inbound {
    links: HashMap<u32, InboundLink>,
}

impl Inbound {
    /// Whether `node` of `incarnation` has a link to us.
    pub fn is_current(&self, node: u32, incarnation: u64) -> bool {
        self.links
            .get(&node)
            .is_some_and(|l| l.incarnation == incarnation)
    }

    /// Whether `node`'s link `(incarnation, link)` is still the current one.
    fn is_current_link(&self, node: u32, (incarnation, link): (u64, u64)) -> bool {
        self.links
            .get(&node)
            .is_some_and(|l| (l.incarnation, l.link) == (incarnation, link))
    }

    /// Calls `f` with each incoming link's node and incarnation.
    pub fn for_each(&self, mut f: impl FnMut(u32, u64)) {
        for (n, l) in &self.links {
            f(*n, l.incarnation);
        }
    }

    /// Forgets the incoming links of `nodes`: their threads stop.
    pub fn remove(&mut self, nodes: &[u32]) {
        self.links.retain(|n, _| !nodes.contains(n));
    }
}

/// Accepts node-link connections and hands each to its peer's link
/// thread (starting one for a peer or incarnation not seen before).
pub(crate) fn accept_loop(shared: Arc<Shared>, listener: Arc<TcpListener>) {
    while !shared.is_stopping() {
        let pending = match remote::accept_hello(&listener) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(_) if shared.is_stopping() => return,
            Err(e) => {
                eprintln!("fabricd: node-link accept failed: {e}");
                std::thread::sleep(STOP_CHECK_INTERVAL);
                continue;
            }
        };
        let LinkIdentity {
            node,
            incarnation,
            link,
            to_incarnation,
        } = pending.hello.identity;
        if to_incarnation != 0 && to_incarnation != shared.incarnation {
            // Meant for an earlier run of this node: its sender's gateway
            // should stop, not deliver to this run as if nothing happened.
            pending.refuse();
            continue;
        }
        if let Some(offer) = pending.rdma_offer.clone() {
            if let Some(rx) = accept_rdma(&shared, pending, &offer) {
                // A queue pair is never handed a reconnection: the channel's
                // receiving end is dropped at once.
                let (handoff, _) = sync_channel(1);
                start_receiving(&shared, node, (incarnation, link), handoff, rx, true);
            }
            continue;
        }
        let mut st = shared.lock();
        let inbound = st.inbound_mut();
        if let Some(current) = inbound.links.get(&node) {
            if (current.incarnation, current.link) == (incarnation, link) {
                let _ = current.handoff.try_send(pending);
                continue;
            }
        }
        drop(st);
        let (tx, rx) = sync_channel(MAX_PENDING_CONNECTIONS);
        let _ = tx.try_send(pending);
        start_receiving(
            &shared,
            node,
            (incarnation, link),
            tx,
            RemoteRx::handed(rx),
            false,
        );
    }
}

/// Makes `rx` the current incoming link of `node` (`handoff` takes its
/// reconnections) and starts its thread; the previous link's thread stops.
/// `over_rdma` counts it in `Stats.rdma_links` while it runs.
fn start_receiving(
    shared: &Arc<Shared>,
    node: u32,
    (incarnation, link): (u64, u64),
    handoff: SyncSender<PendingConnection>,
    rx: impl LinkRx,
    over_rdma: bool,
) {
    shared.lock().inbound_mut().links.insert(
        node,
        InboundLink {
            incarnation,
            link,
            handoff,
        },
    );
    let shared2 = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("fabricd-from-{node}"))
        .spawn(move || {
            let _counted = over_rdma.then(|| shared2.count_rdma_link());
            receive_loop(&shared2, node, (incarnation, link), rx)
        });
    if let Err(e) = spawned {
        eprintln!("fabricd: cannot start the link thread for node {node}: {e}");
    }
}

/// Delivers what one peer sends to local mailboxes, until the peer closes
/// the link or is no longer a member.
fn receive_loop(shared: &Arc<Shared>, node: u32, link: (u64, u64), mut rx: impl LinkRx) {
    let mut producers: HashMap<(PortId, PortId), Producer> = HashMap::new();
    let mut buf = Vec::new();
    loop {
        match rx.recv(&mut buf, Some(Instant::now() + STOP_CHECK_INTERVAL)) {
            Ok(true) => {}
            Ok(false) => {
                if shared.is_stopping() || !shared.lock().inbound_mut().is_current_link(node, link)
                {
                    break;
                }
                continue;
            }
            Err(_) => break,
        }
        let Some((a, b, data)) = split(&buf) else {
            continue;
        };
        if a.node == CONTROL_NODE {
            if data.len() < 8 {
                continue;
            }
            let other = get_port(data);
            match a.port {
                // `b` here sent to `other` there, which is gone.
                RECEIVER_GONE => {
                    shared.remember_gone(other);
                    shared.forget_rings(|from, to| from == b && to == other);
                }
                // `b` there sends nothing more to `other` here.
                SENDER_GONE => {
                    producers.remove(&(b, other));
                    shared.forget_rings(|from, to| from == b && to == other);
                }
                _ => {}
            }
            continue;
        }
        let (to, from) = (a, b);
        let producer = match producers.entry((from, to)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match shared.ring_from_remote(from, to)
            {
                Some(p) => v.insert(p),
                None => {
                    shared.tell_peer(node, |l| l.receiver_gone(from, to));
                    continue;
                }
            },
        };
        if producer.send(data, SendMode::RELIABLE, None).is_err() {
            producers.remove(&(from, to));
            shared.forget_rings(|f, t| f == from && t == to);
            shared.tell_peer(node, |l| l.receiver_gone(from, to));
        }
    }
    // Receivers see their rings from that node end.
    let keys: Vec<(PortId, PortId)> = producers.keys().copied().collect();
    drop(producers);
    shared.forget_rings(|from, to| keys.contains(&(from, to)));
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let (to, from) = (PortId { node: 3, port: 7 }, PortId { node: 1, port: 9 });
        let mut m = Vec::new();
        put_port(&mut m, to);
        put_port(&mut m, from);
        m.extend_from_slice(b"hello");
        assert_eq!(split(&m), Some((to, from, &b"hello"[..])));
        assert_eq!(split(&m[..15]), None);
        let c = control(RECEIVER_GONE, from, to);
        let (a, b, rest) = split(&c).unwrap();
        assert_eq!(
            (a.node, a.port, b, get_port(rest)),
            (0, RECEIVER_GONE, from, to)
        );
    }
}
