//! fabricd's control connections, all served by one io_uring loop.
//!
//! One thread holds every client connection: a multishot accept on the
//! listening socket, one receive in flight per connection, and at most one
//! send in flight per connection (so a client gets its packets in the order
//! they were queued; `SOCK_SEQPACKET` keeps them whole). Nothing blocks the
//! loop but the ring's own wait, and a thousand clients cost no threads.
//!
//! Other threads of the daemon (gateways, membership, the eBPF hub) queue
//! packets for a client through its [`Outbox`]. A bounded queue per client
//! keeps a client that stops reading from holding memory without limit (it
//! is disconnected when its queue is full); an outbox that turns non-empty
//! puts its connection on a ready list and, if the list was empty, writes
//! the loop's eventfd, on which the loop keeps a read posted.
//!
//! Requests are handled on the loop itself, by a [`Handler`]: fabricd's
//! handlers take the state lock and create rings, and never wait on the
//! network or on a client.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::ctlsock::{MAX_FDS_PER_PACKET, MAX_PACKET_BYTES};
use crate::ring::Doorbell;
use crate::uring::Waker;

/// Submission queue entries of the loop's ring (completions queue up to
/// twice that; the kernel keeps overflow rather than dropping it).
const RING_ENTRIES: u32 = 256;

/// One packet for a client.
pub(crate) struct Outgoing {
    pub(crate) bytes: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
    /// Rung after the packet is in the socket, so a receiver woken by it
    /// finds the packet there.
    pub(crate) notice: Option<Arc<Doorbell>>,
}

/// Why an [`Outbox`] did not take a packet.
pub(crate) enum Refused {
    /// The client left `capacity` packets unread.
    Full,
    /// The connection is closed.
    Closed,
}

/// The queue of packets for one client; cheap to clone, usable from any
/// thread.
#[derive(Clone)]
pub(crate) struct Outbox(Arc<OutboxShared>);

struct OutboxShared {
    conn: u64,
    capacity: usize,
    queue: Mutex<OutboxQueue>,
    waker: Arc<Waker<u64>>,
}

#[derive(Default)]
struct OutboxQueue {
    packets: VecDeque<Outgoing>,
    closed: bool,
}

impl Outbox {
    /// Queues `out` for the client.
    pub(crate) fn push(&self, out: Outgoing) -> Result<(), Refused> {
        let mut q = lock(&self.0.queue);
        if q.closed {
            return Err(Refused::Closed);
        }
        if q.packets.len() >= self.0.capacity {
            return Err(Refused::Full);
        }
        q.packets.push_back(out);
        let first = q.packets.len() == 1;
        drop(q);
        if first {
            self.0.waker.ready(self.0.conn);
        }
        Ok(())
    }

    fn pop(&self) -> Option<Outgoing> {
        lock(&self.0.queue).packets.pop_front()
    }

    fn close(&self) {
        let mut q = lock(&self.0.queue);
        q.closed = true;
        q.packets.clear();
    }
}

/// What the loop serves: requests of one connection, and its end.
pub(crate) trait Handler {
    /// Per-connection state (fabricd: the mailbox it opened, if any).
    type Conn: Default;
    /// Handles one request packet, with the fds it carried; answers go
    /// through `outbox`.
    fn packet(
        &self,
        conn: &mut Self::Conn,
        sock: &Arc<OwnedFd>,
        outbox: &Outbox,
        bytes: &[u8],
        fds: Vec<OwnedFd>,
    );
    /// The connection closed (the client went, or it was cut off).
    fn closed(&self, conn: Self::Conn);
}

/// Tells a running [`serve`] loop to stop.
#[derive(Clone)]
pub(crate) struct StopHandle {
    stopping: Arc<AtomicBool>,
    waker: Arc<Waker<u64>>,
}

impl StopHandle {
    /// The loop closes every connection (each is reported `closed`) and
    /// returns.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.waker.kick();
    }
}

/// The loop, ready to run on a thread of its own.
pub(crate) struct Server {
    ring: IoUring,
    /// Where the eventfd's read lands; dropped after the ring (field
    /// order), so a read still in flight never writes freed memory.
    wake_buf: Box<[u8; 8]>,
    listener: Arc<OwnedFd>,
    waker: Arc<Waker<u64>>,
    stopping: Arc<AtomicBool>,
    outbox_capacity: usize,
}

