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
//! Backpressure is end to end and per sender→receiver pair: when a
//! destination ring is full, N's link thread holds that pair's messages
//! aside (in order) and asks the gateway to PAUSE the pair; the gateway
//! stops draining that sender's ring, which fills, so that sender blocks
//! while every other pair on the link keeps flowing. Once the receiver has
//! taken what was held, N says RESUME. What a link may hold is bounded
//! ([`MAX_HELD_BYTES_PER_LINK`]); past it, the link thread waits for the
//! receiver instead, and the whole link waits with it.
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
/// "`b` is full: stop forwarding from `a` to `b` until RESUME."
const PAUSE: u32 = 3;
/// "`b` took what was held for it: forward from `a` to `b` again."
const RESUME: u32 = 4;

/// Bytes of messages one incoming link may hold for receivers whose rings
/// are full (each held pair is paused at its sender's gateway, so this is
/// about what was in flight when the pause was asked for).
pub const MAX_HELD_BYTES_PER_LINK: usize = 16 << 20;
/// How soon a link thread with held messages tries to deliver them again;
/// the interval doubles while nothing goes, up to the maximum.
const HELD_RETRY_INTERVAL: Duration = Duration::from_micros(500);
const MAX_HELD_RETRY_INTERVAL: Duration = Duration::from_millis(20);

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
    /// The peer's node-link listener.
    pub link_addr: std::net::SocketAddr,
    /// Local senders' rings to the peer ring this; shared memory, so it can
    /// be handed to their processes.
    pub doorbell: Arc<Doorbell>,
    pending: Mutex<Vec<GatewayRing>>,
    /// Every ring handed to this gateway (sender, receiver), so that when
    /// the node is lost exactly these are closed — not the rings of a new
    /// incarnation of the same node id, whose gateway is another.
    handed: Mutex<Vec<(PortId, PortId)>>,
    control: Mutex<Vec<Vec<u8>>>,
    /// Pairs (local sender, peer's receiver) the peer asked us to pause.
    paused: Mutex<std::collections::HashSet<(PortId, PortId)>>,
    /// `paused` changed since the gateway last looked.
    pause_changed: AtomicBool,
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
            link_addr: member.link,
            doorbell: Arc::new(Doorbell::new(Segment::memfd(
                "nefele-gateway",
                ring::DOORBELL_BYTES,
            )?)?),
            pending: Mutex::new(Vec::new()),
            handed: Mutex::new(Vec::new()),
            control: Mutex::new(Vec::new()),
            paused: Mutex::new(Default::default()),
            pause_changed: AtomicBool::new(false),
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

    /// Tells the peer that `from` here, which had a direct link to `to`
    /// there, is gone (a killed sender cannot say so on the link itself).
    pub fn sender_gone(&self, from: PortId, to: PortId) {
        self.send_control(control(SENDER_GONE, from, to));
    }

    /// Pairs the peer has paused now.
    pub fn paused_pairs(&self) -> usize {
        lock(&self.paused).len()
    }

    /// Asks the peer to stop (`true`) or resume forwarding from `from`
    /// (there) to `to` (here).
    fn ask_pause(&self, from: PortId, to: PortId, pause: bool) {
        self.send_control(control(if pause { PAUSE } else { RESUME }, from, to));
    }

    /// Stops (`true`) or resumes draining the ring from local `from` to
    /// `to` on the peer, as the peer asked.
    fn set_paused(&self, from: PortId, to: PortId, pause: bool) {
        let mut paused = lock(&self.paused);
        let changed = if pause {
            paused.insert((from, to))
        } else {
            paused.remove(&(from, to))
        };
        drop(paused);
        if changed {
            self.pause_changed.store(true, Ordering::Release);
            self.doorbell.notice();
        }
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
fn gateway_loop(shared: &Shared, link: &PeerLink, tx: impl LinkTx, rings: &mut Vec<GatewayRing>) {
    let mut paused = Vec::new();
    forward(shared, link, tx, rings, &mut paused);
    rings.append(&mut paused);
}

/// Moves the rings of pairs the peer paused from `active` to `paused`, and
/// those it resumed back.
fn apply_pauses(link: &PeerLink, active: &mut Vec<GatewayRing>, paused: &mut Vec<GatewayRing>) {
    let set = lock(&link.paused);
    let move_where = |from: &mut Vec<GatewayRing>, to: &mut Vec<GatewayRing>, pause: bool| {
        let mut i = 0;
        while i < from.len() {
            if set.contains(&(from[i].from, from[i].to)) == pause {
                to.push(from.swap_remove(i));
            } else {
                i += 1;
            }
        }
    };
    move_where(active, paused, true);
    move_where(paused, active, false);
}

/// [`gateway_loop`]'s work: `rings` are drained, `paused` (pairs whose
/// receiver is full) wait.
fn forward(
    shared: &Shared,
    link: &PeerLink,
    mut tx: impl LinkTx,
    rings: &mut Vec<GatewayRing>,
    paused: &mut Vec<GatewayRing>,
) {
    let mut next = 0;
    let mut msg = Vec::new();
    let mut frame = Vec::new();
    let mut seen = link.doorbell.notices();
    loop {
        rings.append(&mut lock(&link.pending));
        if link.pause_changed.swap(false, Ordering::AcqRel) && !link.stop.load(Ordering::SeqCst) {
            apply_pauses(link, rings, paused);
        }
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
            // Idle: all forwarded that was there. When stopping, paused
            // pairs go too: their receivers' node holds or waits for them.
            None if link.stop.load(Ordering::SeqCst) => {
                if paused.is_empty() {
                    return;
                }
                rings.append(paused);
            }
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
                        lock(&link.paused).remove(&(r.from, r.to));
                        shared.forget_rings(|f, t| f == r.from && t == r.to);
                    }
                }
            }
            Some(Wake::Closed(i)) => {
                let r = rings.swap_remove(i);
                lock(&link.handed).retain(|k| *k != (r.from, r.to));
                lock(&link.paused).remove(&(r.from, r.to));
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
        if pending.direct.is_some() {
            crate::daemon::hand_direct(&shared, pending);
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
    let mut out = Deliveries {
        shared,
        node,
        producers: HashMap::new(),
        held: HashMap::new(),
        held_bytes: 0,
        closing: Vec::new(),
    };
    let mut buf = Vec::new();
    // Held messages are retried soon, and less often while their receivers
    // take nothing (a stalled receiver must not keep the daemon busy).
    let mut retry_every = HELD_RETRY_INTERVAL;
    let mut next_retry = Instant::now();
    loop {
        let wait = if out.held.is_empty() {
            retry_every = HELD_RETRY_INTERVAL;
            STOP_CHECK_INTERVAL
        } else {
            next_retry.saturating_duration_since(Instant::now())
        };
        let got = rx.recv(&mut buf, Some(Instant::now() + wait));
        if !out.held.is_empty() && Instant::now() >= next_retry {
            retry_every = if out.retry_held() {
                HELD_RETRY_INTERVAL
            } else {
                (retry_every * 2).min(MAX_HELD_RETRY_INTERVAL)
            };
            next_retry = Instant::now() + retry_every;
        }
        match got {
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
                    shared.tell_peer(node, |l| l.set_paused(b, other, false));
                    shared.forget_rings(|from, to| from == b && to == other);
                }
                // `b` there sends nothing more to `other` here.
                SENDER_GONE => {
                    crate::daemon::direct_sender_gone(shared, b, other);
                    out.sender_gone((b, other))
                }
                PAUSE | RESUME => {
                    shared.tell_peer(node, |l| l.set_paused(b, other, a.port == PAUSE))
                }
                _ => {}
            }
            continue;
        }
        out.deliver((b, a), data);
    }
    // Messages held for full receivers were acknowledged to the peer: they
    // are delivered before the link goes, if their receivers take them in
    // time (a stopping daemon does not wait: its receivers go too).
    let patience = if shared.is_stopping() {
        Duration::ZERO
    } else {
        NODE_LINK_RECONNECT_TIMEOUT
    };
    out.flush_held(Instant::now() + patience);
    // Receivers see their rings from that node end.
    let keys: Vec<(PortId, PortId)> = out.producers.keys().copied().collect();
    drop(out);
    shared.forget_rings(|from, to| keys.contains(&(from, to)));
}

