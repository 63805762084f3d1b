//! Node links: how a message reaches a mailbox on another node.
//!
//! A sender never sees the network. Its first send to a port of node N
//! gets it a ring like any other, but the ring's consumer is this daemon's
//! *gateway* for N, which drains every such ring and writes each message,
//! prefixed by its destination and source port, to one reliable
//! [`RemoteTx`] link to N's daemon (all mailboxes multiplexed on it). The
//! gateways of TCP links all run on one io_uring loop
//! ([`crate::outbound`]); an RDMA link's gateway is a thread of its own
//! (spinning, then parking on its rings' doorbell futex, like a mailbox:
//! [`gateway_loop`]). On N, one io_uring loop serves every incoming link
//! ([`crate::inbound`]): it pushes each message into a ring from the
//! (remote) source to the local destination, which N's daemon creates on
//! the first message like a local `Connect` would; the receiving mailbox
//! sees an ordinary ring from the remote port.
//!
//! Backpressure is end to end and per sender→receiver pair: when a
//! destination ring is full, N holds that pair's messages aside (in order)
//! and asks the gateway to PAUSE the pair; the gateway stops draining that
//! sender's ring, which fills, so that sender blocks while every other pair
//! on the link keeps flowing. Once the receiver has taken what was held, N
//! says RESUME. What a link may hold is bounded
//! (`ClusterConfig::link_held_bytes`); past it, N stops reading
//! that link until its receivers catch up, and the whole link waits.
//!
//! Errors travel back as control messages: when N cannot deliver to a
//! mailbox (none, or it died), it says RECEIVER_GONE and the gateway closes
//! that sender's ring, so its next send fails with `PeerGone`; when a local
//! sender goes, the gateway says SENDER_GONE and N closes the ring to the
//! receiver. When N itself dies, membership declares it dead and every ring
//! to it is closed at once: blocked senders wake with `PeerGone`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::addr::PortId;
use crate::cluster::Member;
use crate::daemon::Shared;
use crate::futex::Check;
use crate::outbound::Arrival;
use crate::rdma::{DeviceVerbs, RdmaRx, RdmaTx};
use crate::remote::{self, LinkIdentity, RemoteTx};
use crate::ring::{self, poll_fair, Consumer, Doorbell, Found, SendError, SendMode};
use crate::segment::Segment;
use crate::transport::LinkTx;

/// How long a node link tries to reconnect before it gives up (membership
/// usually declares a dead node dead sooner).
pub const NODE_LINK_RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a gateway spins for the next message before it parks: a
/// mailbox's. (Spinning longer, 200 µs, gained 10% at p50 and lost at p99
/// on 2 vCPUs, where the spinning gateways compete with the applications.)
const GATEWAY_SPIN: Duration = crate::futex::DEFAULT_SPIN;
/// How often a gateway looks whether it should stop.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Every message on a node link starts with two port ids.
pub(crate) const HEADER_BYTES: usize = 16;
/// Control messages have a first port id of node 0; its port says which.
pub(crate) const CONTROL_NODE: u32 = 0;
/// "Nothing can be delivered from `a` to `b` any more."
pub(crate) const RECEIVER_GONE: u32 = 1;
/// "`a` will send nothing more to `b`."
pub(crate) const SENDER_GONE: u32 = 2;
/// "`b` is full: stop forwarding from `a` to `b` until RESUME."
pub(crate) const PAUSE: u32 = 3;
/// "`b` took what was held for it: forward from `a` to `b` again."
pub(crate) const RESUME: u32 = 4;

pub(crate) fn put_port(out: &mut Vec<u8>, p: PortId) {
    out.extend_from_slice(&p.node.to_le_bytes());
    out.extend_from_slice(&p.port.to_le_bytes());
}

pub(crate) fn get_port(b: &[u8]) -> PortId {
    PortId {
        node: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
        port: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
    }
}

/// A data message: destination, source, payload.
pub(crate) fn split(msg: &[u8]) -> Option<(PortId, PortId, &[u8])> {
    if msg.len() < HEADER_BYTES {
        return None;
    }
    Some((
        get_port(&msg[..8]),
        get_port(&msg[8..16]),
        &msg[HEADER_BYTES..],
    ))
}

