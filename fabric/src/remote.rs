//! The remote link: one sender→receiver link over TCP that stays reliable
//! across connections that drop and come back.
//!
//! Frames: `[u32 body length][u8 kind][u8 flags][u64 seq][payload]`, little
//! endian. Every DATA frame carries the next sequence number; the receiver
//! acknowledges (cumulatively) each quarter of the sender's window (which
//! the sender's HELLO announces) that it reads, and it reads only while the
//! application receives: a receiver that stops receiving stops the acks,
//! and the sender's window of unacknowledged bytes fills — a slow remote
//! receiver pushes back exactly like a full ring. The sender looks for acks
//! only once half its window is in flight, so the common send is one write.
//!
//! Reliable frames stay in the sender's window until acknowledged. When the
//! connection breaks, the sender reconnects (bounded: [`RECONNECT_TIMEOUT`])
//! and the receiver's HELLO tells it the next sequence number it expects;
//! the sender drops what was acknowledged and sends the rest again, and the
//! receiver drops anything it has already delivered. So across a cut: in
//! order, no loss, no duplicates. Unreliable frames are counted in the window
//! but never resent.
//!
//! A receiver that goes away says so (CLOSE), and so does a sender: a peer's
//! death is never mistaken for a cut link. A peer whose *node* dies cannot
//! say so; that is the failure detector's job (cluster membership), which
//! then closes the link.
//!
//! Large messages are fragmented (`FLAG_MORE`) into pieces of at most a
//! quarter of the window, like in the ring.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd as _, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::addr::PortId;
use crate::ring::{SendError, SendMode, MAX_MESSAGE_BYTES};
use crate::transport::{next_wait, LinkRx, LinkTx, RecvError, Transport};

/// How long a sender keeps trying to reach its receiver again after the
/// connection broke, before it reports the peer gone.
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Unacknowledged bytes a link allows in flight unless told otherwise:
/// enough for a network's bandwidth-delay product (a ring holds far less).
pub const DEFAULT_WINDOW_BYTES: usize = 4 << 20;
/// Largest frame body accepted (a fragment plus its header).
pub const MAX_FRAME_BYTES: usize = 64 << 20;

const KIND_DATA: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_HELLO: u8 = 3;
const KIND_CLOSE: u8 = 4;
/// A node link that would rather run over RDMA: a HELLO followed by the
/// sender's queue-pair address on its device.
const KIND_RDMA_OFFER: u8 = 5;
/// The receiver's answer to an RDMA offer: its queue-pair address.
const KIND_RDMA_ACCEPT: u8 = 6;
const FLAG_MORE: u8 = 1;
const FLAG_UNRELIABLE: u8 = 2;
const HEADER_BYTES: usize = 4 + 1 + 1 + 8;

fn frame(kind: u8, flags: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    frame_into(&mut f, kind, flags, seq, payload);
    f
}

/// [`frame`] into `f`, reusing its memory.
fn frame_into(f: &mut Vec<u8>, kind: u8, flags: u8, seq: u64, payload: &[u8]) {
    f.clear();
    f.reserve(HEADER_BYTES + payload.len());
    f.extend_from_slice(&((payload.len() + 10) as u32).to_le_bytes());
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(payload);
}

/// Frame buffers a sender keeps for reuse once their frames are
/// acknowledged: memory that is written again at once, instead of fresh
/// pages the kernel must fault in and zero (a large message's frames cost
/// more in page faults than in copying).
const SPARE_FRAMES: usize = 4;

/// How long a closing side waits for its peer to finish reading.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Sends `last` and closes gracefully: FIN after all data, then reads (and
/// drops) whatever still comes until the peer closes too or `linger` ends.
/// Closing a TCP socket with unread data makes Linux send a RST and throw
/// away what was not yet transmitted — the last frames and the CLOSE.
fn close_gracefully(s: &mut TcpStream, last: &[u8], linger: Duration) {
    if s.write_all(last).is_err() || s.shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + linger;
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match s.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Bytes read from a connection, cut into frames. Reads may stop anywhere
/// (timeouts, non-blocking sockets); a partial frame waits for the rest.
///
/// The kernel copies straight into `buf`, and a payload is copied once,
/// out of it; `buf` grows to hold the largest frame seen and stays that
/// size (its bytes are initialised once, when it grows).
#[derive(Default)]
struct FrameReader {
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

/// What one attempt to read a frame gave.
enum Got {
    Frame(u8, u8, u64),
    /// Nothing complete yet (timeout or would block).
    Pending,
    /// The connection closed or broke.
    Closed,
}

/// Bytes asked of the kernel per read when no larger frame is pending.
const READ_CHUNK_BYTES: usize = 64 << 10;

impl FrameReader {
    /// The length of the frame at the front, header included, once its
    /// length word is in.
    fn front_frame_bytes(&self) -> std::io::Result<Option<usize>> {
        let have = &self.buf[self.start..self.end];
        if have.len() < 4 {
            return Ok(None);
        }
        let body = u32::from_le_bytes(have[..4].try_into().expect("4 bytes")) as usize;
        if !(10..=MAX_FRAME_BYTES).contains(&body) {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("bad frame length {body}"),
            ));
        }
        Ok(Some(4 + body))
    }

    /// The next complete frame in the buffer, its payload into `payload`.
    fn take(&mut self, payload: &mut Vec<u8>) -> std::io::Result<Option<(u8, u8, u64)>> {
        let Some(n) = self.front_frame_bytes()? else {
            return Ok(None);
        };
        if self.end - self.start < n {
            return Ok(None);
        }
        let f = &self.buf[self.start..self.start + n];
        let (kind, flags) = (f[4], f[5]);
        let seq = u64::from_le_bytes(f[6..14].try_into().expect("8 bytes"));
        payload.clear();
        payload.extend_from_slice(&f[14..]);
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        Ok(Some((kind, flags, seq)))
    }

    /// Room after `end` for the rest of the front frame (or a chunk):
    /// leftover bytes move to the front, and `buf` grows if it must.
    fn make_room(&mut self) -> std::io::Result<()> {
        let want = self.front_frame_bytes()?.unwrap_or(0).max(READ_CHUNK_BYTES);
        if self.start > 0 && self.start + want > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.start + want > self.buf.len() {
            self.buf.resize(self.start + want, 0);
        }
        Ok(())
    }

    /// Reads once from `s` (as its timeout allows; without waiting at all if
    /// `dont_wait`) unless a frame is already buffered.
    fn read(&mut self, s: &mut TcpStream, payload: &mut Vec<u8>) -> Got {
        self.read_with(s, payload, false)
    }

    fn read_with(&mut self, s: &mut TcpStream, payload: &mut Vec<u8>, dont_wait: bool) -> Got {
        loop {
            match self.take(payload) {
                Ok(Some((k, f, q))) => return Got::Frame(k, f, q),
                Ok(None) => {}
                Err(_) => return Got::Closed,
            }
            if self.make_room().is_err() {
                return Got::Closed;
            }
            let room = &mut self.buf[self.end..];
            let got = if dont_wait {
                use std::os::fd::AsRawFd;
                nix::sys::socket::recv(
                    s.as_raw_fd(),
                    room,
                    nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                )
                .map_err(std::io::Error::from)
            } else {
                s.read(room)
            };
            match got {
                Ok(0) => return Got::Closed,
                Ok(n) => self.end += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    return Got::Pending
                }
                Err(_) => return Got::Closed,
            }
        }
    }
}

