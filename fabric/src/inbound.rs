//! The receiving halves of node links.
//!
//! One thread accepts node-link connections and reads their HELLOs
//! ([`accept_loop`]). Every TCP link is then served by one io_uring loop
//! ([`tcp_loop`]): a `POLL_ADD` per link on its current connection, and a
//! read on an eventfd through which the acceptor hands over connections
//! (new links, and reconnections of known ones). A readable link is read
//! without blocking — at most [`SERVE_BUDGET`] messages at a time, so one
//! busy peer cannot starve the others — and each message is pushed into
//! the ring from its (remote) sender to its local receiver, which the
//! daemon creates on the first message like a local `Connect` would.
//!
//! Nothing here waits for a receiver. A message whose ring is full is held
//! aside (in order, per pair) and the peer's gateway is asked to PAUSE the
//! pair; held messages are tried again on a timer that backs off while the
//! receivers take nothing, and once a pair's are all delivered it is
//! RESUMEd. Each held pair is paused at its sender's gateway, so what a
//! link holds is about what was in flight when the pauses were asked for;
//! when it holds more than its bound (`ClusterConfig::link_held_bytes`, by
//! at most one message), it is not read until that goes down again: its
//! TCP window fills and the peer's senders on that link wait, while other
//! links go on.
//!
//! A link over RDMA has no fd to poll (its completion queue is polled); it
//! keeps a thread of its own that runs the same [`Receiving`] steps.

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::IoUring;

use crate::addr::PortId;
use crate::cluster::DEFAULT_LINK_HELD_BYTES;
use crate::daemon::Shared;
use crate::forward::{
    self, get_port, split, CONTROL_NODE, PAUSE, RECEIVER_GONE, RESUME, SENDER_GONE,
};
use crate::remote::{self, LinkIdentity, PendingConnection, RemoteRx};
use crate::ring::{Producer, SendError, SendMode};
use crate::transport::LinkRx;
use crate::uring::{push_entry, Waker};

/// How often the links look whether they should stop (their peer is no
/// longer a member, or the daemon stops).
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How long an ended link keeps trying to deliver what it holds (a
/// stopping daemon does not wait: its receivers go too).
const HELD_PATIENCE: Duration = forward::NODE_LINK_RECONNECT_TIMEOUT;
/// Messages taken from one link before the loop looks at the others.
const SERVE_BUDGET: usize = 256;
/// How soon a link with held messages tries to deliver them again; the
/// interval doubles while nothing goes, up to the maximum.
const HELD_RETRY_INTERVAL: Duration = Duration::from_micros(500);
const MAX_HELD_RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// The current incoming link of one peer node.
struct InboundLink {
    incarnation: u64,
    link: u64,
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

    /// Makes `(incarnation, link)` the current link of `node`.
    fn set_current(&mut self, node: u32, (incarnation, link): (u64, u64)) {
        self.links.insert(node, InboundLink { incarnation, link });
    }

    /// Calls `f` with each incoming link's node and incarnation.
    pub fn for_each(&self, mut f: impl FnMut(u32, u64)) {
        for (n, l) in &self.links {
            f(*n, l.incarnation);
        }
    }

    /// Forgets the incoming links of `nodes`: they stop.
    pub fn remove(&mut self, nodes: &[u32]) {
        self.links.retain(|n, _| !nodes.contains(n));
    }
}

fn is_current_link(shared: &Shared, node: u32, link: (u64, u64)) -> bool {
    shared.lock().inbound_mut().is_current_link(node, link)
}

/// Accepts node-link connections: TCP ones go to the [`tcp_loop`] (which
/// this starts), RDMA ones get a thread, direct links go to their
/// mailboxes' processes.
pub(crate) fn accept_loop(shared: Arc<Shared>, listener: Arc<TcpListener>) {
    let handed = match start_tcp_loop(&shared) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("fabricd: cannot start the node-link loop: {e}; no node links come in");
            return;
        }
    };
    while !shared.is_stopping() {
        let pending = match remote::accept_hello(&listener) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(_) if shared.is_stopping() => break,
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
            if let Some(rx) = forward::accept_rdma(&shared, pending, &offer) {
                receive_rdma(&shared, node, (incarnation, link), rx);
            }
            continue;
        }
        // The loop takes it as the link's next connection if the link is
        // current (a reconnection), as a new link otherwise.
        shared
            .lock()
            .inbound_mut()
            .set_current(node, (incarnation, link));
        handed.ready(pending);
    }
    handed.kick();
}