impl Server {
    /// A loop for `listener` whose outboxes hold `outbox_capacity` packets.
    pub(crate) fn new(listener: Arc<OwnedFd>, outbox_capacity: usize) -> io::Result<Server> {
        Ok(Server {
            ring: IoUring::new(RING_ENTRIES)?,
            wake_buf: Box::new([0; 8]),
            listener,
            waker: Arc::new(Waker::new()?),
            stopping: Arc::new(AtomicBool::new(false)),
            outbox_capacity,
        })
    }

    pub(crate) fn stop_handle(&self) -> StopHandle {
        StopHandle {
            stopping: self.stopping.clone(),
            waker: self.waker.clone(),
        }
    }

    /// Serves until stopped, then reports every connection closed.
    pub(crate) fn run<H: Handler>(mut self, handler: &H) -> io::Result<()> {
        let mut lp = Loop {
            conns: HashMap::new(),
            next_conn: 1,
            accepting: false,
        };
        lp.arm_accept(&mut self.ring, &self.listener);
        arm_wake(&mut self.ring, &self.waker, &mut self.wake_buf);
        let mut stopped = false;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            let done: Vec<(u64, i32, u32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags()))
                .collect();
            for (data, result, flags) in done {
                let (kind, conn) = (data & KIND_MASK, data >> KIND_BITS);
                match kind {
                    ACCEPT => lp.accepted(&mut self, result, flags),
                    WAKE => {
                        if !stopped {
                            arm_wake(&mut self.ring, &self.waker, &mut self.wake_buf);
                        }
                    }
                    CANCEL => {}
                    RECV => lp.received(&mut self.ring, handler, conn, result),
                    SEND => lp.sent(&mut self.ring, handler, conn, result),
                    _ => unreachable!("unknown completion {data:#x}"),
                }
            }
            if !stopped && self.stopping.load(Ordering::SeqCst) {
                stopped = true;
                // Ends the accept and every receive; their completions
                // close the connections.
                shutdown(self.listener.as_raw_fd());
                if lp.accepting {
                    let cancel = opcode::AsyncCancel::new(tag(ACCEPT, 0))
                        .build()
                        .user_data(tag(CANCEL, 0));
                    push(&mut self.ring, &cancel);
                }
                for c in lp.conns.values() {
                    shutdown(c.sock.as_raw_fd());
                }
            }
            for conn in self.waker.take() {
                lp.start_send(&mut self.ring, conn);
            }
            if stopped && lp.conns.is_empty() && !lp.accepting {
                return Ok(());
            }
        }
    }
}

const KIND_BITS: u32 = 3;
const KIND_MASK: u64 = (1 << KIND_BITS) - 1;
const ACCEPT: u64 = 0;
const WAKE: u64 = 1;
const RECV: u64 = 2;
const SEND: u64 = 3;
const CANCEL: u64 = 4;

fn tag(kind: u64, conn: u64) -> u64 {
    (conn << KIND_BITS) | kind
}