pub(crate) fn control(kind: u32, from: PortId, to: PortId) -> Vec<u8> {
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

pub(crate) struct GatewayRing {
    pub(crate) from: PortId,
    pub(crate) to: PortId,
    pub(crate) consumer: Consumer,
}

/// The outgoing half of the link to one peer node: its gateway, and
/// what local threads hand it.
pub(crate) struct PeerLink {
    pub node: u32,
    pub incarnation: u64,
    /// The peer's node-link listener.
    pub link_addr: std::net::SocketAddr,
    /// Local senders' rings to the peer ring this; shared memory, so it can
    /// be handed to their processes.
    pub doorbell: Arc<Doorbell>,
    pub(crate) pending: Mutex<Vec<GatewayRing>>,
    /// Every ring handed to this gateway (sender, receiver), so that when
    /// the node is lost exactly these are closed — not the rings of a new
    /// incarnation of the same node id, whose gateway is another.
    pub(crate) handed: Mutex<Vec<(PortId, PortId)>>,
    pub(crate) control: Mutex<Vec<Vec<u8>>>,
    /// Pairs (local sender, peer's receiver) the peer asked us to pause.
    pub(crate) paused: Mutex<std::collections::HashSet<(PortId, PortId)>>,
    /// `paused` changed since the gateway last looked.
    pub(crate) pause_changed: AtomicBool,
    pub(crate) stop: AtomicBool,
    dead: AtomicBool,
    /// What the gateway runs over: one of [`LINK_KINDS`].
    kind: std::sync::atomic::AtomicUsize,
}

/// What `nefele nodes` shows of a peer's link, by [`PeerLink::kind`].
const LINK_KINDS: [&str; 4] = ["connecting", "tcp", "rdma", "down"];
const LINK_TCP: usize = 1;
const LINK_RDMA: usize = 2;
const LINK_DOWN: usize = 3;

impl PeerLink {
    /// Starts the gateway for `member`: a thread connects it and hands it to
    /// the node-link loop ([`crate::outbound`]), or, over RDMA, runs it.
    pub fn start(shared: &Arc<Shared>, member: &Member) -> std::io::Result<Arc<PeerLink>> {
        // Where this node has an RDMA device a link may run over it, on a
        // thread of its own, parked on its own doorbell (and so, if the
        // peer takes TCP instead, that link stays on its thread too).
        let outbound = match shared.rdma {
            Ok(_) => None,
            Err(_) => Some(shared.outbound()?),
        };
        let doorbell = match &outbound {
            Some(o) => o.doorbell.clone(),
            None => Arc::new(Doorbell::new(Segment::memfd(
                "nefele-gateway",
                ring::DOORBELL_BYTES,
            )?)?),
        };
        let link = Arc::new(PeerLink {
            node: member.node,
            incarnation: member.incarnation,
            link_addr: member.link,
            doorbell,
            pending: Mutex::new(Vec::new()),
            handed: Mutex::new(Vec::new()),
            control: Mutex::new(Vec::new()),
            paused: Mutex::new(Default::default()),
            pause_changed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            kind: std::sync::atomic::AtomicUsize::new(0),
        });
        let (shared, l, addr) = (shared.clone(), link.clone(), member.link);
        let window_bytes = shared
            .cfg
            .cluster
            .as_ref()
            .map_or(remote::DEFAULT_WINDOW_BYTES, |c| c.link_window_bytes);
        std::thread::Builder::new()
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
                            let tx = tx.allow_header(HEADER_BYTES);
                            match &outbound {
                                Some(o) => return o.arrive(Arrival::Connected(l, Box::new(tx))),
                                None => gateway_loop(&shared, &l, tx, &mut rings),
                            }
                        }
                        Err(e) => eprintln!("fabricd: no link to node {} at {addr}: {e}", l.node),
                    }
                }
                link_ended(&shared, &l, rings);
            })?;
        Ok(link)
    }

    /// Waits (at most until `deadline`) for the gateway to have forwarded
    /// what it had and closed its link; after [`PeerLink::stop`].
    pub fn finish(&self, deadline: Instant) {
        while !self.is_dead() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
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
    pub(crate) fn receiver_gone(&self, from: PortId, to: PortId) {
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
    pub(crate) fn ask_pause(&self, from: PortId, to: PortId, pause: bool) {
        self.send_control(control(if pause { PAUSE } else { RESUME }, from, to));
    }

    /// Stops (`true`) or resumes draining the ring from local `from` to
    /// `to` on the peer, as the peer asked.
    pub(crate) fn set_paused(&self, from: PortId, to: PortId, pause: bool) {
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
pub(crate) fn accept_rdma(
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

/// A gateway's link is down for good: whatever is still queued can never
/// be sent, so the rings it had (`rings`, and any handed to it since) are
/// closed, and their senders get `PeerGone`.
pub(crate) fn link_ended(shared: &Shared, link: &PeerLink, mut rings: Vec<GatewayRing>) {
    link.kind.store(LINK_DOWN, Ordering::Relaxed);
    link.dead.store(true, Ordering::SeqCst);
    rings.append(&mut lock(&link.pending));
    let keys: Vec<(PortId, PortId)> = rings.iter().map(|r| (r.from, r.to)).collect();
    drop(rings);
    shared.forget_rings(|from, to| keys.contains(&(from, to)));
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
pub(crate) fn apply_pauses(
    link: &PeerLink,
    active: &mut Vec<GatewayRing>,
    paused: &mut Vec<GatewayRing>,
) {
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