/// Starts the thread of [`tcp_loop`]; connections go to it through the
/// waker returned.
fn start_tcp_loop(shared: &Arc<Shared>) -> std::io::Result<Arc<Waker<PendingConnection>>> {
    let handed = Arc::new(Waker::new()?);
    let (shared, h) = (shared.clone(), handed.clone());
    crate::uring::spawn_loop("fabricd-links-in", "the node-link loop", move || {
        tcp_loop(&shared, &h)
    })?;
    Ok(handed)
}

/// Runs an incoming RDMA link on a thread of its own, counted in
/// `Stats.rdma_links` while it runs; it replaces the node's current link.
fn receive_rdma(shared: &Arc<Shared>, node: u32, link: (u64, u64), rx: impl LinkRx) {
    shared.lock().inbound_mut().set_current(node, link);
    let shared2 = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("fabricd-from-{node}"))
        .spawn(move || {
            let shared = &shared2;
            let _counted = shared.count_rdma_link();
            let mut r = Receiving::new(shared, node, link, rx);
            let mut buf = Vec::new();
            while !shared.is_stopping() && is_current_link(shared, node, link) {
                let now = Instant::now();
                r.out.retry_if_due(now);
                let wait = r.out.next_retry().map_or(STOP_CHECK_INTERVAL, |t| {
                    t.saturating_duration_since(now).min(STOP_CHECK_INTERVAL)
                });
                match r.serve(&mut buf, now + wait) {
                    Served::Drained | Served::More => {}
                    Served::Backlogged => std::thread::sleep(wait),
                    Served::Ended => break,
                }
            }
            let mut ending = Ending::new(r.out, shared.is_stopping());
            while let Some(t) = ending.step() {
                std::thread::sleep(t.saturating_duration_since(Instant::now()));
            }
        });
    if let Err(e) = spawned {
        eprintln!("fabricd: cannot start the link thread for node {node}: {e}");
    }
}

/// What the io_uring loop's completions mean: the eventfd read, a cancel,
/// or (any other value) the poll armed with that token.
const WAKE_TOKEN: u64 = 0;
const CANCEL_TOKEN: u64 = 1;
const FIRST_POLL_TOKEN: u64 = 2;
const LOOP_RING_ENTRIES: u32 = 64;

/// A TCP link in the loop.
struct TcpLink {
    r: Receiving<RemoteRx>,
    /// The token of the poll armed on its connection, if one is.
    armed: Option<u64>,
    /// It holds too much to be read for now.
    backlogged: bool,
}