fn shutdown(fd: RawFd) {
    // SAFETY: shutdown on an fd we own; errors (already closed) are moot.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// A send in flight: everything the kernel reads until it completes, at
/// addresses that do not move.
struct Sending {
    packet: Outgoing,
    iov: libc::iovec,
    msg: libc::msghdr,
    control: Vec<u64>,
}

/// The receive of a connection: what the kernel writes into until it
/// completes, at addresses that do not move.
struct Receiving {
    buf: Box<[u8]>,
    iov: libc::iovec,
    msg: libc::msghdr,
    /// Room for one SCM_RIGHTS header with [`MAX_FDS_PER_PACKET`] fds.
    control: [u64; RECV_CONTROL_WORDS],
}

/// 8-byte words of a receive's control buffer: CMSG_SPACE of the most fds
/// a packet may carry (a 16-byte header, then 4 bytes per fd).
const RECV_CONTROL_WORDS: usize = (16 + 4 * MAX_FDS_PER_PACKET).div_ceil(8);

impl Receiving {
    fn new() -> Box<Receiving> {
        let mut r = Box::new(Receiving {
            buf: vec![0; MAX_PACKET_BYTES].into_boxed_slice(),
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            // SAFETY: an all-zero msghdr is a valid empty one.
            msg: unsafe { std::mem::zeroed() },
            control: [0; RECV_CONTROL_WORDS],
        });
        r.iov = libc::iovec {
            iov_base: r.buf.as_mut_ptr().cast(),
            iov_len: r.buf.len(),
        };
        r.msg.msg_iov = &mut r.iov;
        r.msg.msg_iovlen = 1;
        r
    }

    /// Readies the header for the next receive (the kernel shrank the
    /// control length to what it wrote).
    fn rearm(&mut self) -> *mut libc::msghdr {
        self.msg.msg_control = self.control.as_mut_ptr().cast();
        self.msg.msg_controllen = std::mem::size_of_val(&self.control);
        self.msg.msg_flags = 0;
        &mut self.msg
    }

    /// The fds the last packet carried, now owned here.
    fn take_fds(&mut self) -> Vec<OwnedFd> {
        let mut fds = Vec::new();
        // SAFETY: the kernel filled `control` up to `msg_controllen` with
        // well-formed headers, which CMSG_FIRSTHDR/CMSG_NXTHDR walk within
        // those bounds; SCM_RIGHTS data is an array of fds it installed for
        // us (MSG_CMSG_CLOEXEC), owned by nobody else.
        unsafe {
            let mut h = libc::CMSG_FIRSTHDR(&self.msg);
            while !h.is_null() {
                if (*h).cmsg_level == libc::SOL_SOCKET && (*h).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(h).cast::<RawFd>();
                    let n =
                        ((*h).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                    for k in 0..n {
                        fds.push(OwnedFd::from_raw_fd(data.add(k).read_unaligned()));
                    }
                }
                h = libc::CMSG_NXTHDR(&self.msg, h);
            }
        }
        self.msg.msg_controllen = 0;
        fds
    }
}

struct Conn<C> {
    sock: Arc<OwnedFd>,
    outbox: Outbox,
    state: Option<C>,
    recv: Box<Receiving>,
    receiving: bool,
    sending: Option<Box<Sending>>,
    /// The peer is gone (or the loop stops): no new operations, and the
    /// connection goes once its last one completes.
    closing: bool,
}

struct Loop<C> {
    conns: HashMap<u64, Conn<C>>,
    next_conn: u64,
    accepting: bool,
}

fn arm_wake(ring: &mut IoUring, waker: &Waker<u64>, buf: &mut [u8; 8]) {
    push(ring, &waker.read_entry(buf, tag(WAKE, 0)));
}

/// Queues `sqe`, submitting what is queued when the queue is full.
fn push(ring: &mut IoUring, sqe: &squeue::Entry) {
    // SAFETY: every buffer an entry points at lives in the loop's
    // connections (boxed, not moved) or the server itself (the wake buffer,
    // dropped after the ring) until the entry's completion is taken.
    unsafe { crate::uring::push_entry(ring, sqe) }
}

impl<C: Default> Loop<C> {
    fn arm_accept(&mut self, ring: &mut IoUring, listener: &OwnedFd) {
        let sqe = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(tag(ACCEPT, 0));
        push(ring, &sqe);
        self.accepting = true;
    }

    fn accepted(&mut self, server: &mut Server, result: i32, flags: u32) {
        let stopping = server.stopping.load(Ordering::SeqCst);
        if result >= 0 {
            // SAFETY: the kernel installed this fd for us.
            let sock = Arc::new(unsafe { OwnedFd::from_raw_fd(result) });
            if stopping {
                return; // dropped: closed
            }
            let id = self.next_conn;
            self.next_conn += 1;
            let outbox = Outbox(Arc::new(OutboxShared {
                conn: id,
                capacity: server.outbox_capacity,
                queue: Mutex::new(OutboxQueue::default()),
                waker: server.waker.clone(),
            }));
            self.conns.insert(
                id,
                Conn {
                    sock,
                    outbox,
                    state: Some(C::default()),
                    recv: Receiving::new(),
                    receiving: false,
                    sending: None,
                    closing: false,
                },
            );
            self.arm_recv(&mut server.ring, id);
        } else if !stopping && result != -libc::ECONNABORTED && result != -libc::EINTR {
            eprintln!(
                "fabricd: accept failed: {}",
                io::Error::from_raw_os_error(-result)
            );
        }
        if !cqueue::more(flags) {
            self.accepting = false;
            if !stopping {
                if result < 0 && result != -libc::ECONNABORTED && result != -libc::EINTR {
                    // Not a spin on a persistent error (EMFILE, …).
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                let listener = server.listener.clone();
                self.arm_accept(&mut server.ring, &listener);
            }
        }
    }

    fn arm_recv(&mut self, ring: &mut IoUring, id: u64) {
        let c = self.conns.get_mut(&id).expect("a live connection");
        // MSG_TRUNC: the result is the packet's real length, so an
        // oversized packet is seen rather than silently cut.
        let sqe = opcode::RecvMsg::new(types::Fd(c.sock.as_raw_fd()), c.recv.rearm())
            .flags((libc::MSG_TRUNC | libc::MSG_CMSG_CLOEXEC) as u32)
            .build()
            .user_data(tag(RECV, id));
        c.receiving = true;
        push(ring, &sqe);
    }

    fn received<H: Handler<Conn = C>>(
        &mut self,
        ring: &mut IoUring,
        handler: &H,
        id: u64,
        result: i32,
    ) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.receiving = false;
        let len = result as usize;
        // Fds that came along are owned (and closed) whatever happens next.
        let fds = if result >= 0 {
            c.recv.take_fds()
        } else {
            Vec::new()
        };
        if c.closing || result <= 0 || len > c.recv.buf.len() {
            if result > 0 && len > c.recv.buf.len() {
                eprintln!("fabricd: a client sent a control packet larger than {MAX_PACKET_BYTES} bytes; disconnecting it");
            }
            return self.close(handler, id);
        }
        let mut state = c.state.take().expect("state is put back after each packet");
        handler.packet(&mut state, &c.sock, &c.outbox, &c.recv.buf[..len], fds);
        let c = self.conns.get_mut(&id).expect("still here");
        c.state = Some(state);
        self.arm_recv(ring, id);
        self.start_send(ring, id);
    }

    /// Starts sending the connection's next packet unless one is in flight.
    fn start_send(&mut self, ring: &mut IoUring, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.sending.is_some() || c.closing {
            return;
        }
        let Some(packet) = c.outbox.pop() else {
            return;
        };
        let fds: Vec<RawFd> = packet.fds.iter().map(|f| f.as_raw_fd()).collect();
        debug_assert!(fds.len() <= MAX_FDS_PER_PACKET);
        let mut s = Box::new(Sending {
            iov: libc::iovec {
                iov_base: packet.bytes.as_ptr() as *mut _,
                iov_len: packet.bytes.len(),
            },
            packet,
            // SAFETY: an all-zero msghdr is a valid empty one.
            msg: unsafe { std::mem::zeroed() },
            control: Vec::new(),
        });
        s.msg.msg_iov = &mut s.iov;
        s.msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let data_bytes = std::mem::size_of_val(fds.as_slice()) as u32;
            // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
            let (space, len) =
                unsafe { (libc::CMSG_SPACE(data_bytes), libc::CMSG_LEN(data_bytes)) };
            s.control = vec![0u64; (space as usize).div_ceil(8)];
            s.msg.msg_control = s.control.as_mut_ptr().cast();
            s.msg.msg_controllen = space as usize;
            // SAFETY: the control buffer is aligned (u64) and large enough
            // for one header with `fds` (CMSG_SPACE), so CMSG_FIRSTHDR is
            // non-null and CMSG_DATA has room for the fds.
            unsafe {
                let h = libc::CMSG_FIRSTHDR(&s.msg);
                (*h).cmsg_level = libc::SOL_SOCKET;
                (*h).cmsg_type = libc::SCM_RIGHTS;
                (*h).cmsg_len = len as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(h).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        let sqe = opcode::SendMsg::new(types::Fd(c.sock.as_raw_fd()), &s.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(tag(SEND, id));
        c.sending = Some(s);
        push(ring, &sqe);
    }

    fn sent<H: Handler<Conn = C>>(
        &mut self,
        ring: &mut IoUring,
        handler: &H,
        id: u64,
        result: i32,
    ) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let s = c.sending.take().expect("a send was in flight");
        if result < 0 || result as usize != s.packet.bytes.len() {
            // The client is gone (or broken): its receive ends too.
            c.closing = true;
            shutdown(c.sock.as_raw_fd());
            drop(s);
            return self.close(handler, id);
        }
        if let Some(bell) = &s.packet.notice {
            bell.notice();
        }
        drop(s);
        self.start_send(ring, id);
    }

    /// Marks the connection closing; it goes (reported to the handler) once
    /// no operation of it is in flight.
    fn close<H: Handler<Conn = C>>(&mut self, handler: &H, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if !c.closing {
            c.closing = true;
            c.outbox.close();
            shutdown(c.sock.as_raw_fd());
        }
        if c.receiving || c.sending.is_some() {
            return;
        }
        let c = self.conns.remove(&id).expect("present");
        if let Some(state) = c.state {
            handler.closed(state);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctlsock::{self, Packet};
    use std::os::fd::AsFd;

    /// Echoes each packet back twice, the second time saying how many fds
    /// came with it and with an fd (a pipe's read end) attached; counts
    /// closes.
    #[derive(Default)]
    struct Echo {
        closed: std::sync::atomic::AtomicUsize,
        outboxes: Mutex<Vec<Outbox>>,
    }

    impl Handler for Echo {
        type Conn = u32;
        fn packet(
            &self,
            n: &mut u32,
            _sock: &Arc<OwnedFd>,
            outbox: &Outbox,
            bytes: &[u8],
            fds: Vec<OwnedFd>,
        ) {
            *n += 1;
            lock(&self.outboxes).push(outbox.clone());
            let plain = Outgoing {
                bytes: bytes.to_vec(),
                fds: Vec::new(),
                notice: None,
            };
            let (r, _w) = nix::unistd::pipe().unwrap();
            let with_fd = Outgoing {
                bytes: format!("{n} with {}", fds.len()).into_bytes(),
                fds: vec![r],
                notice: None,
            };
            assert!(outbox.push(plain).is_ok() && outbox.push(with_fd).is_ok());
        }
        fn closed(&self, _n: u32) {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn recv(sock: &OwnedFd) -> (Vec<u8>, usize) {
        let mut buf = Vec::new();
        match ctlsock::recv(sock.as_fd(), &mut buf, false).unwrap() {
            Packet::Data { len, fds } => (buf[..len].to_vec(), fds.len()),
            _ => panic!("no packet"),
        }
    }

    #[test]
    fn serves_in_order_passes_fds_wakes_for_other_threads_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = Arc::new(ctlsock::listen(&path).unwrap());
        let server = Server::new(listener, 3).unwrap();
        let stop = server.stop_handle();
        let echo = Arc::new(Echo::default());
        let t = {
            let echo = echo.clone();
            std::thread::spawn(move || server.run(&*echo))
        };
        let a = ctlsock::connect(&path).unwrap();
        let b = ctlsock::connect(&path).unwrap();
        let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
        for i in 1..=3u32 {
            for (s, name) in [(&a, "a"), (&b, "b")] {
                let msg = format!("{name}{i}");
                // The second round carries fds to the server.
                let fds = if i == 2 {
                    vec![pipe_r.as_fd(), pipe_w.as_fd()]
                } else {
                    Vec::new()
                };
                ctlsock::send(s.as_fd(), msg.as_bytes(), &fds).unwrap();
                assert_eq!(recv(s), (msg.into_bytes(), 0));
                assert_eq!(
                    recv(s),
                    (format!("{i} with {}", fds.len()).into_bytes(), 1),
                    "the fds came along both ways"
                );
            }
        }
        // Another thread's packet reaches the client through the eventfd.
        let outbox = lock(&echo.outboxes)[0].clone();
        std::thread::spawn(move || {
            assert!(outbox
                .push(Outgoing {
                    bytes: b"from elsewhere".to_vec(),
                    fds: Vec::new(),
                    notice: None,
                })
                .is_ok());
        })
        .join()
        .unwrap();
        assert_eq!(recv(&a), (b"from elsewhere".to_vec(), 0));
        // A client that does not read is refused beyond the bound.
        let outbox = lock(&echo.outboxes)[1].clone();
        let pushes = (0..10)
            .map(|_| {
                outbox.push(Outgoing {
                    bytes: vec![0; 200_000.min(MAX_PACKET_BYTES)],
                    fds: Vec::new(),
                    notice: None,
                })
            })
            .filter(|r| matches!(r, Err(Refused::Full)))
            .count();
        assert!(pushes > 0, "the outbox of 3 never filled");
        drop(a);
        let t0 = std::time::Instant::now();
        while echo.closed.load(Ordering::SeqCst) < 1 {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(5),
                "close not seen"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        stop.stop();
        t.join().unwrap().unwrap();
        assert_eq!(echo.closed.load(Ordering::SeqCst), 2, "stopping closes b");
        // b sees its connection end.
        let mut buf = Vec::new();
        let mut ended = false;
        for _ in 0..100 {
            match ctlsock::recv(b.as_fd(), &mut buf, false) {
                Ok(Packet::Closed) | Err(_) => {
                    ended = true;
                    break;
                }
                _ => {}
            }
        }
        assert!(ended);
    }
}