/// An incoming link's delivery into local rings, per (remote sender, local
/// receiver): the rings, and the messages held for full ones.
struct Deliveries<'a> {
    shared: &'a Arc<Shared>,
    /// The peer node.
    node: u32,
    producers: HashMap<(PortId, PortId), Producer>,
    /// Messages for full rings, oldest first; their pairs are paused.
    held: HashMap<(PortId, PortId), std::collections::VecDeque<Vec<u8>>>,
    held_bytes: usize,
    /// Pairs whose sender is gone: closed once what is held is delivered.
    closing: Vec<(PortId, PortId)>,
}

impl Drop for Deliveries<'_> {
    /// What was still held is gone with the link: the daemon's count too.
    fn drop(&mut self) {
        self.shared.count_held_bytes(-(self.held_bytes as isize));
    }
}

impl Deliveries<'_> {
    /// Forgets what is held for `pair`.
    fn drop_held(&mut self, pair: (PortId, PortId)) {
        if let Some(q) = self.held.remove(&pair) {
            self.count_held(-(q.iter().map(Vec::len).sum::<usize>() as isize));
        }
    }

    /// Adds `delta` bytes to what this link holds, and to the daemon's
    /// count for `fabricd status`.
    fn count_held(&mut self, delta: isize) {
        self.held_bytes = self
            .held_bytes
            .checked_add_signed(delta)
            .expect("held bytes");
        self.shared.count_held_bytes(delta);
    }

    /// Delivers one message from remote `pair.0` to local `pair.1`, or
    /// holds it (and pauses the pair) if that ring is full.
    fn deliver(&mut self, pair: (PortId, PortId), data: &[u8]) {
        if let Some(q) = self.held.get_mut(&pair) {
            // Behind earlier ones, in order.
            q.push_back(data.to_vec());
            self.count_held(data.len() as isize);
            if self.held_bytes > MAX_HELD_BYTES_PER_LINK {
                // As in the unbounded case below: wait for this receiver.
                self.flush_pair(pair, SendMode::RELIABLE, None);
            }
            return;
        }
        let may_hold = self.held_bytes + data.len() <= MAX_HELD_BYTES_PER_LINK;
        let Some(producer) = self.producer(pair) else {
            return;
        };
        let sent = match producer.send(data, SendMode::RELIABLE_NONBLOCKING, None) {
            Err(SendError::WouldBlock) if may_hold => {
                self.held.entry(pair).or_default().push_back(data.to_vec());
                self.count_held(data.len() as isize);
                self.shared
                    .tell_peer(self.node, |l| l.ask_pause(pair.0, pair.1, true));
                Ok(())
            }
            // Holding more would be unbounded: wait for this receiver,
            // holding up the link as a whole.
            Err(SendError::WouldBlock) => producer.send(data, SendMode::RELIABLE, None),
            other => other,
        };
        if sent.is_err() {
            self.receiver_gone(pair);
        }
    }

    /// The ring for `pair`, made (and its receiver told) on first use;
    /// `None` (the peer told) if the receiver does not exist.
    fn producer(&mut self, pair: (PortId, PortId)) -> Option<&mut Producer> {
        use std::collections::hash_map::Entry;
        match self.producers.entry(pair) {
            Entry::Occupied(e) => Some(e.into_mut()),
            Entry::Vacant(v) => match self.shared.ring_from_remote(pair.0, pair.1) {
                Some(p) => Some(v.insert(p)),
                None => {
                    self.shared
                        .tell_peer(self.node, |l| l.receiver_gone(pair.0, pair.1));
                    None
                }
            },
        }
    }

    /// The receiver of `pair` is gone: drops its ring and what is held for
    /// it, and tells the peer.
    fn receiver_gone(&mut self, pair: (PortId, PortId)) {
        self.drop_held(pair);
        self.closing.retain(|p| *p != pair);
        self.close(pair);
        self.shared
            .tell_peer(self.node, |l| l.receiver_gone(pair.0, pair.1));
    }

    /// The sender of `pair` sends nothing more: its ring closes once what
    /// is held for it has been delivered.
    fn sender_gone(&mut self, pair: (PortId, PortId)) {
        if self.held.contains_key(&pair) {
            self.closing.push(pair);
        } else {
            self.close(pair);
        }
    }

    /// Drops `pair`'s ring: its receiver sees it end.
    fn close(&mut self, pair: (PortId, PortId)) {
        self.producers.remove(&pair);
        self.shared.forget_rings(|f, t| f == pair.0 && t == pair.1);
    }

    /// Delivers what fits of every held pair; a pair whose messages are all
    /// delivered is resumed (or closed, if its sender is gone).
    /// Returns whether any of it went.
    fn retry_held(&mut self) -> bool {
        let before = self.held_bytes;
        let pairs: Vec<(PortId, PortId)> = self.held.keys().copied().collect();
        for pair in pairs {
            self.flush_pair(pair, SendMode::RELIABLE_NONBLOCKING, None);
        }
        self.held_bytes < before
    }

    /// Delivers `pair`'s held messages in order, as far as `mode` and
    /// `deadline` let it wait for the receiver; once all are delivered, the
    /// pair is resumed (or closed, if its sender is gone).
    fn flush_pair(&mut self, pair: (PortId, PortId), mode: SendMode, deadline: Option<Instant>) {
        let Some(producer) = self.producers.get_mut(&pair) else {
            // A pair is held only while it has a ring (`receiver_gone`
            // drops both).
            self.drop_held(pair);
            return;
        };
        let Some(mut q) = self.held.remove(&pair) else {
            return;
        };
        let mut delivered = 0;
        // Err(true): the receiver is gone; Err(false): it is still full.
        let outcome = loop {
            let Some(m) = q.front() else {
                break Ok(());
            };
            match producer.send(m, mode, deadline) {
                Ok(()) => {
                    delivered += m.len();
                    q.pop_front();
                }
                Err(SendError::WouldBlock | SendError::Timeout) => break Err(false),
                Err(_) => break Err(true),
            }
        };
        self.count_held(-(delivered as isize));
        if let Err(gone) = outcome {
            self.held.insert(pair, q);
            if gone {
                self.receiver_gone(pair);
            }
            return;
        }
        if let Some(i) = self.closing.iter().position(|p| *p == pair) {
            self.closing.swap_remove(i);
            self.close(pair);
        } else {
            self.shared
                .tell_peer(self.node, |l| l.ask_pause(pair.0, pair.1, false));
        }
    }

    /// Delivers everything held, waiting for receivers until `deadline`.
    fn flush_held(&mut self, deadline: Instant) {
        let pairs: Vec<(PortId, PortId)> = self.held.keys().copied().collect();
        for pair in pairs {
            self.flush_pair(pair, SendMode::RELIABLE, Some(deadline));
        }
    }
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