/// Serves every incoming TCP node link (see the module's documentation)
/// until the daemon stops.
fn tcp_loop(shared: &Arc<Shared>, handed: &Waker<PendingConnection>) -> std::io::Result<()> {
    // Where the eventfd read lands: declared before the ring, so it is
    // dropped after it and never freed under a read in flight.
    let mut wake_buf = Box::new([0u8; 8]);
    let mut ring = IoUring::new(LOOP_RING_ENTRIES)?;
    // SAFETY (every `push_entry` below): polls and cancels point at no
    // memory; the eventfd read lands in `wake_buf`, which outlives the ring.
    unsafe { push_entry(&mut ring, &handed.read_entry(&mut wake_buf, WAKE_TOKEN)) };
    let mut links: HashMap<u32, TcpLink> = HashMap::new();
    let mut ending: Vec<Ending> = Vec::new();
    let mut next_token = FIRST_POLL_TOKEN;
    let mut next_check = Instant::now();
    let mut buf = Vec::new();
    // Links to read now, and links to read again after the wait (their
    // budget ran out; what is left may sit in their frame buffers, which no
    // poll sees).
    let mut ready: Vec<u32> = Vec::new();
    let mut again: Vec<u32> = Vec::new();
    loop {
        for p in handed.take() {
            // A connection's first frames may have come in with its HELLO.
            ready.extend(take_connection(
                shared,
                &mut ring,
                &mut links,
                &mut ending,
                p,
            ));
        }
        let now = Instant::now();
        if now >= next_check {
            next_check = now + STOP_CHECK_INTERVAL;
            if shared.is_stopping() {
                break;
            }
            let gone: Vec<u32> = links
                .iter()
                .filter(|(node, l)| !is_current_link(shared, **node, l.r.link))
                .map(|(node, _)| *node)
                .collect();
            for node in gone {
                if let Some(l) = links.remove(&node) {
                    end_link(&mut ring, l, &mut ending, false);
                }
            }
        }
        // Held messages, then links that were too full to read.
        for l in links.values_mut() {
            l.r.out.retry_if_due(now);
            if l.backlogged && !l.r.out.is_backlogged() {
                l.backlogged = false;
                ready.push(l.r.node);
            }
        }
        ending.retain_mut(|e| e.step().is_some());
        // Serve what is ready; arm a poll on each link that waits.
        while let Some(node) = ready.pop() {
            let Some(l) = links.get_mut(&node) else {
                continue;
            };
            match l.r.serve(&mut buf, Instant::now()) {
                Served::Drained => {}
                Served::More => again.push(node),
                Served::Backlogged => l.backlogged = true,
                Served::Ended => {
                    if let Some(l) = links.remove(&node) {
                        end_link(&mut ring, l, &mut ending, false);
                    }
                }
            }
        }
        for l in links.values_mut() {
            if l.armed.is_some() || l.backlogged || again.contains(&l.r.node) {
                continue;
            }
            if let Some((fd, _)) = l.r.rx.connection() {
                l.armed = Some(next_token);
                unsafe { push_entry(&mut ring, &crate::uring::poll_socket(fd, false, next_token)) };
                next_token += 1;
            }
        }
        // Sleep until a completion or the next timer.
        let wake_at = links
            .values()
            .filter_map(|l| l.r.out.next_retry())
            .chain(ending.iter().filter_map(Ending::next_step))
            .fold(next_check, Instant::min);
        let wait = if again.is_empty() {
            wake_at.saturating_duration_since(Instant::now())
        } else {
            Duration::ZERO
        };
        ready.append(&mut again);
        crate::uring::submit_and_wait_for(&mut ring, wait)?;
        let done: Vec<u64> = ring.completion().map(|c| c.user_data()).collect();
        for token in done {
            match token {
                WAKE_TOKEN => unsafe {
                    push_entry(&mut ring, &handed.read_entry(&mut wake_buf, WAKE_TOKEN))
                },
                CANCEL_TOKEN => {}
                t => {
                    // A poll of a connection since replaced is stale.
                    if let Some(l) = links.values_mut().find(|l| l.armed == Some(t)) {
                        l.armed = None;
                        ready.push(l.r.node);
                    }
                }
            }
        }
    }
    // Stopping: receivers go too, so nothing held is waited for; each
    // sender is told (CLOSE) as its link's receiving end is dropped.
    for (_, l) in links.drain() {
        Ending::new(l.r.out, true).step();
    }
    for mut e in ending {
        e.patience = Instant::now();
        e.step();
    }
    Ok(())
}

/// Cancels the poll armed for a link, if any.
fn disarm(ring: &mut IoUring, armed: &mut Option<u64>) {
    crate::uring::disarm(ring, armed, CANCEL_TOKEN);
}

/// Takes `p` into the loop: the next connection of its node's link, or a
/// new link that replaces the node's previous one. The node, if its link
/// has a connection now.
fn take_connection(
    shared: &Arc<Shared>,
    ring: &mut IoUring,
    links: &mut HashMap<u32, TcpLink>,
    ending: &mut Vec<Ending>,
    p: PendingConnection,
) -> Option<u32> {
    let id = p.hello.identity;
    let link = (id.incarnation, id.link);
    if let Some(l) = links.get_mut(&id.node).filter(|l| l.r.link == link) {
        disarm(ring, &mut l.armed);
        // If its HELLO cannot be answered, the sender tries again.
        return l.r.rx.adopt_newer(p, false).ok().map(|()| id.node);
    }
    // As above.
    let rx = RemoteRx::adopted(p, false).ok()?;
    let new = TcpLink {
        r: Receiving::new(shared, id.node, link, rx),
        armed: None,
        backlogged: false,
    };
    if let Some(old) = links.insert(id.node, new) {
        end_link(ring, old, ending, shared.is_stopping());
    }
    Some(id.node)
}

