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
//! Each connection has a reader thread and a writer thread; replies and
//! events go through a bounded outbox so that a client that stops reading
//! cannot stall the daemon: when its outbox is full it is disconnected.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use prost::Message as _;

use crate::addr::{Address, PortId};
use crate::ctlsock::{self, Packet};
use crate::names::{self, Binding, NameError, NameTable};
use crate::proto::{self, request, response, server_message, ErrorCode};
use crate::ring::{self, Doorbell};
use crate::segment::Segment;

/// Environment variable naming the control socket, for daemon and clients.
pub const SOCKET_ENV: &str = "NEFELE_FABRICD_SOCKET";
/// Replies and events queued for one client before it is disconnected as
/// not reading.
pub const MAX_QUEUED_PACKETS_PER_CLIENT: usize = 4096;
/// Mailboxes one daemon serves at once.
pub const DEFAULT_MAX_MAILBOXES: usize = 4096;
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket_path: default_socket_path(),
            node_id: 1,
            ring_capacity_bytes: ring::DEFAULT_RING_CAPACITY_BYTES,
            max_mailboxes: DEFAULT_MAX_MAILBOXES,
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
}

struct Outgoing {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// Rung after the packet is in the socket, so a receiver woken by it
    /// finds the packet there.
    notice: Option<Arc<Doorbell>>,
}

struct MailboxEntry {
    sock: Arc<OwnedFd>,
    outbox: SyncSender<Outgoing>,
    doorbell: Arc<Doorbell>,
}

#[derive(Default)]
struct State {
    mailboxes: HashMap<PortId, MailboxEntry>,
    /// (sender, receiver) → ring segment.
    rings: HashMap<(PortId, PortId), Arc<Segment>>,
    names: NameTable,
    subscriptions: Vec<(PortId, Address)>,
    clients_lost: u64,
}

struct Shared {
    cfg: Config,
    state: Mutex<State>,
    stopping: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in one connection's handler must not take the node down.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running daemon; dropping it stops it and removes its socket.
pub struct Daemon {
    shared: Arc<Shared>,
    listener: Arc<OwnedFd>,
    accept_thread: Option<JoinHandle<()>>,
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
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                names: NameTable::new(cfg.node_id),
                ..State::default()
            }),
            cfg,
            stopping: AtomicBool::new(false),
        });
        let accept_thread = {
            let (shared, listener) = (shared.clone(), listener.clone());
            std::thread::Builder::new()
                .name("fabricd-accept".into())
                .spawn(move || accept_loop(shared, listener))
                .map_err(|source| StartError::Listen { path, source })?
        };
        Ok(Daemon {
            shared,
            listener,
            accept_thread: Some(accept_thread),
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
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&*self.listener),
            nix::sys::socket::Shutdown::Both,
        );
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let socks: Vec<Arc<OwnedFd>> = self
            .shared
            .lock()
            .mailboxes
            .values()
            .map(|m| m.sock.clone())
            .collect();
        for s in socks {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&*s),
                nix::sys::socket::Shutdown::Both,
            );
        }
        let _ = std::fs::remove_file(&self.shared.cfg.socket_path);
    }
}

fn stats_of(shared: &Shared) -> proto::Stats {
    let st = shared.lock();
    proto::Stats {
        mailboxes: st.mailboxes.len() as u32,
        bindings: st.names.len() as u32,
        rings: st.rings.len() as u32,
        shm_segments: (st.rings.len() + st.mailboxes.len()) as u32,
        subscriptions: st.subscriptions.len() as u32,
        clients_lost: st.clients_lost,
    }
}

