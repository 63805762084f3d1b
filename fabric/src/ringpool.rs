//! Rings made ahead of need. Mapping a fresh ring costs more than the rest
//! of a `Connect` together: the first process to map a 256 KiB ring waits
//! 0.17-0.26 ms here while the kernel allocates and zeroes its pages, and
//! a sender did that inside its first send. So `fabricd` keeps a few rings
//! ready with their pages allocated (a sender then maps pages that exist,
//! 0.03-0.05 ms; `examples/ring_mapping` measures both), and a background
//! thread makes another whenever one is taken. A burst of `Connect`s that
//! empties the pool gets fresh rings, as before: no `Connect` ever waits
//! for the thread.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::ring;
use crate::segment::Segment;

/// Rings kept ready, unless that would hold more than
/// [`MAX_POOL_BYTES`].
pub const POOL_RINGS: usize = 4;
/// Most memory the ready rings may hold together (larger rings: fewer
/// ready; rings over a quarter of this: none).
pub const MAX_POOL_BYTES: usize = 8 << 20;
/// How long the thread waits before it tries again after failing to make
/// a ring (out of memory, out of fds).
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// A formatted ring segment of `capacity` data bytes; `populated`: its
/// pages allocated now (by this process, which maps them all).
pub fn new_ring(capacity: usize, populated: bool) -> std::io::Result<Segment> {
    let len = ring::segment_bytes(capacity);
    let seg = if populated {
        Segment::memfd_populated("nefele-ring", len)?
    } else {
        Segment::memfd("nefele-ring", len)?
    };
    ring::format(&seg)?;
    Ok(seg)
}

/// How many rings of `capacity` data bytes a pool keeps ready.
pub fn pool_rings(capacity: usize) -> usize {
    POOL_RINGS.min(MAX_POOL_BYTES / ring::segment_bytes(capacity))
}

/// The ready rings and the thread that refills them.
pub struct RingPool {
    shared: Arc<PoolShared>,
}

struct PoolShared {
    capacity: usize,
    target: usize,
    state: Mutex<PoolState>,
    /// Signalled when a ring is taken and when the pool stops.
    taken: Condvar,
}

#[derive(Default)]
struct PoolState {
    ready: Vec<Segment>,
    stopping: bool,
}

impl PoolShared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RingPool {
    /// Starts filling a pool of [`pool_rings`]`(capacity)` rings (none for
    /// rings too large to keep ready: then no thread either).
    pub fn start(capacity: usize) -> RingPool {
        let shared = Arc::new(PoolShared {
            capacity,
            target: pool_rings(capacity),
            state: Mutex::new(PoolState::default()),
            taken: Condvar::new(),
        });
        if shared.target > 0 {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name("fabricd-rings".into())
                .spawn(move || refill(&s));
            if let Err(e) = spawned {
                eprintln!("fabricd: no rings made ahead (no thread: {e})");
            }
        }
        RingPool { shared }
    }

    /// A ready ring, if there is one; the thread makes the next.
    pub fn take(&self) -> Option<Segment> {
        let ring = self.shared.lock().ready.pop();
        if ring.is_some() {
            self.shared.taken.notify_one();
        }
        ring
    }

    /// Rings ready now.
    pub fn ready(&self) -> usize {
        self.shared.lock().ready.len()
    }

    /// Rings the pool keeps ready when full.
    pub fn target(&self) -> usize {
        self.shared.target
    }

    /// Frees the ready rings and tells the thread to end; `take` finds
    /// none after. It does not wait for the thread, which may be making a
    /// ring at idle priority: that ring is dropped when it is done.
    pub fn stop(&self) {
        {
            let mut st = self.shared.lock();
            st.stopping = true;
            st.ready.clear();
        }
        self.shared.taken.notify_one();
    }
}

impl Drop for RingPool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread: makes rings (outside the lock, so `take` never waits for
/// one being made) until the pool is full, then waits for a `take`. It
/// runs only when a core is idle otherwise (`SCHED_IDLE`): making a ring
/// ahead must not slow the processes that use them.
fn refill(pool: &PoolShared) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread (pid 0) with a valid
    // parameter; failing leaves the thread at its normal priority.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    let mut failed = false;
    loop {
        {
            let mut st = pool.lock();
            while !st.stopping && st.ready.len() >= pool.target {
                st = pool.taken.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stopping {
                return;
            }
            if failed {
                let (st, _) = pool
                    .taken
                    .wait_timeout(st, RETRY_AFTER)
                    .unwrap_or_else(|p| p.into_inner());
                if st.stopping {
                    return;
                }
            }
        }
        match new_ring(pool.capacity, true) {
            Ok(seg) => {
                failed = false;
                let mut st = pool.lock();
                if st.stopping {
                    return;
                }
                st.ready.push(seg);
            }
            Err(e) => {
                if !failed {
                    eprintln!("fabricd: cannot make a ring ahead ({e}); senders get fresh ones");
                }
                failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{Consumer, Doorbell, Poll, Producer, SendMode};
    use std::time::Instant;

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_pool_fills_refills_after_a_take_and_its_rings_carry_messages() {
        let pool = RingPool::start(ring::DEFAULT_RING_CAPACITY_BYTES);
        assert_eq!(pool.target(), POOL_RINGS);
        wait_until("a full pool", || pool.ready() == POOL_RINGS);
        let seg = pool.take().expect("a ready ring");
        assert!(pool.ready() < POOL_RINGS);
        wait_until("the pool to refill", || pool.ready() == POOL_RINGS);

        // A sender and a receiver each map the ring from its fd, as the
        // processes of a Connect do.
        let map = |s: &Segment| {
            let fd = s.fd().expect("memfd").try_clone_to_owned().expect("dup");
            Arc::new(Segment::from_fd_populated(fd).expect("map"))
        };
        let bell = Arc::new(
            Doorbell::new(Segment::anonymous(ring::DOORBELL_BYTES).expect("memory"))
                .expect("doorbell"),
        );
        let mut tx = Producer::attach(map(&seg), bell).expect("producer");
        let mut rx = Consumer::attach(map(&seg)).expect("consumer");
        tx.send(b"first", SendMode::RELIABLE, None).expect("send");
        let mut out = Vec::new();
        assert_eq!(rx.try_recv(&mut out), Poll::Message);
        assert_eq!(out, b"first");

        pool.stop();
        assert_eq!(pool.ready(), 0);
        assert!(pool.take().is_none());
    }

    #[test]
    fn large_rings_are_not_kept_ready() {
        assert_eq!(pool_rings(1 << 20), 4);
        assert_eq!(pool_rings(4 << 20), 1);
        assert_eq!(pool_rings(8 << 20), 0);
        let pool = RingPool::start(8 << 20);
        assert_eq!(pool.target(), 0);
        assert!(pool.take().is_none());
    }
}