/// Lets `l` go: its connection without a word (its sender is gone, or its
/// node), what it holds delivered as its receivers take it.
fn end_link(ring: &mut IoUring, mut l: TcpLink, ending: &mut Vec<Ending>, stopping: bool) {
    disarm(ring, &mut l.armed);
    let TcpLink { r, .. } = l;
    r.rx.abandon();
    let mut e = Ending::new(r.out, stopping);
    if e.step().is_some() {
        ending.push(e);
    }
}

/// One incoming link: where its messages come from, and where they go.
struct Receiving<R> {
    node: u32,
    /// Its (incarnation, link) identity.
    link: (u64, u64),
    rx: R,
    out: Deliveries,
}

/// What [`Receiving::serve`] left behind.
enum Served {
    /// Nothing more to read for now.
    Drained,
    /// There may be more: its budget ran out.
    More,
    /// It holds too much for now: no more is read until it holds less.
    Backlogged,
    /// The link ended: its sender closed it, or the connection failed for
    /// good.
    Ended,
}

impl<R: LinkRx> Receiving<R> {
    fn new(shared: &Arc<Shared>, node: u32, link: (u64, u64), rx: R) -> Self {
        Receiving {
            node,
            link,
            rx,
            out: Deliveries {
                shared: shared.clone(),
                node,
                producers: HashMap::new(),
                held: HashMap::new(),
                held_bytes: 0,
                max_held_bytes: shared
                    .cfg
                    .cluster
                    .as_ref()
                    .map_or(DEFAULT_LINK_HELD_BYTES, |c| c.link_held_bytes),
                closing: Vec::new(),
                retry_every: HELD_RETRY_INTERVAL,
                next_retry: Instant::now(),
            },
        }
    }

    /// Takes what the link has, waiting for its first message until
    /// `first_deadline` (a deadline that has passed: no waiting at all).
    fn serve(&mut self, buf: &mut Vec<u8>, first_deadline: Instant) -> Served {
        let mut deadline = first_deadline;
        for _ in 0..SERVE_BUDGET {
            if self.out.is_backlogged() {
                return Served::Backlogged;
            }
            match self.rx.recv(buf, Some(deadline)) {
                Ok(true) => self.out.take(buf),
                Ok(false) => return Served::Drained,
                Err(_) => return Served::Ended,
            }
            deadline = Instant::now();
        }
        Served::More
    }
}

/// The last of a link that ended: what it held, delivered as its receivers
/// take it until its patience runs out; then its rings end.
struct Ending {
    out: Option<Deliveries>,
    patience: Instant,
}

impl Ending {
    fn new(out: Deliveries, stopping: bool) -> Ending {
        let patience = if stopping {
            Duration::ZERO
        } else {
            HELD_PATIENCE
        };
        Ending {
            out: Some(out),
            patience: Instant::now() + patience,
        }
    }

    /// Delivers what it can; `Some(when)` to be called again, `None` once
    /// it is over (its receivers see their rings from that node end).
    fn step(&mut self) -> Option<Instant> {
        let out = self.out.as_mut()?;
        let now = Instant::now();
        out.retry_if_due(now);
        if let Some(t) = out.next_retry().filter(|_| now < self.patience) {
            return Some(t.min(self.patience));
        }
        let out = self.out.take()?;
        let keys: Vec<(PortId, PortId)> = out.producers.keys().copied().collect();
        let shared = out.shared.clone();
        drop(out);
        shared.forget_rings(|from, to| keys.contains(&(from, to)));
        None
    }

    fn next_step(&self) -> Option<Instant> {
        let out = self.out.as_ref()?;
        Some(out.next_retry().unwrap_or(self.patience).min(self.patience))
    }
}

