//! One trait for every transport, and its backends.
//!
//! A transport makes *links*: a sending half ([`LinkTx`]) and a receiving
//! half ([`LinkRx`]) between one sender and one receiver. Mailboxes are built
//! on links; what a transport must guarantee is pinned down by the
//! [`conformance`](crate::conformance) suite, which runs against every
//! backend:
//!
//! | backend | memory | used for |
//! | --- | --- | --- |
//! | [`ShmTransport`] | a memfd, mapped by each side separately | mailboxes of different processes on one host |
//! | [`InprocTransport`] | anonymous memory shared by reference | mailboxes of the same process |
//!
//! Both run the same ring protocol ([`crate::ring`]); they differ in where the
//! memory comes from and how it is shared. Later transports (the eBPF socket
//! path, remote links) implement the same trait and pass the same suite.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::futex::DEFAULT_SPIN;
use crate::ring::{self, Consumer, Doorbell, Poll, Producer, SendError, SendMode};
use crate::segment::Segment;

/// How long a waiting loop should wait next: until `deadline`, but at most
/// `step` at a time (so it can look at other things in between); `None`
/// once the deadline has passed.
pub fn next_wait(deadline: Option<Instant>, step: Duration) -> Option<Duration> {
    match deadline {
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            (!left.is_zero()).then(|| left.min(step))
        }
        None => Some(step),
    }
}

/// Errors of a receive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    #[error("the sender is gone and everything it sent has been received")]
    PeerGone,
}

/// The sending half of a link.
pub trait LinkTx: Send + 'static {
    /// Sends one message. With a `deadline`, a reliable blocking send gives
    /// up with [`SendError::Timeout`] when the receiver stays full.
    fn send(
        &mut self,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> Result<(), SendError>;
    /// Unreliable messages dropped on this link so far.
    fn dropped(&self) -> u64;
}

/// The receiving half of a link.
pub trait LinkRx: Send + 'static {
    /// Waits for the next message until `deadline` (forever if `None`);
    /// `Ok(false)` on timeout. The message replaces the contents of `out`.
    fn recv(&mut self, out: &mut Vec<u8>, deadline: Option<Instant>) -> Result<bool, RecvError>;
}

/// A way to make links.
pub trait Transport {
    /// The name perf and test output use.
    const NAME: &'static str;
    type Tx: LinkTx;
    type Rx: LinkRx;
    /// A new link whose buffer holds `ring_capacity_bytes`.
    fn link(&self, ring_capacity_bytes: usize) -> std::io::Result<(Self::Tx, Self::Rx)>;
}

/// The sending half of a ring link.
pub struct RingTx {
    producer: Producer,
}

impl LinkTx for RingTx {
    fn send(
        &mut self,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        self.producer.send(msg, mode, deadline)
    }
    fn dropped(&self) -> u64 {
        self.producer.dropped()
    }
}

/// The receiving half of a ring link: one consumer with its own doorbell.
pub struct RingRx {
    consumer: Consumer,
    doorbell: Arc<Doorbell>,
    spin: Duration,
}

impl LinkRx for RingRx {
    fn recv(&mut self, out: &mut Vec<u8>, deadline: Option<Instant>) -> Result<bool, RecvError> {
        let consumer = &mut self.consumer;
        let got = self.doorbell.wait_until(self.spin, deadline, |check| {
            match consumer.poll(out, check) {
                Poll::Message => Some(Ok(())),
                Poll::Closed => Some(Err(RecvError::PeerGone)),
                Poll::Empty => None,
            }
        });
        match got {
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(e),
            None => Ok(false),
        }
    }
}

/// Rings in memfd segments; each side maps the segment on its own, as two
/// processes do.
#[derive(Default)]
pub struct ShmTransport;

impl Transport for ShmTransport {
    const NAME: &'static str = "fabric-shm";
    type Tx = RingTx;
    type Rx = RingRx;

    fn link(&self, ring_capacity_bytes: usize) -> std::io::Result<(RingTx, RingRx)> {
        ring::check_capacity(ring_capacity_bytes)?;
        let seg = Segment::memfd("nefele-ring", ring::segment_bytes(ring_capacity_bytes))?;
        ring::format(&seg)?;
        let dup = |s: &Segment| -> std::io::Result<Segment> {
            let fd = s.fd().expect("memfd segment").try_clone_to_owned()?;
            Segment::from_fd_populated(fd)
        };
        let bell = Segment::memfd("nefele-doorbell", ring::DOORBELL_BYTES)?;
        let rx_bell = Arc::new(Doorbell::new(dup(&bell)?)?);
        let tx_bell = Arc::new(Doorbell::new(bell)?);
        let producer = Producer::attach(Arc::new(dup(&seg)?), tx_bell)?;
        let consumer = Consumer::attach(Arc::new(seg))?;
        Ok((
            RingTx { producer },
            RingRx {
                consumer,
                doorbell: rx_bell,
                spin: DEFAULT_SPIN,
            },
        ))
    }
}

/// Rings in anonymous memory, shared by reference within one process.
#[derive(Default)]
pub struct InprocTransport;

impl InprocTransport {
    /// A ring segment for a link inside this process.
    pub fn ring_segment(ring_capacity_bytes: usize) -> std::io::Result<Arc<Segment>> {
        ring::check_capacity(ring_capacity_bytes)?;
        let seg = Segment::anonymous(ring::segment_bytes(ring_capacity_bytes))?;
        ring::format(&seg)?;
        Ok(Arc::new(seg))
    }
}

impl Transport for InprocTransport {
    const NAME: &'static str = "fabric-inproc";
    type Tx = RingTx;
    type Rx = RingRx;

    fn link(&self, ring_capacity_bytes: usize) -> std::io::Result<(RingTx, RingRx)> {
        let seg = Self::ring_segment(ring_capacity_bytes)?;
        let bell = Arc::new(Doorbell::new(Segment::anonymous(ring::DOORBELL_BYTES)?)?);
        let producer = Producer::attach(seg.clone(), bell.clone())?;
        let consumer = Consumer::attach(seg)?;
        Ok((
            RingTx { producer },
            RingRx {
                consumer,
                doorbell: bell,
                spin: DEFAULT_SPIN,
            },
        ))
    }
}
