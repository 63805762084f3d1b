//! The sending halves of TCP node links, all on one io_uring loop.
//!
//! Each peer node's gateway ([`PeerLink`]) drains the rings local senders
//! fill for that node and writes their messages to its one reliable link
//! ([`RemoteTx`]). Here one thread, `fabricd-links-out`, serves every TCP
//! link that way and never blocks on any of them:
//!
//! - Local senders to every peer ring one doorbell; when no ring has
//!   anything, the loop spins briefly and then parks in io_uring on that
//!   doorbell's futex (`FUTEX_WAIT`), on a `POLL_ADD` for each link that
//!   waits (for acks when its window is full, for room when a frame is
//!   half written), and on a timer.
//! - Messages go to the link with [`RemoteTx::try_send`], which queues
//!   what the window takes and writes what the socket takes; a message
//!   it could not finish is carried to the next turn, so the order holds.
//! - Each link takes at most [`SERVE_BUDGET`] messages per turn, so one busy
//!   peer cannot starve the others.
//! - What waits (connecting, reconnecting with its resend, the graceful
//!   close when the daemon stops) runs in a short thread of its own, which
//!   hands the link back (see [`Arrival`]); meanwhile its rings wait.
//!
//! An RDMA node link keeps a thread of its own ([`crate::forward`]): its
//! completion queue is polled, there is no fd to wait on.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, IoUring};

use crate::daemon::Shared;
use crate::forward::{self, GatewayRing, PeerLink};
use crate::remote::{Blocked, RemoteTx};
use crate::ring::{self, poll_fair, Doorbell, Found, SendError};
use crate::segment::Segment;
use crate::uring::{futex_wait, poll_socket, push_entry};

/// Messages one link takes per turn before the others get theirs.
const SERVE_BUDGET: usize = 256;
/// How often the loop looks whether the daemon stops.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How long the loop spins for the next message before it parks (a
/// mailbox's spin; see `forward::GATEWAY_SPIN`).
const SPIN: Duration = crate::futex::DEFAULT_SPIN;
/// How long the loop goes on serving links once the daemon stops.
const STOP_PATIENCE: Duration = Duration::from_secs(3);
/// Entries of the loop's ring: a futex wait, a poll per link, cancels.
const RING_ENTRIES: u32 = 64;

const FUTEX_TOKEN: u64 = 0;
const CANCEL_TOKEN: u64 = 1;
const FIRST_POLL_TOKEN: u64 = 2;

/// The loop, as the gateways see it.
pub(crate) struct Outbound {
    /// Rung by every local sender to another node (its gateway ring's
    /// doorbell) and by whatever hands the loop work.
    pub(crate) doorbell: Arc<Doorbell>,
    arrivals: Mutex<Vec<Arrival>>,
}

/// A link handed (back) to the loop.
pub(crate) enum Arrival {
    /// Its connection is made (first, or again after a break).
    Connected(Arc<PeerLink>, Box<RemoteTx>),
    /// It could not be made again: the link ends.
    Failed(Arc<PeerLink>),
}

impl Outbound {
    /// Starts the loop's thread.
    pub(crate) fn start(shared: &Arc<Shared>) -> std::io::Result<Arc<Outbound>> {
        let out = Arc::new(Outbound {
            doorbell: Arc::new(Doorbell::new(Segment::memfd(
                "nefele-gateways",
                ring::DOORBELL_BYTES,
            )?)?),
            arrivals: Mutex::new(Vec::new()),
        });
        let (shared, o) = (shared.clone(), out.clone());
        crate::uring::spawn_loop(
            "fabricd-links-out",
            "the outgoing node-link loop",
            move || run(&shared, &o),
        )?;
        Ok(out)
    }

    /// Hands the loop a link.
    pub(crate) fn arrive(&self, a: Arrival) {
        lock(&self.arrivals).push(a);
        self.doorbell.notice();
    }
}

/// One link in the loop.
struct OutLink {
    link: Arc<PeerLink>,
    /// `None` while a thread of its own (re)connects it.
    tx: Option<Box<RemoteTx>>,
    rings: Vec<GatewayRing>,
    /// Rings of pairs whose receiver is full (the peer said PAUSE).
    paused: Vec<GatewayRing>,
    next: usize,
    /// Control messages to send before anything else.
    control: VecDeque<Vec<u8>>,
    /// A message taken from a ring and not yet all taken by the link.
    carry: Option<Carry>,
    /// The last carried frame's buffer, for the next.
    spare: Vec<u8>,
    /// What the link waits for, and the token of the poll armed for it.
    blocked: Option<Blocked>,
    armed: Option<u64>,
    /// Its poll fired: its connection has something to read (acks, a
    /// CLOSE, its end).
    readable: bool,
    /// Messages, control messages and closed rings taken, ever: whether a
    /// turn did anything.
    taken: u64,
}