/// An incoming link's delivery into local rings, per (remote sender, local
/// receiver): the rings, and the messages held for full ones.
struct Deliveries {
    shared: Arc<Shared>,
    /// The peer node.
    node: u32,
    producers: HashMap<(PortId, PortId), Producer>,
    /// Messages for full rings, oldest first; their pairs are paused.
    held: HashMap<(PortId, PortId), VecDeque<Vec<u8>>>,
    held_bytes: usize,
    /// Past this, the link is not read.
    max_held_bytes: usize,
    /// Pairs whose sender is gone: closed once what is held is delivered.
    closing: Vec<(PortId, PortId)>,
    /// When held messages are tried next, and the interval after that
    /// (held messages are retried soon, and less often while their
    /// receivers take nothing: a stalled receiver must not keep the
    /// daemon busy).
    retry_every: Duration,
    next_retry: Instant,
}

impl Drop for Deliveries {
    /// What was still held is gone with the link: the daemon's count too.
    fn drop(&mut self) {
        self.shared.count_held_bytes(-(self.held_bytes as isize));
    }
}

impl Deliveries {
    /// Handles one message of the link: a control message from the peer's
    /// gateway, or one to deliver.
    fn take(&mut self, msg: &[u8]) {
        let Some((a, b, data)) = split(msg) else {
            return;
        };
        if a.node != CONTROL_NODE {
            self.deliver((b, a), data);
            return;
        }
        if data.len() < 8 {
            return;
        }
        let (shared, node, other) = (&self.shared, self.node, get_port(data));
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
                self.sender_gone((b, other))
            }
            PAUSE | RESUME => shared.tell_peer(node, |l| l.set_paused(b, other, a.port == PAUSE)),
            _ => {}
        }
    }

    /// Whether it holds more than a link may: the link is not read for now.
    fn is_backlogged(&self) -> bool {
        self.held_bytes > self.max_held_bytes
    }

    /// When held messages are to be tried again, if any are held.
    fn next_retry(&self) -> Option<Instant> {
        (!self.held.is_empty()).then_some(self.next_retry)
    }

    /// Tries the held messages again if their time has come.
    fn retry_if_due(&mut self, now: Instant) {
        if self.held.is_empty() || now < self.next_retry {
            return;
        }
        self.retry_every = if self.retry_held() {
            HELD_RETRY_INTERVAL
        } else {
            (self.retry_every * 2).min(MAX_HELD_RETRY_INTERVAL)
        };
        self.next_retry = Instant::now() + self.retry_every;
    }

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

    /// Holds `data` for `pair`, behind what is held for it already.
    fn hold(&mut self, pair: (PortId, PortId), data: &[u8]) {
        if self.held.is_empty() {
            self.retry_every = HELD_RETRY_INTERVAL;
            self.next_retry = Instant::now() + HELD_RETRY_INTERVAL;
        }
        self.held.entry(pair).or_default().push_back(data.to_vec());
        self.count_held(data.len() as isize);
    }

    /// Delivers one message from remote `pair.0` to local `pair.1`, or
    /// holds it (and pauses the pair) if that ring is full.
    fn deliver(&mut self, pair: (PortId, PortId), data: &[u8]) {
        if self.held.contains_key(&pair) {
            // Behind earlier ones, in order.
            self.hold(pair, data);
            return;
        }
        let Some(producer) = self.producer(pair) else {
            return;
        };
        match producer.send(data, SendMode::RELIABLE_NONBLOCKING, None) {
            Ok(()) => {}
            Err(SendError::WouldBlock) => {
                self.hold(pair, data);
                self.shared
                    .tell_peer(self.node, |l| l.ask_pause(pair.0, pair.1, true));
            }
            Err(_) => self.receiver_gone(pair),
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
            self.flush_pair(pair);
        }
        self.held_bytes < before
    }

    /// Delivers what fits of `pair`'s held messages, in order; once all
    /// are delivered, the pair is resumed (or closed, if its sender is
    /// gone).
    fn flush_pair(&mut self, pair: (PortId, PortId)) {
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
            match producer.send(m, SendMode::RELIABLE_NONBLOCKING, None) {
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
}
