//! `io_uring-uds`: the `uds` exchange (fixed-size messages on a Unix stream
//! socket) driven through io_uring instead of one `write` and one `read`
//! per message.
//!
//! - Sending: messages are copied into a registered buffer (two halves of
//!   up to [`BATCH_BYTES`] each) and each half goes out as one fixed-buffer
//!   write once it is full, while the next half fills; only one write is in
//!   flight, so the stream keeps its order, and a short write is resumed.
//!   A half is also written out as soon as its sender waits for something
//!   (a receive), so ping-pong latency is not held up by batching.
//! - Receiving: one multishot receive stays armed on the socket with a
//!   group of provided buffers; each completion carries whatever the socket
//!   held, often many messages, which `recv` then hands out one at a time.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context, Result};
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::endpoint::{Endpoint, PEER_TIMEOUT};

/// Bytes of messages queued before they are submitted in one go.
pub const BATCH_BYTES: usize = 64 << 10;
/// Provided receive buffers and their size.
const RECV_BUFFERS: u16 = 16;
const RECV_BUFFER_BYTES: usize = 64 << 10;
const GROUP: u16 = 7;

const TAG_SEND: u64 = 1;
const TAG_RECV: u64 = 2;
const TAG_PROVIDE: u64 = 3;

pub struct UringEnd {
    ring: IoUring,
    stream: UnixStream,
    size: usize,
    /// The registered send buffer: two halves of `half_bytes`.
    slots: Vec<u8>,
    half_bytes: usize,
    /// Messages per half before it is written out.
    batch: usize,
    /// The half being filled, its bytes and messages so far.
    filling: usize,
    staged_bytes: usize,
    staged: usize,
    /// The write in flight: (offset in `slots`, bytes done, bytes total).
    in_flight: Option<(usize, usize, usize)>,
    recv_buffers: Vec<u8>,
    recv_armed: bool,
    /// Bytes received; those before `taken` were handed out already.
    stage: Vec<u8>,
    taken: usize,
    peer_closed: bool,
}

impl UringEnd {
    pub fn new(stream: UnixStream, size: usize) -> Result<UringEnd> {
        let size1 = size.max(1);
        let batch = (BATCH_BYTES / size1).clamp(1, 1024);
        let half_bytes = batch * size1;
        let ring = IoUring::new(256).context("io_uring setup")?;
        let mut end = UringEnd {
            ring,
            stream,
            size,
            slots: vec![0; 2 * half_bytes],
            half_bytes,
            batch,
            filling: 0,
            staged_bytes: 0,
            staged: 0,
            in_flight: None,
            recv_buffers: vec![0; RECV_BUFFERS as usize * RECV_BUFFER_BYTES],
            recv_armed: false,
            stage: Vec::new(),
            taken: 0,
            peer_closed: false,
        };
        let iov = libc::iovec {
            iov_base: end.slots.as_mut_ptr().cast(),
            iov_len: end.slots.len(),
        };
        // SAFETY: `slots` is never reallocated and outlives the ring's use
        // of it: `Drop` waits for the last write before the memory goes.
        unsafe { end.ring.submitter().register_buffers(&[iov]) }
            .context("io_uring: registering the send buffer")?;
        let provide = opcode::ProvideBuffers::new(
            end.recv_buffers.as_mut_ptr(),
            RECV_BUFFER_BYTES as i32,
            RECV_BUFFERS,
            GROUP,
            0,
        )
        .build()
        .user_data(TAG_PROVIDE);
        end.push(&provide)?;
        end.arm_recv()?;
        end.ring.submit()?;
        Ok(end)
    }

    /// Queues the fixed-buffer write of `slots[off + done .. off + total]`.
    fn write(&mut self, off: usize, done: usize, total: usize) -> Result<()> {
        let e = opcode::WriteFixed::new(
            types::Fd(self.stream.as_raw_fd()),
            self.slots[off + done..].as_ptr(),
            (total - done) as u32,
            0,
        )
        .offset(u64::MAX)
        .build()
        .user_data(TAG_SEND);
        self.push(&e)?;
        self.in_flight = Some((off, done, total));
        Ok(())
    }

    fn push(&mut self, e: &squeue::Entry) -> Result<()> {
        // SAFETY: every buffer an entry points to (message slots, receive
        // buffers) lives in `self` and is not reused or freed before the
        // entry's completion has been reaped (see `send` and `Drop`).
        unsafe {
            if self.ring.submission().push(e).is_err() {
                self.ring.submit()?;
                self.ring
                    .submission()
                    .push(e)
                    .map_err(|_| anyhow::anyhow!("io_uring submission queue full"))?;
            }
        }
        Ok(())
    }

    fn arm_recv(&mut self) -> Result<()> {
        let e = opcode::RecvMulti::new(types::Fd(self.stream.as_raw_fd()), GROUP)
            .build()
            .user_data(TAG_RECV);
        self.push(&e)?;
        self.recv_armed = true;
        Ok(())
    }