struct Carry {
    from: crate::addr::PortId,
    to: crate::addr::PortId,
    frame: Vec<u8>,
    done: usize,
}

/// What a turn of [`OutLink::serve`] left.
enum Turn {
    /// Nothing more to send now.
    Idle,
    /// Its budget ran out: there may be more.
    More,
    /// It waits for its connection (see [`OutLink::blocked`]).
    Blocked,
    /// Its connection broke: make a new one.
    Disconnected,
    /// The peer is gone (it said CLOSE, or will not take the link back).
    Gone,
}

impl OutLink {
    fn new(link: Arc<PeerLink>, tx: Box<RemoteTx>) -> OutLink {
        OutLink {
            link,
            tx: Some(tx),
            rings: Vec::new(),
            paused: Vec::new(),
            next: 0,
            control: VecDeque::new(),
            carry: None,
            spare: Vec::new(),
            blocked: None,
            armed: None,
            readable: false,
            taken: 0,
        }
    }

    /// Takes what local threads handed the gateway: rings, pauses, control
    /// messages.
    fn take_handed(&mut self) {
        let link = &self.link;
        self.rings.append(&mut forward::lock(&link.pending));
        if link.pause_changed.swap(false, Ordering::AcqRel) && !link.stop.load(Ordering::SeqCst) {
            forward::apply_pauses(link, &mut self.rings, &mut self.paused);
        }
        self.control
            .extend(std::mem::take(&mut *forward::lock(&link.control)));
    }

    /// Sends what there is, at most [`SERVE_BUDGET`] messages.
    fn serve(&mut self, shared: &Shared, msg: &mut Vec<u8>) -> Turn {
        self.take_handed();
        let Some(tx) = self.tx.as_mut() else {
            return Turn::Blocked;
        };
        self.blocked = None;
        let step = |r: Result<Option<Blocked>, SendError>, blocked: &mut Option<Blocked>| match r {
            Ok(None) => None,
            Ok(Some(Blocked::Disconnected)) => Some(Turn::Disconnected),
            Ok(Some(b)) => {
                *blocked = Some(b);
                Some(Turn::Blocked)
            }
            Err(_) => Some(Turn::Gone),
        };
        // Acks are taken as the window fills (in `try_send`), or when the
        // connection's poll fired.
        if std::mem::take(&mut self.readable) {
            if let Some(t) = step(tx.take_acks(), &mut self.blocked) {
                return t;
            }
        }
        if let Some(t) = step(tx.flush(), &mut self.blocked) {
            return t;
        }
        while let Some(c) = self.control.front() {
            let mut done = 0;
            if let Some(t) = step(tx.try_send(c, &mut done), &mut self.blocked) {
                return t;
            }
            self.control.pop_front();
            self.taken += 1;
        }
        for _ in 0..SERVE_BUDGET {
            if let Some(c) = self.carry.as_mut() {
                match tx.try_send(&c.frame, &mut c.done) {
                    Ok(None) => {
                        self.spare = std::mem::take(&mut c.frame);
                        self.carry = None;
                    }
                    Err(SendError::PeerGone) => return Turn::Gone,
                    Err(e) => {
                        // Only this message's ring suffers: its sender gets
                        // `PeerGone` from now on.
                        eprintln!("fabricd: cannot forward to node {}: {e}", self.link.node);
                        let (from, to) = (c.from, c.to);
                        self.carry = None;
                        self.rings.retain(|r| (r.from, r.to) != (from, to));
                        forward::lock(&self.link.paused).remove(&(from, to));
                        shared.forget_rings(|f, t| f == from && t == to);
                    }
                    r => return step(r, &mut self.blocked).expect("not done"),
                }
                continue;
            }
            match poll_fair(
                &mut self.rings,
                &mut self.next,
                msg,
                crate::futex::Check::Full,
                |r| &mut r.consumer,
            ) {
                // A frame still half written waits for room in the socket.
                None if tx.is_half_written() => {
                    self.blocked = Some(Blocked::Writable);
                    return Turn::Blocked;
                }
                None => return Turn::Idle,
                Some(Found::Message(i)) => {
                    let r = &self.rings[i];
                    let mut frame = std::mem::take(&mut self.spare);
                    frame.clear();
                    forward::put_port(&mut frame, r.to);
                    forward::put_port(&mut frame, r.from);
                    frame.extend_from_slice(msg);
                    self.carry = Some(Carry {
                        from: r.from,
                        to: r.to,
                        frame,
                        done: 0,
                    });
                    self.taken += 1;
                }
                Some(Found::Closed(i)) => {
                    self.taken += 1;
                    let r = self.rings.swap_remove(i);
                    forward::lock(&self.link.handed).retain(|k| *k != (r.from, r.to));
                    forward::lock(&self.link.paused).remove(&(r.from, r.to));
                    self.control
                        .push_back(forward::control(forward::SENDER_GONE, r.from, r.to));
                    return Turn::More;
                }
            }
        }
        Turn::More
    }