/// Who a sender is: node links name their node and its incarnation, so
/// that one listener serves every peer and a restarted peer (a new
/// incarnation, sequence numbers from zero) is not mistaken for the old one;
/// `link` tells apart two links of the same incarnation (sequence numbers
/// are per link), and `to_incarnation`, if not zero, is the incarnation of
/// the receiver the sender means to reach: a restarted receiver refuses it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LinkIdentity {
    pub node: u32,
    pub incarnation: u64,
    pub link: u64,
    pub to_incarnation: u64,
}

/// The payload of a sender's HELLO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub window_bytes: u64,
    pub identity: LinkIdentity,
}

impl Hello {
    const BYTES: usize = 8 + 4 + 8 + 8 + 8;

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::BYTES);
        b.extend_from_slice(&self.window_bytes.to_le_bytes());
        b.extend_from_slice(&self.identity.node.to_le_bytes());
        b.extend_from_slice(&self.identity.incarnation.to_le_bytes());
        b.extend_from_slice(&self.identity.link.to_le_bytes());
        b.extend_from_slice(&self.identity.to_incarnation.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Hello> {
        let b = b.get(..Self::BYTES)?;
        let u64_at = |at: usize| b[at..at + 8].try_into().ok().map(u64::from_le_bytes);
        Some(Hello {
            window_bytes: u64_at(0)?,
            identity: LinkIdentity {
                node: u32::from_le_bytes(b[8..12].try_into().ok()?),
                incarnation: u64_at(12)?,
                link: u64_at(20)?,
                to_incarnation: u64_at(28)?,
            },
        })
    }
}

/// A sender's connection whose HELLO has been read (by a shared acceptor)
/// but not answered: the receiver it belongs to answers it.
pub struct PendingConnection {
    stream: TcpStream,
    reader: FrameReader,
    pub hello: Hello,
    /// The sender's queue-pair address, if it offers an RDMA link (see
    /// [`offer_rdma`]) instead of this TCP connection.
    pub rdma_offer: Option<Vec<u8>>,
    /// For a direct link (see [`RemoteTx::connect_direct`]): the sending
    /// mailbox and the receiving one, which takes the connection itself.
    pub direct: Option<(PortId, PortId)>,
    /// The sequence number the sender's HELLO carries: the next it sends.
    pub next_seq: u64,
}

/// The bytes a direct link's HELLO carries after [`Hello`]: sender and
/// receiver ports.
const DIRECT_BYTES: usize = 16;

fn encode_direct(from: PortId, to: PortId) -> Vec<u8> {
    [from.node, from.port, to.node, to.port]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn decode_direct(b: &[u8]) -> Option<(PortId, PortId)> {
    if b.len() != DIRECT_BYTES {
        return None;
    }
    let at = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    Some((
        PortId {
            node: at(0),
            port: at(1),
        },
        PortId {
            node: at(2),
            port: at(3),
        },
    ))
}

impl PendingConnection {
    /// Answers the HELLO of a sender that has never sent anything on its
    /// link (`next_seq` 0): its receiver can only expect sequence number 0,
    /// so the acceptor answers for it, and the sender need not wait for a
    /// receiver that is not receiving yet. `false` if it had sent.
    pub fn answer_fresh(&mut self) -> std::io::Result<bool> {
        if self.next_seq != 0 {
            return Ok(false);
        }
        self.stream.write_all(&frame(KIND_HELLO, 0, 0, &[]))?;
        Ok(true)
    }

    /// The connection as an fd, to hand to the process that receives on it
    /// (see [`PendingConnection::from_handoff`]). Nothing after the HELLO
    /// can have been read: a sender waits for the answer before sending on.
    pub fn into_handoff(self) -> std::io::Result<OwnedFd> {
        if self.reader.start != self.reader.end {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                "the sender sent more than its HELLO before the answer",
            ));
        }
        Ok(OwnedFd::from(self.stream))
    }

    /// A connection handed over by the acceptor that read its `hello`.
    pub fn from_handoff(fd: OwnedFd, hello: Hello) -> std::io::Result<PendingConnection> {
        let stream = TcpStream::from(fd);
        stream.set_nonblocking(false)?;
        Ok(PendingConnection {
            stream,
            reader: FrameReader::default(),
            hello,
            rdma_offer: None,
            direct: None,
            next_seq: 0,
        })
    }

    /// Accepts an RDMA offer: tells the sender this end's queue-pair
    /// `address`. The TCP connection then closes; the link is the queue
    /// pair.
    pub fn accept_rdma(mut self, address: &[u8]) -> std::io::Result<()> {
        self.stream
            .write_all(&frame(KIND_RDMA_ACCEPT, 0, 0, address))
    }

    /// Turns the sender away: it gets CLOSE, so it reports its peer gone
    /// at once instead of retrying.
    pub fn refuse(mut self) {
        let _ = self.stream.write_all(&frame(KIND_CLOSE, 0, 0, &[]));
    }
}