fn accept_loop(shared: Arc<Shared>, listener: Arc<OwnedFd>) {
    while !shared.stopping.load(Ordering::SeqCst) {
        match ctlsock::accept(listener.as_fd()) {
            Ok(sock) => {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("fabricd-conn".into())
                    .spawn(move || serve(shared, Arc::new(sock)));
                if let Err(e) = spawned {
                    eprintln!("fabricd: cannot start a connection thread: {e}");
                }
            }
            Err(e)
                if e.raw_os_error() == Some(libc::EINTR)
                    || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
            Err(_) if shared.stopping.load(Ordering::SeqCst) => break,
            Err(e) => {
                eprintln!("fabricd: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
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

fn writer_loop(sock: Arc<OwnedFd>, rx: Receiver<Outgoing>) {
    for out in rx {
        let fds: Vec<_> = out.fds.iter().map(|f| f.as_fd()).collect();
        if ctlsock::send(sock.as_fd(), &out.bytes, &fds).is_err() {
            // The client is gone; the reader side cleans up.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&*sock),
                nix::sys::socket::Shutdown::Both,
            );
            return;
        }
        if let Some(bell) = out.notice {
            bell.notice();
        }
    }
}

/// Queues a packet for `entry`'s client; a client that lets its outbox fill
/// up is cut off (its reader then cleans up).
fn enqueue(entry: &MailboxEntry, out: Outgoing) {
    match entry.outbox.try_send(out) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            eprintln!("fabricd: a client left {MAX_QUEUED_PACKETS_PER_CLIENT} packets unread; disconnecting it");
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&*entry.sock),
                nix::sys::socket::Shutdown::Both,
            );
        }
        Err(TrySendError::Disconnected(_)) => {}
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

fn publish(st: &State, node: u32, binding: &Binding, published: bool) {
    for (sub, query) in &st.subscriptions {
        if names::matches(query, binding, node) {
            let ev = proto::TopologyEvent {
                published,
                binding: Some(proto::Binding {
                    address: binding.address.to_string(),
                    port: Some(binding.port.into()),
                }),
            };
            send_event(st, *sub, proto::event::Body::Topology(ev), Vec::new());
        }
    }
}

fn serve(shared: Arc<Shared>, sock: Arc<OwnedFd>) {
    let mut buf = Vec::new();
    let (tx, rx) = sync_channel::<Outgoing>(MAX_QUEUED_PACKETS_PER_CLIENT);
    let writer = {
        let sock = sock.clone();
        std::thread::Builder::new()
            .name("fabricd-write".into())
            .spawn(move || writer_loop(sock, rx))
    };
    let Ok(writer) = writer else { return };
    let mut port: Option<PortId> = None;
    loop {
        let len = match ctlsock::recv(sock.as_fd(), &mut buf, false) {
            Ok(Packet::Data { len, .. }) => len,
            Ok(Packet::Closed) | Err(_) => break,
            Ok(Packet::Empty) => continue,
        };
        let req = match proto::Request::decode(&buf[..len]) {
            Ok(r) => r,
            Err(e) => {
                let body = error_body(
                    ErrorCode::ErrorBadRequest,
                    format!("undecodable request: {e}"),
                );
                let bytes = encode(server_message::Body::Response(proto::Response {
                    id: 0,
                    body: Some(body),
                }));
                let _ = tx.try_send(Outgoing {
                    bytes,
                    fds: Vec::new(),
                    notice: None,
                });
                continue;
            }
        };
        let (body, fds) = handle(&shared, &sock, &tx, &mut port, req.body);
        let bytes = encode(server_message::Body::Response(proto::Response {
            id: req.id,
            body: Some(body),
        }));
        if tx
            .try_send(Outgoing {
                bytes,
                fds,
                notice: None,
            })
            .is_err()
        {
            break;
        }
    }
    if let Some(p) = port {
        cleanup(&shared, p);
    }
    drop(tx);
    let _ = writer.join();
}

type Reply = (response::Body, Vec<OwnedFd>);

fn handle(
    shared: &Shared,
    sock: &Arc<OwnedFd>,
    tx: &SyncSender<Outgoing>,
    port: &mut Option<PortId>,
    body: Option<request::Body>,
) -> Reply {
    let node = shared.cfg.node_id;
    let Some(body) = body else {
        return (
            error_body(ErrorCode::ErrorBadRequest, "empty request"),
            Vec::new(),
        );
    };
    let me = match (&body, *port) {
        (request::Body::Open(_), None) => return open(shared, sock, tx, port),
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
            return (response::Body::Stats(stats_of(shared)), Vec::new())
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
    match body {
        request::Body::Open(_) | request::Body::Stats(_) => unreachable!("handled above"),
        request::Body::Bind(proto::Bind { address })
        | request::Body::Unbind(proto::Unbind { address }) => {
            let addr = match parse(&address) {
                Ok(a) => a,
                Err(r) => return r,
            };
            let changed = if binding {
                st.names.bind(addr, me)
            } else {
                st.names.unbind(&addr, me)
            };
            match changed {
                Ok(b) => {
                    publish(&st, node, &b, binding);
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
                Address::Port(_) => (Vec::new(), 0),
                _ => st.names.lookup_counted(&addr),
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
                .filter(|b| names::matches(&addr, b, node))
                .cloned()
                .collect();
            for b in &current {
                let ev = proto::TopologyEvent {
                    published: true,
                    binding: Some(proto::Binding {
                        address: b.address.to_string(),
                        port: Some(b.port.into()),
                    }),
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
        request::Body::Connect(c) => connect(shared, &mut st, me, c.to.map(Into::into)),
    }
}

fn open(
    shared: &Shared,
    sock: &Arc<OwnedFd>,
    tx: &SyncSender<Outgoing>,
    port: &mut Option<PortId>,
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
        },
    );
    *port = Some(id);
    let opened = proto::Opened {
        port: Some(id.into()),
        ring_capacity_bytes: shared.cfg.ring_capacity_bytes as u32,
    };
    (response::Body::Opened(opened), vec![bell_fd])
}

fn connect(shared: &Shared, st: &mut State, from: PortId, to: Option<PortId>) -> Reply {
    let fail = |code, msg: String| (error_body(code, msg), Vec::new());
    let Some(to) = to else {
        return fail(
            ErrorCode::ErrorBadRequest,
            "connect without a destination".into(),
        );
    };
    let Some(receiver) = st.mailboxes.get(&to) else {
        return fail(
            ErrorCode::ErrorNoSuchMailbox,
            format!("no mailbox {to} on this node"),
        );
    };
    if st.rings.contains_key(&(from, to)) {
        return fail(
            ErrorCode::ErrorBadRequest,
            format!("{from} already has a ring to {to}"),
        );
    }
    let cap = shared.cfg.ring_capacity_bytes;
    let made = (|| -> std::io::Result<(Segment, OwnedFd, OwnedFd, OwnedFd)> {
        let seg = Segment::memfd("nefele-ring", ring::segment_bytes(cap))?;
        ring::format(&seg)?;
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
    let (seg, for_receiver, for_sender, bell) = match made {
        Ok(m) => m,
        Err(e) => {
            return fail(
                ErrorCode::ErrorInternal,
                format!("cannot create a ring: {e}"),
            )
        }
    };
    st.rings.insert((from, to), Arc::new(seg));
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
    (
        response::Body::Connected(proto::Connected {
            to: Some(to.into()),
            ring_capacity_bytes: cap as u32,
        }),
        vec![for_sender, bell],
    )
}

fn cleanup(shared: &Shared, port: PortId) {
    let mut st = shared.lock();
    st.mailboxes.remove(&port);
    st.clients_lost += 1;
    for b in st.names.withdraw(port) {
        publish(&st, shared.cfg.node_id, &b, false);
    }
    st.subscriptions.retain(|(p, _)| *p != port);
    let rings = std::mem::take(&mut st.rings);
    for ((from, to), seg) in rings {
        if from == port {
            ring::close_sender_side(&seg);
            if let Some(r) = st.mailboxes.get(&to) {
                r.doorbell.notice();
            }
        } else if to == port {
            ring::close_receiver_side(&seg);
        } else {
            st.rings.insert((from, to), seg);
        }
    }
}