    /// Nothing is left to send: no message carried, no control message,
    /// no frame half written, no ring holding a record.
    fn is_drained(&self) -> bool {
        self.carry.is_none()
            && self.control.is_empty()
            && !self.tx.as_ref().is_some_and(|t| t.is_half_written())
            && !self.rings.iter().any(|r| r.consumer.has_record())
    }
}

/// Hands `tx` to a thread that makes a new connection (sending again what
/// is unacknowledged) and gives the link back to the loop.
fn reconnect(out: &Arc<Outbound>, link: Arc<PeerLink>, mut tx: Box<RemoteTx>) {
    let out2 = out.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("fabricd-reconnect-{}", link.node))
        .spawn(move || {
            let back = match tx.reconnect_blocking() {
                Ok(()) => Arrival::Connected(link, tx),
                Err(_) => Arrival::Failed(link),
            };
            out2.arrive(back);
        });
    if let Err(e) = spawned {
        eprintln!("fabricd: cannot reconnect a node link: {e}");
    }
}

/// Ends `l`: its connection is closed gracefully (in a thread: that waits
/// for the peer to read everything) when `close`, dropped otherwise; then
/// its rings are closed, so their senders get `PeerGone`.
fn end(shared: &Arc<Shared>, ring: &mut IoUring, mut l: OutLink, close: bool) {
    disarm(ring, &mut l.armed);
    let OutLink {
        link,
        tx,
        mut rings,
        mut paused,
        ..
    } = l;
    rings.append(&mut paused);
    let shared = shared.clone();
    let finish = move || {
        if let Some(tx) = tx {
            if close {
                drop(tx);
            } else {
                tx.abandon();
            }
        }
        forward::link_ended(&shared, &link, rings);
    };
    if !close {
        return finish();
    }
    if let Err(e) = std::thread::Builder::new()
        .name("fabricd-link-close".into())
        .spawn(finish)
    {
        eprintln!("fabricd: cannot close a node link: {e}");
    }
}

/// Cancels the poll armed for a link, if any.
fn disarm(ring: &mut IoUring, armed: &mut Option<u64>) {
    crate::uring::disarm(ring, armed, CANCEL_TOKEN);
}

/// The loop's links, and what they wait on.
struct Links {
    links: Vec<OutLink>,
    ring: IoUring,
    msg: Vec<u8>,
}

impl Links {
    /// Takes the links handed over since the last turn.
    fn take_arrivals(&mut self, shared: &Arc<Shared>, out: &Outbound) -> bool {
        let arrived = std::mem::take(&mut *lock(&out.arrivals));
        let any = !arrived.is_empty();
        for a in arrived {
            match a {
                Arrival::Connected(link, tx) => {
                    match self.links.iter_mut().find(|l| Arc::ptr_eq(&l.link, &link)) {
                        Some(l) => l.tx = Some(tx),
                        None => self.links.push(OutLink::new(link, tx)),
                    }
                }
                Arrival::Failed(link) => {
                    if let Some(i) = self.links.iter().position(|l| Arc::ptr_eq(&l.link, &link)) {
                        let l = self.links.swap_remove(i);
                        end(shared, &mut self.ring, l, false);
                    }
                }
            }
        }
        any
    }

    /// One turn of every link; whether any did something (and may have
    /// more).
    fn serve_all(&mut self, shared: &Arc<Shared>, out: &Arc<Outbound>) -> bool {
        let mut busy = false;
        let mut i = 0;
        while i < self.links.len() {
            let l = &mut self.links[i];
            let before = l.taken;
            let turn = l.serve(shared, &mut self.msg);
            busy |= l.taken != before;
            match turn {
                Turn::More => busy = true,
                // When stopping, paused pairs go too (their receivers' node
                // holds or waits for them); then the link closes.
                Turn::Idle if l.link.stop.load(Ordering::SeqCst) => {
                    if !l.paused.is_empty() {
                        l.rings.append(&mut l.paused);
                        busy = true;
                    } else if l.is_drained() {
                        let l = self.links.swap_remove(i);
                        end(shared, &mut self.ring, l, true);
                        busy = true;
                        continue;
                    }
                }
                Turn::Idle | Turn::Blocked => {}
                Turn::Disconnected => {
                    disarm(&mut self.ring, &mut l.armed);
                    if let Some(tx) = l.tx.take() {
                        reconnect(out, l.link.clone(), tx);
                    }
                }
                Turn::Gone => {
                    let l = self.links.swap_remove(i);
                    end(shared, &mut self.ring, l, false);
                    busy = true;
                    continue;
                }
            }
            i += 1;
        }
        busy
    }