/// Accepts one connection on `listener` and reads its HELLO (waiting at
/// most half a second for it). `Ok(None)` when nothing is waiting or the
/// connection did not introduce itself.
pub fn accept_hello(listener: &TcpListener) -> std::io::Result<Option<PendingConnection>> {
    let mut s = match listener.accept() {
        Ok((s, _)) => s,
        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut reader = FrameReader::default();
    let mut payload = Vec::new();
    if let Got::Frame(kind @ (KIND_HELLO | KIND_RDMA_OFFER), _, next_seq) =
        reader.read(&mut s, &mut payload)
    {
        if let Some(hello) = Hello::decode(&payload) {
            let rest = &payload[Hello::BYTES..];
            let rdma = kind == KIND_RDMA_OFFER;
            return Ok(Some(PendingConnection {
                stream: s,
                reader,
                hello,
                rdma_offer: rdma.then(|| rest.to_vec()),
                direct: if rdma { None } else { decode_direct(rest) },
                next_seq,
            }));
        }
    }
    Ok(None)
}

/// Offers the node-link listener at `addr` an RDMA link instead of TCP:
/// says who we are (`hello`) and where our queue pair is (`address`, see
/// [`crate::rdma::RdmaEnd`]). Returns the peer's queue-pair address, or
/// `None` when it declines (no device there, or one of another kind), in
/// which case the link should use TCP.
pub fn offer_rdma(
    addr: SocketAddr,
    hello: &Hello,
    address: &[u8],
    timeout: Duration,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    let mut offer = hello.encode();
    offer.extend_from_slice(address);
    s.write_all(&frame(KIND_RDMA_OFFER, 0, 0, &offer))?;
    let mut reader = FrameReader::default();
    let mut payload = Vec::new();
    match reader.read(&mut s, &mut payload) {
        Got::Frame(KIND_RDMA_ACCEPT, _, _) => Ok(Some(payload)),
        Got::Frame(KIND_CLOSE, _, _) | Got::Closed => Ok(None),
        Got::Frame(kind, _, _) => Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("unexpected answer (frame kind {kind}) to an RDMA offer"),
        )),
        Got::Pending => Err(std::io::Error::new(
            ErrorKind::TimedOut,
            "no answer to an RDMA offer",
        )),
    }
}

/// A sent frame not yet acknowledged.
struct InFlight {
    seq: u64,
    bytes: usize,
    /// The whole frame, kept to send again after a reconnect (reliable only).
    frame: Option<Vec<u8>>,
}

/// The sending half of a remote link.
pub struct RemoteTx {
    addr: SocketAddr,
    /// Who this sender is, told to the receiver in every HELLO (a node
    /// link's node id and incarnation; zero for a plain link).
    identity: LinkIdentity,
    /// What the HELLO carries after the identity (a direct link's ports).
    hello_extra: Vec<u8>,
    /// A direct link waits for its receiver's answer as long as it takes
    /// (a process answers when it next receives), and its writes wait in
    /// slices so that the owner can give up in between.
    direct: bool,
    reconnect_timeout: Duration,
    max_message_bytes: usize,
    stream: Option<TcpStream>,
    reader: FrameReader,
    next_seq: u64,
    window_bytes: usize,
    in_flight: VecDeque<InFlight>,
    in_flight_bytes: usize,
    dropped: u64,
    peer_gone: bool,
    buf: Vec<u8>,
    /// Acknowledged frames' buffers, at most [`SPARE_FRAMES`].
    spare: Vec<Vec<u8>>,
    on_connection: Option<ConnectionHook>,
    /// Bytes of the newest frame in flight written so far, while the rest
    /// waits for room in the socket ([`RemoteTx::try_send`]).
    half_written: Option<usize>,
}

/// What a [`RemoteTx::try_send`] that could not finish waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Blocked {
    /// Room in the socket: a frame is half written.
    Writable,
    /// Acks: the window is full.
    Readable,
    /// A new connection ([`RemoteTx::reconnect_blocking`]).
    Disconnected,
}