    /// Writes out the half being filled (after the write in flight, so
    /// the stream keeps its order) and submits whatever is queued.
    fn flush(&mut self) -> Result<()> {
        if self.staged_bytes > 0 {
            while self.in_flight.is_some() {
                self.reap(true)?;
            }
            let off = self.filling * self.half_bytes;
            self.write(off, 0, self.staged_bytes)?;
            self.filling ^= 1;
            self.staged_bytes = 0;
            self.staged = 0;
        }
        if !self.ring.submission().is_empty() {
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Reaps completions, waiting for at least one if `wait`.
    fn reap(&mut self, wait: bool) -> Result<()> {
        if wait {
            self.ring.submit_and_wait(1)?;
        }
        let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
        for c in cqes {
            match c.user_data() {
                TAG_SEND => {
                    if c.result() < 0 {
                        bail!(
                            "io_uring write: {}",
                            std::io::Error::from_raw_os_error(-c.result())
                        );
                    }
                    let (off, done, total) =
                        self.in_flight.take().context("a write nobody made")?;
                    let done = done + c.result() as usize;
                    if done < total {
                        self.write(off, done, total)?; // a short write: the rest
                    }
                }
                TAG_RECV => {
                    if !cqueue::more(c.flags()) {
                        self.recv_armed = false;
                    }
                    let res = c.result();
                    if res == -libc::ENOBUFS {
                        continue; // re-armed below once buffers return
                    }
                    if res < 0 {
                        bail!(
                            "io_uring receive: {}",
                            std::io::Error::from_raw_os_error(-res)
                        );
                    }
                    if res == 0 {
                        // What came before the end is still handed out.
                        self.peer_closed = true;
                        continue;
                    }
                    let bid = cqueue::buffer_select(c.flags())
                        .context("a multishot receive without a buffer")?;
                    let start = bid as usize * RECV_BUFFER_BYTES;
                    if self.taken > 0 && self.taken == self.stage.len() {
                        self.stage.clear();
                        self.taken = 0;
                    } else if self.taken > (1 << 20) {
                        self.stage.drain(..self.taken);
                        self.taken = 0;
                    }
                    self.stage
                        .extend_from_slice(&self.recv_buffers[start..start + res as usize]);
                    // Give the buffer back to the group.
                    let ptr = self.recv_buffers[start..].as_mut_ptr();
                    let e =
                        opcode::ProvideBuffers::new(ptr, RECV_BUFFER_BYTES as i32, 1, GROUP, bid)
                            .build()
                            .user_data(TAG_PROVIDE);
                    self.push(&e)?;
                }
                TAG_PROVIDE => {
                    if c.result() < 0 {
                        bail!(
                            "io_uring provide buffers: {}",
                            std::io::Error::from_raw_os_error(-c.result())
                        );
                    }
                }
                other => bail!("io_uring: unexpected completion {other}"),
            }
        }
        if !self.recv_armed && !self.peer_closed {
            self.arm_recv()?;
        }
        Ok(())
    }
}

impl Endpoint for UringEnd {
    fn send(&mut self, msg: &[u8]) -> Result<()> {
        if msg.len() > self.size.max(1) {
            bail!("io_uring-uds: message larger than the benchmark size");
        }
        let at = self.filling * self.half_bytes + self.staged_bytes;
        self.slots[at..at + msg.len()].copy_from_slice(msg);
        self.staged_bytes += msg.len();
        self.staged += 1;
        if self.staged >= self.batch {
            self.flush()?;
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        let start = std::time::Instant::now();
        while self.stage.len() - self.taken < self.size {
            self.flush()?;
            if self.peer_closed {
                bail!("the peer closed the socket");
            }
            if start.elapsed() > PEER_TIMEOUT {
                bail!("io_uring peer silent for {PEER_TIMEOUT:?}");
            }
            self.reap(true)?;
        }
        buf.clear();
        buf.extend_from_slice(&self.stage[self.taken..self.taken + self.size]);
        self.taken += self.size;
        Ok(())
    }
}

impl Drop for UringEnd {
    fn drop(&mut self) {
        // Sends still queued go out, and the memory they point to stays
        // until they are done.
        let _ = self.flush();
        let deadline = std::time::Instant::now() + PEER_TIMEOUT;
        while self.in_flight.is_some() && std::time::Instant::now() < deadline {
            if self.reap(true).is_err() {
                break;
            }
        }
        // The armed receive points at `recv_buffers`: shut the socket so it
        // completes before the memory goes.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let mut spins = 0;
        while self.recv_armed && spins < 100 {
            spins += 1;
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
            for c in cqes {
                if c.user_data() == TAG_RECV && !cqueue::more(c.flags()) {
                    self.recv_armed = false;
                }
            }
        }
    }
}