    /// Whether a link that can send has a record waiting (a quick look).
    fn any_record(&self) -> bool {
        self.links.iter().any(|l| {
            l.tx.is_some() && l.blocked.is_none() && l.rings.iter().any(|r| r.consumer.has_record())
        })
    }
}

fn run(shared: &Arc<Shared>, out: &Arc<Outbound>) -> std::io::Result<()> {
    let mut ls = Links {
        links: Vec::new(),
        ring: IoUring::new(RING_ENTRIES)?,
        msg: Vec::new(),
    };
    let mut next_token = FIRST_POLL_TOKEN;
    let mut futex_armed = false;
    let mut next_check = Instant::now();
    let mut stopping_since = None;
    loop {
        let arrived = ls.take_arrivals(shared, out);
        let now = Instant::now();
        if now >= next_check {
            next_check = now + STOP_CHECK_INTERVAL;
            if shared.is_stopping() {
                // The daemon waits that long for its gateways; links left
                // then (their peer does not read) go without a word.
                let since = *stopping_since.get_or_insert(now);
                if now >= since + STOP_PATIENCE {
                    for l in ls.links.drain(..) {
                        if let Some(tx) = l.tx {
                            tx.abandon();
                        }
                    }
                }
                if ls.links.is_empty() {
                    break;
                }
            }
        }
        if ls.serve_all(shared, out) || arrived {
            continue;
        }
        // Spin a little for the next message, as a mailbox does.
        let spin_end = Instant::now() + SPIN;
        let mut found = false;
        while !found && Instant::now() < spin_end {
            std::hint::spin_loop();
            found = ls.any_record();
        }
        if found {
            continue;
        }
        // Park: announce, look once more, then wait on the doorbell's futex,
        // the links' polls and the timer.
        let parking = out.doorbell.park();
        if ls.take_arrivals(shared, out) || ls.serve_all(shared, out) {
            continue;
        }
        if !futex_armed {
            // SAFETY: the doorbell's word lives as long as `out`, which
            // outlives the ring: the wait is cancelled before this returns.
            unsafe {
                push_entry(
                    &mut ls.ring,
                    &futex_wait(parking.word(), parking.seen()).user_data(FUTEX_TOKEN),
                )
            };
            futex_armed = true;
        }
        for l in &mut ls.links {
            if l.armed.is_some() {
                continue;
            }
            if let (Some(b), Some(fd)) = (l.blocked, l.tx.as_ref().and_then(|t| t.fd())) {
                l.armed = Some(next_token);
                // SAFETY: a poll points at no memory.
                unsafe {
                    push_entry(
                        &mut ls.ring,
                        &poll_socket(fd, b == Blocked::Writable, next_token),
                    )
                };
                next_token += 1;
            }
        }
        let wait = next_check.saturating_duration_since(Instant::now());
        crate::uring::submit_and_wait_for(&mut ls.ring, wait)?;
        drop(parking);
        let done: Vec<u64> = ls.ring.completion().map(|c| c.user_data()).collect();
        for token in done {
            match token {
                FUTEX_TOKEN => futex_armed = false,
                CANCEL_TOKEN => {}
                t => {
                    if let Some(l) = ls.links.iter_mut().find(|l| l.armed == Some(t)) {
                        l.armed = None;
                        l.readable = true;
                    }
                }
            }
        }
    }
    // Cancel what is in flight (the futex wait reads the doorbell) and reap
    // it before the ring goes.
    if futex_armed {
        let cancel = opcode::AsyncCancel::new(FUTEX_TOKEN)
            .build()
            .user_data(CANCEL_TOKEN);
        // SAFETY: a cancel points at no memory.
        unsafe { push_entry(&mut ls.ring, &cancel) };
        while futex_armed {
            ls.ring.submit_and_wait(1)?;
            futex_armed = !ls.ring.completion().any(|c| c.user_data() == FUTEX_TOKEN);
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