/// Told each connection a link starts to send on, before it sends (or
/// sends again) anything on it: a direct link hands it to its daemon.
pub type ConnectionHook = Box<dyn FnMut(BorrowedFd<'_>) + Send>;

/// Asked by a direct link's sender while it waits (for room, for its
/// receiver's answer, for a connection): `true` gives up, with
/// [`SendError::PeerGone`] — the receiver's node is gone.
pub type GiveUp<'a> = &'a mut dyn FnMut() -> bool;

/// How long a direct link waits at a time before asking whether to give up.
const GIVE_UP_CHECK: Duration = Duration::from_millis(50);

/// What one attempt to introduce a new connection gave.
enum Handshake {
    Done,
    /// The receiver turned us away (CLOSE), or the owner gave up.
    Gone,
    Failed,
}

impl RemoteTx {
    /// A link to the receiver listening at `addr`, with `window_bytes` of
    /// unacknowledged data allowed in flight.
    pub fn connect(addr: SocketAddr, window_bytes: usize) -> std::io::Result<RemoteTx> {
        Self::connect_as(
            addr,
            window_bytes,
            LinkIdentity::default(),
            RECONNECT_TIMEOUT,
        )
    }

    fn unconnected(addr: SocketAddr, window_bytes: usize, identity: LinkIdentity) -> RemoteTx {
        RemoteTx {
            addr,
            identity,
            hello_extra: Vec::new(),
            direct: false,
            reconnect_timeout: RECONNECT_TIMEOUT,
            max_message_bytes: MAX_MESSAGE_BYTES,
            stream: None,
            reader: FrameReader::default(),
            next_seq: 0,
            window_bytes,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            dropped: 0,
            peer_gone: false,
            buf: Vec::new(),
            spare: Vec::new(),
            on_connection: None,
            half_written: None,
        }
    }

    /// A link that introduces itself as `identity` (so that one listener can
    /// serve many senders) and gives up reconnecting after
    /// `reconnect_timeout`.
    pub fn connect_as(
        addr: SocketAddr,
        window_bytes: usize,
        identity: LinkIdentity,
        reconnect_timeout: Duration,
    ) -> std::io::Result<RemoteTx> {
        let mut tx = Self::unconnected(addr, window_bytes, identity);
        tx.reconnect_timeout = reconnect_timeout;
        tx.reconnect(Instant::now() + reconnect_timeout, &mut || false)
            .map_err(|e| {
                std::io::Error::new(
                    ErrorKind::ConnectionRefused,
                    format!("cannot reach {addr}: {e}"),
                )
            })?;
        Ok(tx)
    }

    /// A direct link from mailbox `from` to mailbox `to` of another node,
    /// through that node's link listener at `addr`, which hands the
    /// connection to `to`'s process (see [`PendingConnection::direct`]).
    ///
    /// `Err(Ok(e))`: `addr` cannot be reached from here (`e`), so the caller
    /// may take another way; `Err(Err(e))`: the receiver refused (it is
    /// gone) or `give_up` said so. The receiver answers when it next
    /// receives; until then this waits, asking `give_up`. `on_connection`
    /// is told this connection and every later one.
    pub fn connect_direct(
        addr: SocketAddr,
        window_bytes: usize,
        identity: LinkIdentity,
        (from, to): (PortId, PortId),
        give_up: GiveUp,
        on_connection: ConnectionHook,
    ) -> Result<RemoteTx, Result<std::io::Error, SendError>> {
        let mut tx = Self::unconnected(addr, window_bytes, identity);
        tx.hello_extra = encode_direct(from, to);
        tx.direct = true;
        tx.on_connection = Some(on_connection);
        let s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(Ok)?;
        match tx.handshake(s, give_up) {
            Handshake::Done => Ok(tx),
            Handshake::Gone => Err(Err(SendError::PeerGone)),
            Handshake::Failed => Err(Ok(std::io::Error::new(
                ErrorKind::ConnectionAborted,
                format!("{addr} did not answer a direct link's HELLO"),
            ))),
        }
    }

    /// Lets reliable messages be `extra` bytes longer than
    /// [`MAX_MESSAGE_BYTES`]: room for a routing header in front of the
    /// largest message (node links carry one).
    pub fn allow_header(mut self, extra: usize) -> Self {
        self.max_message_bytes = MAX_MESSAGE_BYTES + extra;
        self
    }

    fn max_fragment(&self) -> usize {
        (self.window_bytes / 4).saturating_sub(HEADER_BYTES).max(1)
    }

    /// Gives up: the link is gone for good.
    fn gone(&mut self) -> SendError {
        self.peer_gone = true;
        SendError::PeerGone
    }

    /// (Re)connects, learns what the receiver already delivered, and sends
    /// again what it has not.
    fn reconnect(&mut self, deadline: Instant, give_up: GiveUp) -> Result<(), SendError> {
        self.stream = None;
        // The handshake sends every frame in flight again, whole.
        self.half_written = None;
        let mut backoff = Duration::from_millis(1);
        loop {
            if let Ok(s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) {
                match self.handshake(s, give_up) {
                    Handshake::Done => return Ok(()),
                    Handshake::Gone => return Err(self.gone()),
                    Handshake::Failed => {}
                }
            }
            if Instant::now() + backoff > deadline || give_up() {
                return Err(self.gone());
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    /// Introduces a new connection `s` and, once the receiver says what it
    /// expects next, sends again what it has not acknowledged.
    fn handshake(&mut self, mut s: TcpStream, give_up: GiveUp) -> Handshake {
        let _ = s.set_nodelay(true);
        let wait = if self.direct {
            GIVE_UP_CHECK
        } else {
            Duration::from_millis(500)
        };
        let _ = s.set_read_timeout(Some(wait));
        if self.direct {
            let _ = s.set_write_timeout(Some(GIVE_UP_CHECK));
        }
        self.reader = FrameReader::default();
        let hello = Hello {
            window_bytes: self.window_bytes as u64,
            identity: self.identity,
        };
        let mut payload = hello.encode();
        payload.extend_from_slice(&self.hello_extra);
        if write_patiently(
            &mut s,
            &frame(KIND_HELLO, 0, self.next_seq, &payload),
            give_up,
        )
        .is_err()
        {
            return Handshake::Failed;
        }
        loop {
            match self.reader.read(&mut s, &mut self.buf) {
                Got::Frame(KIND_ACK, _, _) => {}
                Got::Frame(KIND_HELLO, _, expected) => {
                    self.acked(expected);
                    if let Some(hook) = self.on_connection.as_mut() {
                        hook(s.as_fd());
                    }
                    for f in self.in_flight.iter().filter_map(|f| f.frame.as_ref()) {
                        if write_patiently(&mut s, f, give_up).is_err() {
                            return Handshake::Failed;
                        }
                    }
                    let _ = s.set_read_timeout(None);
                    self.stream = Some(s);
                    return Handshake::Done;
                }
                Got::Frame(KIND_CLOSE, _, _) => return Handshake::Gone,
                Got::Pending if self.direct => {
                    if give_up() {
                        return Handshake::Gone;
                    }
                }
                _ => return Handshake::Failed,
            }
        }
    }

    /// Forgets frames below `expected` (the receiver has them).
    fn acked(&mut self, expected: u64) {
        while self.in_flight.front().is_some_and(|f| f.seq < expected) {
            let f = self.in_flight.pop_front().expect("checked");
            self.in_flight_bytes -= f.bytes;
            self.recycle(f.frame);
        }
    }

    /// Takes in acknowledgements: waiting up to `wait` for the next one, or
    /// only what has arrived when `wait` is zero. A broken connection is
    /// re-established (and the unacknowledged frames sent again).
    fn pump_acks(&mut self, wait: Duration, give_up: GiveUp) -> Result<(), SendError> {
        loop {
            let Some(s) = self.stream.as_mut() else {
                self.reconnect(Instant::now() + self.reconnect_timeout, give_up)?;
                continue;
            };
            if !wait.is_zero() {
                let _ = s.set_read_timeout(Some(wait));
            }
            let got = self.reader.read_with(s, &mut self.buf, wait.is_zero());
            match got {
                Got::Frame(KIND_ACK, _, expected) => {
                    self.acked(expected);
                    if !wait.is_zero() {
                        return Ok(());
                    }
                }
                Got::Frame(KIND_CLOSE, _, _) => return Err(self.gone()),
                Got::Frame(..) => {}
                Got::Pending => return Ok(()),
                Got::Closed => self.reconnect(Instant::now() + self.reconnect_timeout, give_up)?,
            }
        }
    }

    /// Keeps a sent frame's buffer for the next frame, if there is room.
    fn recycle(&mut self, frame: Option<Vec<u8>>) {
        if let Some(f) = frame {
            if self.spare.len() < SPARE_FRAMES {
                self.spare.push(f);
            }
        }
    }

    /// The next data frame, numbered, in a recycled buffer if there is one.
    fn next_frame(&mut self, flags: u8, payload: &[u8]) -> (u64, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut f = self.spare.pop().unwrap_or_default();
        frame_into(&mut f, KIND_DATA, flags, seq, payload);
        (seq, f)
    }

    /// Counts frame `seq` in flight until it is acknowledged; `frame` is
    /// kept to send again after a reconnect (reliable frames).
    fn sent(&mut self, seq: u64, bytes: usize, frame: Option<Vec<u8>>) {
        self.in_flight.push_back(InFlight { seq, bytes, frame });
        self.in_flight_bytes += bytes;
    }

    fn send_frame(
        &mut self,
        flags: u8,
        payload: &[u8],
        reliable: bool,
        give_up: GiveUp,
    ) -> Result<(), SendError> {
        let (seq, f) = self.next_frame(flags, payload);
        let bytes = f.len();
        let written = match self.stream.as_mut() {
            Some(s) => write_patiently(s, &f, give_up),
            None => Err(ErrorKind::NotConnected.into()),
        };
        let kept = if reliable {
            Some(f)
        } else {
            self.recycle(Some(f));
            None
        };
        self.sent(seq, bytes, kept);
        match written {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => Err(self.gone()),
            // The reconnect sends it again (if reliable).
            Err(_) => self.reconnect(Instant::now() + self.reconnect_timeout, give_up),
        }
    }

    /// [`LinkTx::send`] that asks `give_up` whenever it waits (see
    /// [`GiveUp`]).
    pub fn send_or_give_up(
        &mut self,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
        give_up: GiveUp,
    ) -> Result<(), SendError> {
        if self.peer_gone {
            return Err(SendError::PeerGone);
        }
        // Acks come a quarter window at a time; look for them (one
        // non-blocking recv) only once half the window is in flight.
        if self.in_flight_bytes > self.window_bytes / 2 {
            self.pump_acks(Duration::ZERO, give_up)?;
        }
        let frag = self.max_fragment();
        if !mode.reliable {
            if msg.len() > frag {
                return Err(SendError::TooLarge {
                    len: msg.len(),
                    max: frag,
                });
            }
            if self.in_flight_bytes + msg.len() + HEADER_BYTES > self.window_bytes {
                self.dropped += 1;
                return Ok(());
            }
            return self.send_frame(FLAG_UNRELIABLE, msg, false, give_up);
        }
        if msg.len() > self.max_message_bytes {
            return Err(SendError::TooLarge {
                len: msg.len(),
                max: self.max_message_bytes,
            });
        }
        let step = if self.direct {
            GIVE_UP_CHECK
        } else {
            Duration::from_millis(100)
        };
        let pieces = msg.len().div_ceil(frag).max(1);
        for (k, chunk) in (0..pieces).map(|k| {
            (
                k,
                &msg[(k * frag).min(msg.len())..((k + 1) * frag).min(msg.len())],
            )
        }) {
            let need = chunk.len() + HEADER_BYTES;
            while self.in_flight_bytes + need > self.window_bytes && !self.in_flight.is_empty() {
                if k == 0 && !mode.blocking {
                    return Err(SendError::WouldBlock);
                }
                // Once a message has begun, it is finished: a timeout
                // between its fragments would leave the receiver half of it.
                let wait = match next_wait(deadline, step) {
                    Some(w) => w,
                    None if k == 0 => return Err(SendError::Timeout),
                    None => step,
                };
                self.pump_acks(wait.max(Duration::from_millis(1)), give_up)?;
                if self.direct && give_up() {
                    return Err(self.gone());
                }
            }
            let flags = if k + 1 < pieces { FLAG_MORE } else { 0 };
            self.send_frame(flags, chunk, true, give_up)?;
        }
        Ok(())
    }

    /// Drops the connection without the CLOSE and the wait for the
    /// receiver to read everything (its node is gone, or it is).
    pub fn abandon(mut self) {
        self.stream = None;
    }

    // ---- without waiting: for an event loop that serves many links ----

    /// The current connection's fd, for the loop to poll.
    pub(crate) fn fd(&self) -> Option<RawFd> {
        self.stream.as_ref().map(|s| s.as_raw_fd())
    }

    /// Makes a new connection after [`Blocked::Disconnected`], waiting (at
    /// most the reconnect timeout): for a thread of its own, not the loop.
    pub(crate) fn reconnect_blocking(&mut self) -> Result<(), SendError> {
        if self.peer_gone {
            return Err(SendError::PeerGone);
        }
        self.reconnect(Instant::now() + self.reconnect_timeout, &mut || false)
    }

    /// Whether a frame waits for room in the socket.
    pub(crate) fn is_half_written(&self) -> bool {
        self.half_written.is_some()
    }

    /// [`LinkTx::send`] of a reliable message that never waits: it queues
    /// what the window has room for from byte `*done` of `msg` on (moving
    /// `*done`), and says what it waits for when it cannot finish. `None`:
    /// the whole message is taken (its last bytes may still be waiting for
    /// room in the socket: see [`RemoteTx::flush`]).
    pub(crate) fn try_send(
        &mut self,
        msg: &[u8],
        done: &mut usize,
    ) -> Result<Option<Blocked>, SendError> {
        if self.peer_gone {
            return Err(SendError::PeerGone);
        }
        if msg.len() > self.max_message_bytes {
            return Err(SendError::TooLarge {
                len: msg.len(),
                max: self.max_message_bytes,
            });
        }
        if let Some(b) = self.flush()? {
            return Ok(Some(b));
        }
        // As in `send_or_give_up`: acks come a quarter window at a time.
        if self.in_flight_bytes > self.window_bytes / 2 {
            if let Some(b) = self.take_acks()? {
                return Ok(Some(b));
            }
        }
        let frag = self.max_fragment();
        loop {
            let end = (*done + frag).min(msg.len());
            let chunk = &msg[*done..end];
            let need = chunk.len() + HEADER_BYTES;
            if self.in_flight_bytes + need > self.window_bytes && !self.in_flight.is_empty() {
                if let Some(b) = self.take_acks()? {
                    return Ok(Some(b));
                }
                if self.in_flight_bytes + need > self.window_bytes {
                    return Ok(Some(Blocked::Readable));
                }
            }
            let flags = if end < msg.len() { FLAG_MORE } else { 0 };
            let (seq, f) = self.next_frame(flags, chunk);
            self.sent(seq, f.len(), Some(f));
            self.half_written = Some(0);
            *done = end;
            let blocked = self.flush()?;
            if *done == msg.len() {
                return Ok(None);
            }
            if blocked.is_some() {
                return Ok(blocked);
            }
        }
    }

    /// Writes what is left of a half-written frame, as far as the socket
    /// takes it now.
    pub(crate) fn flush(&mut self) -> Result<Option<Blocked>, SendError> {
        let Some(mut written) = self.half_written else {
            return Ok(None);
        };
        let Some(s) = self.stream.as_ref() else {
            self.half_written = None;
            return Ok(Some(Blocked::Disconnected));
        };
        let f = self
            .in_flight
            .back()
            .and_then(|f| f.frame.as_ref())
            .expect("a half-written frame is the newest in flight");
        while written < f.len() {
            let sent = nix::sys::socket::send(
                s.as_raw_fd(),
                &f[written..],
                nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            );
            match sent {
                Ok(n) => written += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => {
                    self.half_written = Some(written);
                    return Ok(Some(Blocked::Writable));
                }
                Err(_) => {
                    // The new connection sends it again, whole.
                    self.stream = None;
                    self.half_written = None;
                    return Ok(Some(Blocked::Disconnected));
                }
            }
        }
        self.half_written = None;
        Ok(None)
    }

    /// Takes in the acks that have arrived, without waiting; notices a
    /// connection that closed and a receiver that said CLOSE.
    pub(crate) fn take_acks(&mut self) -> Result<Option<Blocked>, SendError> {
        loop {
            let Some(s) = self.stream.as_mut() else {
                self.half_written = None;
                return Ok(Some(Blocked::Disconnected));
            };
            match self.reader.read_with(s, &mut self.buf, true) {
                Got::Frame(KIND_ACK, _, expected) => self.acked(expected),
                Got::Frame(KIND_CLOSE, _, _) => return Err(self.gone()),
                Got::Frame(..) => {}
                Got::Pending => return Ok(None),
                Got::Closed => self.stream = None,
            }
        }
    }
}

/// Writes all of `bytes`; a write that times out (a direct link's do, see
/// [`GIVE_UP_CHECK`]) asks `give_up` and goes on. Giving up is
/// `ErrorKind::Interrupted`.
fn write_patiently(s: &mut TcpStream, mut bytes: &[u8], give_up: GiveUp) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match s.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if give_up() {
                    return Err(ErrorKind::Interrupted.into());
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl LinkTx for RemoteTx {
    fn send(
        &mut self,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        self.send_or_give_up(msg, mode, deadline, &mut || false)
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl Drop for RemoteTx {
    /// Tells the receiver, and waits (at most [`CLOSE_LINGER`]) until it
    /// has read everything, so the last messages are not lost. A link whose
    /// connections its daemon holds too (a direct link) does not wait: it
    /// says CLOSE if that fits in the socket now, and the daemon sees the
    /// rest out once the mailbox is gone.
    fn drop(&mut self) {
        let Some(s) = self.stream.as_mut() else {
            return;
        };
        let close = frame(KIND_CLOSE, 0, self.next_seq, &[]);
        if self.on_connection.is_none() {
            return close_gracefully(s, &close, CLOSE_LINGER);
        }
        // A CLOSE cut short (the socket is full) ends in the FIN: the
        // receiver then ends the link when the daemon says the sender is
        // gone, as for a killed sender.
        if s.set_nonblocking(true).is_ok() {
            let _ = s.write(&close);
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
}

/// The receiving half of a remote link: it listens, and takes the sender's
/// connection back whenever the sender reconnects.
pub struct RemoteRx {
    source: ConnectionSource,
    stream: Option<TcpStream>,
    reader: FrameReader,
    /// The next sequence number to read: what acknowledgements and HELLO
    /// answers carry. Frames are read only while the application receives,
    /// so a receiver that stops receiving stops acknowledging.
    expected: u64,
    /// Fragments of a message not complete yet; kept across reconnects,
    /// since the sender resumes right after the last one.
    partial: Vec<u8>,
    /// Bytes of frames read since the last acknowledgement, and how many
    /// to read before the next one (a quarter of the sender's window).
    unacked_bytes: usize,
    ack_every_bytes: usize,
    sender_gone: bool,
    buf: Vec<u8>,
    /// The connection's receive timeout as last set (a system call, so not
    /// made again for a wait that differs by less than
    /// [`READ_TIMEOUT_SLACK`]).
    read_timeout: Option<Duration>,
    /// Connections adopted so far: tells a new connection from an old one
    /// that had the same fd number.
    connections: u64,
}

/// How much longer than asked a receive may wait, so that a receiver called
/// with about the same timeout each time (a node link's loop) does not set
/// it anew for every message.
const READ_TIMEOUT_SLACK: Duration = Duration::from_millis(1);

/// Whether a connection whose receive timeout is `set` must change it to
/// wait `want` (`None`: forever).
fn needs_new_timeout(set: Option<Duration>, want: Option<Duration>) -> bool {
    match (set, want) {
        (None, None) => false,
        // Waiting at most a little longer than asked is fine; shorter is not.
        (Some(set), Some(want)) => set < want || set - want > READ_TIMEOUT_SLACK,
        _ => true,
    }
}

/// Where a receiver's sender connections come from.
enum ConnectionSource {
    /// Its own listener.
    Listener(TcpListener),
    /// Its owner, through [`RemoteRx::adopt_newer`], from a shared acceptor
    /// that has read each connection's HELLO (see [`accept_hello`]): a
    /// direct link's mailbox, to which its daemon hands each connection,
    /// or the daemon's loop of incoming node links.
    Owner,
}

impl RemoteRx {
    /// Listens on `addr` (port 0: any).
    pub fn bind(addr: SocketAddr) -> std::io::Result<RemoteRx> {
        Ok(Self::with_source(ConnectionSource::Listener(
            TcpListener::bind(addr)?,
        )))
    }

    /// The receiving end of a direct link, on its first connection `p`
    /// (answered now unless `answered` already, see
    /// [`PendingConnection::answer_fresh`]); later ones come through
    /// [`RemoteRx::adopt_newer`].
    pub fn adopted(p: PendingConnection, answered: bool) -> std::io::Result<RemoteRx> {
        let mut rx = Self::with_source(ConnectionSource::Owner);
        rx.adopt_answered(p, answered)?;
        Ok(rx)
    }

    /// Takes `p`, the sender's newer connection, in place of the current
    /// one (which the sender has given up: it sends everything not yet
    /// acknowledged again on `p`).
    pub fn adopt_newer(&mut self, p: PendingConnection, answered: bool) -> std::io::Result<()> {
        self.stream = None;
        self.adopt_answered(p, answered)
    }

    /// Drops the connection without telling the sender (whose node is gone).
    pub fn abandon(mut self) {
        self.stream = None;
    }

    fn with_source(source: ConnectionSource) -> RemoteRx {
        RemoteRx {
            connections: 0,
            source,
            stream: None,
            reader: FrameReader::default(),
            expected: 0,
            partial: Vec::new(),
            unacked_bytes: 0,
            ack_every_bytes: 1,
            sender_gone: false,
            buf: Vec::new(),
            read_timeout: None,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.source {
            ConnectionSource::Listener(l) => l.local_addr(),
            ConnectionSource::Owner => Err(std::io::Error::new(
                ErrorKind::Unsupported,
                "this receiver's connections are accepted by a shared listener",
            )),
        }
    }

    /// Waits for the sender's first connection (its HELLO), so that a
    /// sender can be connected while this receiver is not receiving yet —
    /// e.g. two sides that each connect their sender to the other.
    /// `Ok(false)` on timeout.
    pub fn accept_sender(&mut self, deadline: Option<Instant>) -> std::io::Result<bool> {
        self.accept(deadline)
    }

    /// Accepts the sender's (next) connection and answers its HELLO with
    /// the sequence number expected next. `Ok(false)` on timeout.
    fn accept(&mut self, deadline: Option<Instant>) -> std::io::Result<bool> {
        loop {
            let pending = match &self.source {
                ConnectionSource::Listener(l) => {
                    l.set_nonblocking(true)?;
                    accept_hello(l)?
                }
                // What the owner adopts comes between receives.
                ConnectionSource::Owner => return Ok(false),
            };
            match pending {
                // A plain link speaks TCP only.
                Some(p) if p.rdma_offer.is_some() => p.refuse(),
                Some(p) => {
                    self.adopt(p)?;
                    return Ok(true);
                }
                None => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(false);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// The fd of the sender's current connection, if there is one, and
    /// which connection that is (see `connections`).
    pub fn connection(&self) -> Option<(RawFd, u64)> {
        self.stream
            .as_ref()
            .map(|s| (s.as_raw_fd(), self.connections))
    }

    /// Whether the sender said it is gone (CLOSE) and everything it sent
    /// has been received.
    pub fn is_finished(&self) -> bool {
        self.sender_gone && self.stream.is_none()
    }

    /// Takes `p` as the sender's current connection: answers its HELLO with
    /// the sequence number expected next.
    fn adopt(&mut self, p: PendingConnection) -> std::io::Result<()> {
        self.adopt_answered(p, false)
    }

    /// [`RemoteRx::adopt`] of a connection whose HELLO was `answered`
    /// already (sequence number 0 expected).
    fn adopt_answered(&mut self, p: PendingConnection, answered: bool) -> std::io::Result<()> {
        let PendingConnection {
            stream: mut s,
            reader,
            hello,
            ..
        } = p;
        self.ack_every_bytes = (hello.window_bytes as usize / 4).max(1);
        self.unacked_bytes = 0;
        if !answered {
            s.write_all(&frame(KIND_HELLO, 0, self.expected, &[]))?;
        }
        s.set_read_timeout(None)?;
        self.read_timeout = None;
        self.stream = Some(s);
        self.reader = reader;
        self.connections += 1;
        Ok(())
    }
}

impl LinkRx for RemoteRx {
    fn recv(&mut self, out: &mut Vec<u8>, deadline: Option<Instant>) -> Result<bool, RecvError> {
        loop {
            if self.stream.is_none() {
                if self.sender_gone {
                    return Err(RecvError::PeerGone);
                }
                match self.accept(deadline) {
                    Ok(true) => {}
                    Ok(false) => return Ok(false),
                    Err(_) => return Err(RecvError::PeerGone),
                }
            }
            let s = self.stream.as_mut().expect("connected above");
            // A deadline that has passed asks only for what is there.
            let now = deadline.is_some_and(|d| Instant::now() >= d);
            if !now {
                let wait = deadline.map(|d| {
                    d.saturating_duration_since(Instant::now())
                        .max(Duration::from_micros(100))
                });
                if needs_new_timeout(self.read_timeout, wait) {
                    let _ = s.set_read_timeout(wait);
                    self.read_timeout = wait;
                }
            }
            match self.reader.read_with(s, &mut self.buf, now) {
                Got::Frame(KIND_DATA, flags, seq) => {
                    if seq < self.expected {
                        continue; // already delivered: a resend after a reconnect
                    }
                    self.expected = seq + 1;
                    self.unacked_bytes += HEADER_BYTES + self.buf.len();
                    if self.unacked_bytes >= self.ack_every_bytes {
                        self.unacked_bytes = 0;
                        if s.write_all(&frame(KIND_ACK, 0, self.expected, &[]))
                            .is_err()
                        {
                            self.stream = None;
                        }
                    }
                    if flags & FLAG_MORE != 0 {
                        if self.partial.is_empty() {
                            // The first fragment: taken as it is, not copied.
                            std::mem::swap(&mut self.partial, &mut self.buf);
                        } else {
                            self.partial.extend_from_slice(&self.buf);
                        }
                        continue;
                    }
                    if self.partial.is_empty() {
                        std::mem::swap(out, &mut self.buf);
                    } else {
                        self.partial.extend_from_slice(&self.buf);
                        out.clear();
                        std::mem::swap(out, &mut self.partial);
                    }
                    return Ok(true);
                }
                Got::Frame(KIND_CLOSE, _, _) => {
                    self.sender_gone = true;
                    self.stream = None;
                }
                Got::Frame(..) => {}
                Got::Pending => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(false);
                    }
                }
                Got::Closed => self.stream = None,
            }
        }
    }
}

impl Drop for RemoteRx {
    /// Tells the sender (which then fails with `PeerGone`), briefly letting
    /// it read that before the connection goes.
    fn drop(&mut self) {
        if let Some(s) = self.stream.as_mut() {
            close_gracefully(
                s,
                &frame(KIND_CLOSE, 0, self.expected, &[]),
                Duration::from_millis(200),
            );
        }
    }
}

/// Links over TCP on loopback, for the conformance suite.
#[derive(Default)]
pub struct TcpTransport;

impl Transport for TcpTransport {
    const NAME: &'static str = "fabric-remote";
    type Tx = RemoteTx;
    type Rx = RemoteRx;

    /// A link whose window holds `ring_capacity_bytes`.
    fn link(&self, ring_capacity_bytes: usize) -> std::io::Result<(RemoteTx, RemoteRx)> {
        let rx = RemoteRx::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = rx.local_addr()?;
        // The receiver answers the sender's HELLO when it first receives; a
        // helper thread accepts on its behalf until the sender is connected.
        let rx_cell = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
        let acceptor = {
            let cell = rx_cell.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut g = cell.lock().unwrap_or_else(|p| p.into_inner());
                let rx = g.as_mut().expect("present");
                rx.accept(Some(Instant::now() + RECONNECT_TIMEOUT))
                    .map(|_| ())
            })
        };
        let tx = RemoteTx::connect(addr, ring_capacity_bytes)?;
        acceptor
            .join()
            .map_err(|_| std::io::Error::other("acceptor panicked"))??;
        let rx = rx_cell
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("present");
        Ok((tx, rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `try_send` never waits: with nobody reading it stops (the window
    /// full, or the socket) and says so, and loses nothing; once the
    /// receiver reads, it goes on where it stopped, a message of many
    /// fragments included, and everything arrives once, in order.
    #[test]
    fn try_send_stops_instead_of_waiting_and_goes_on_where_it_stopped() {
        assert!(try_send_until_all_arrive(false).contains(&Blocked::Readable));
        // A small send buffer: the socket fills before the window, and
        // frames are left half written. (Not a small receive buffer: below
        // one loopback MSS, 64 KiB, the receiver would hold back its window
        // updates and the sender would wait for the persist timer.)
        assert!(try_send_until_all_arrive(true).contains(&Blocked::Writable));
    }

    /// Sends 81 messages with `try_send` (40 of 16 KiB, one of 1 MiB in 16
    /// fragments, 40 more), reading only whenever it stops; what it
    /// stopped for, each time.
    fn try_send_until_all_arrive(small_send_buffer: bool) -> Vec<Blocked> {
        use crate::transport::Transport as _;
        const WINDOW: usize = 256 << 10;
        const COUNT: u32 = 81;
        let (mut tx, mut rx) = TcpTransport.link(WINDOW).unwrap();
        if small_send_buffer {
            use nix::sys::socket::{setsockopt, sockopt};
            setsockopt(tx.stream.as_ref().unwrap(), sockopt::SndBuf, &4096).unwrap();
        }
        let msg = |i: u32| -> Vec<u8> {
            let len = if i == 40 { 1 << 20 } else { 16 << 10 };
            let mut m = vec![(i % 251) as u8; len];
            m[..4].copy_from_slice(&i.to_le_bytes());
            m
        };
        let (mut next, mut done) = (0u32, 0usize);
        let mut blocked = Vec::new();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < COUNT as usize {
            assert!(
                Instant::now() < deadline,
                "stuck at {} received, after {:?}",
                got.len(),
                blocked.last()
            );
            // Send until it stops, nobody reading (what is left half
            // written goes on with a flush)...
            let t = Instant::now();
            if let Some(b) = tx.flush().unwrap() {
                blocked.push(b);
            }
            while next < COUNT && tx.flush().unwrap().is_none() {
                match tx.try_send(&msg(next), &mut done).unwrap() {
                    None => (next, done) = (next + 1, 0),
                    Some(b) => {
                        assert_ne!(b, Blocked::Disconnected);
                        blocked.push(b);
                        break;
                    }
                }
            }
            assert!(t.elapsed() < Duration::from_secs(1), "try_send waited");
            // ...then read what there is.
            let mut buf = Vec::new();
            while rx
                .recv(&mut buf, Some(Instant::now() + Duration::from_millis(5)))
                .unwrap()
            {
                let i = u32::from_le_bytes(buf[..4].try_into().unwrap());
                assert!(buf == msg(i), "message {i} whole");
                got.push(i);
            }
        }
        assert_eq!(got, (0..COUNT).collect::<Vec<u32>>(), "once each, in order");
        assert!(tx.flush().unwrap().is_none() && !tx.is_half_written());
        blocked
    }

    #[test]
    fn frames_come_out_whole_however_the_bytes_arrive() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let frames = [
            frame(KIND_DATA, 0, 1, b"small"),
            frame(KIND_DATA, FLAG_MORE, 2, &big),
            frame(KIND_ACK, 0, 3, &[]),
            frame(KIND_DATA, 0, 4, &big[..70_000]),
        ];
        let bytes: Vec<u8> = frames.concat();
        let writer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            // The first frame a byte at a time, then uneven pieces.
            let (head, rest) = bytes.split_at(19);
            for b in head {
                s.write_all(std::slice::from_ref(b)).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
            for piece in rest.chunks(7_777) {
                s.write_all(piece).unwrap();
            }
        });
        let (mut s, _) = listener.accept().unwrap();
        let mut reader = FrameReader::default();
        let mut payload = Vec::new();
        let mut got = Vec::new();
        while got.len() < 4 {
            match reader.read(&mut s, &mut payload) {
                Got::Frame(kind, flags, seq) => got.push((kind, flags, seq, payload.clone())),
                Got::Pending => {}
                Got::Closed => panic!("closed after {} frames", got.len()),
            }
        }
        writer.join().unwrap();
        assert_eq!(got[0], (KIND_DATA, 0, 1, b"small".to_vec()));
        assert_eq!(got[1], (KIND_DATA, FLAG_MORE, 2, big.clone()));
        assert_eq!(got[2], (KIND_ACK, 0, 3, Vec::new()));
        assert_eq!(got[3], (KIND_DATA, 0, 4, big[..70_000].to_vec()));
        assert!(matches!(reader.read(&mut s, &mut payload), Got::Closed));
    }

    #[test]
    fn a_receive_timeout_is_set_again_only_when_it_would_wait_too_long() {
        let ms = Duration::from_millis;
        assert!(!needs_new_timeout(None, None));
        assert!(needs_new_timeout(None, Some(ms(100))));
        assert!(needs_new_timeout(Some(ms(100)), None));
        // About the same wait as last time: kept.
        assert!(!needs_new_timeout(
            Some(ms(100)),
            Some(ms(100) - Duration::from_micros(30))
        ));
        // Longer than set: it would time out early.
        assert!(needs_new_timeout(Some(ms(100)), Some(ms(101))));
        // Much shorter: it would overshoot the deadline.
        assert!(needs_new_timeout(Some(ms(100)), Some(ms(50))));
    }
}
