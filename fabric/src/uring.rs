//! io_uring waits: one submission that sleeps on a shared futex and a
//! socket together.
//!
//! A pollable mailbox receives on two paths at once: shared-memory rings
//! (whose senders wake it through the doorbell's futex) and its eBPF socket.
//! Parking on only one of them would miss the other; a thread per path
//! would cost a wake-up more. io_uring holds both waits — `FUTEX_WAIT` on
//! the doorbell word (shared, not private: the wakers live in other
//! processes) and `POLL_ADD` on the socket — in one submission, and the
//! first to complete ends the sleep.
//!
//! It also holds what fabricd's io_uring loops (the control connections,
//! the eBPF hub) share: a [`Waker`] through which other threads hand a loop
//! work, and [`push_entry`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::sync::Mutex;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

/// Items other threads queue for an io_uring loop, and the eventfd that
/// tells the loop (which keeps a read posted on it) that the queue is no
/// longer empty.
pub(crate) struct Waker<T> {
    eventfd: OwnedFd,
    queue: Mutex<Vec<T>>,
}

impl<T> Waker<T> {
    pub(crate) fn new() -> io::Result<Waker<T>> {
        // SAFETY: eventfd returns a fresh fd (or -1, checked).
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            // SAFETY: `efd` is ours alone.
            eventfd: unsafe { OwnedFd::from_raw_fd(efd) },
            queue: Mutex::new(Vec::new()),
        })
    }

    /// Queues `item`, waking the loop if it is the first.
    pub(crate) fn ready(&self, item: T) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.push(item);
        if q.len() == 1 {
            self.kick();
        }
    }

    /// Wakes the loop (to look at something besides the queue).
    pub(crate) fn kick(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        let _ = unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    /// What was queued since the last call.
    pub(crate) fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The read the loop keeps posted on the eventfd, landing in `buf`
    /// (which must outlive it).
    pub(crate) fn read_entry(&self, buf: &mut [u8; 8], user_data: u64) -> squeue::Entry {
        opcode::Read::new(types::Fd(self.eventfd.as_raw_fd()), buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data)
    }
}

/// Queues `sqe` on `ring`, submitting what is queued when the queue is full.
///
/// # Safety
///
/// Every buffer `sqe` points at must stay valid, and in place, until its
/// completion has been taken from the ring.
pub(crate) unsafe fn push_entry(ring: &mut IoUring, sqe: &squeue::Entry) {
    loop {
        // SAFETY: the caller's promise, passed on.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return;
        }
        if let Err(e) = ring.submit() {
            eprintln!("fabric: io_uring submit failed: {e}");
            std::thread::yield_now();
        }
    }
}

/// `FUTEX2_SIZE_U32`: the futex word is 32 bits; no `FUTEX2_PRIVATE`, so the
/// futex is shared between processes.
const FUTEX2_SIZE_U32: u32 = 0x02;
/// Wake on any wake bitset.
const FUTEX_BITSET_MATCH_ANY: u64 = 0xffff_ffff;

const TAG_FUTEX: u64 = 1;
const TAG_POLL: u64 = 2;
const TAG_CANCEL: u64 = 3;

/// A `FUTEX_WAIT` on the shared futex `word` while it holds `expected`.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32) -> squeue::Entry {
    opcode::FutexWait::new(
        word.as_ptr().cast_const(),
        expected as u64,
        FUTEX_BITSET_MATCH_ANY,
        FUTEX2_SIZE_U32,
    )
    .build()
    .user_data(TAG_FUTEX)
}

/// Submits what is queued on an event loop's `ring` and waits for a
/// completion, at most `wait`. Running out of time, a signal and a
/// completion queue that overflowed (its completions are reaped as usual)
/// all just return.
pub(crate) fn submit_and_wait_for(ring: &mut IoUring, wait: Duration) -> io::Result<()> {
    let ts = types::Timespec::new()
        .sec(wait.as_secs())
        .nsec(wait.subsec_nanos());
    let args = types::SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(1, &args) {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Runs `body`, an event loop, on a thread called `name`; its error, if it
/// ends with one, is reported as `what` failing.
pub(crate) fn spawn_loop(
    name: &str,
    what: &'static str,
    body: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Err(e) = body() {
                eprintln!("fabricd: {what} failed: {e}");
            }
        })
        .map(drop)
}

/// A poll for `fd` turning readable (or closing), and writable too if
/// `writable`, reported as `token`.
pub(crate) fn poll_socket(fd: RawFd, writable: bool, token: u64) -> squeue::Entry {
    let mut events = libc::POLLIN | libc::POLLRDHUP;
    if writable {
        events |= libc::POLLOUT;
    }
    opcode::PollAdd::new(types::Fd(fd), events as u32)
        .build()
        .user_data(token)
}

/// Cancels the poll armed with `*armed`, if any (the cancel completes as
/// `cancel_token`): a connection a loop lets go must not stay referenced,
/// and so open, by a poll.
pub(crate) fn disarm(ring: &mut IoUring, armed: &mut Option<u64>, cancel_token: u64) {
    if let Some(token) = armed.take() {
        let cancel = opcode::AsyncCancel::new(token)
            .build()
            .user_data(cancel_token);
        // SAFETY: a cancel points at no memory.
        unsafe { push_entry(ring, &cancel) };
    }
}

/// Cancels every request in flight on the ring.
fn cancel_all() -> squeue::Entry {
    opcode::AsyncCancel2::new(types::CancelBuilder::any())
        .build()
        .user_data(TAG_CANCEL)
}

/// One ring, reused for every wait of one waiter.
pub struct FutexOrFd {
    ring: IoUring,
}

impl FutexOrFd {
    pub fn new() -> io::Result<FutexOrFd> {
        Ok(FutexOrFd {
            ring: IoUring::new(8)?,
        })
    }

    /// Sleeps until a wake on `word` (or `word != expected` already), `fd`
    /// becomes readable, or `timeout` passes. Returns on whichever comes
    /// first; callers recheck their conditions.
    pub fn wait(
        &mut self,
        word: &AtomicU32,
        expected: u32,
        fd: RawFd,
        timeout: Duration,
    ) -> io::Result<()> {
        let futex = futex_wait(word, expected);
        let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(TAG_POLL);
        // SAFETY: `word` is borrowed for this whole call, and the call does
        // not return before both operations have completed (or been
        // cancelled and completed), so the kernel never reads it later.
        unsafe {
            let mut sq = self.ring.submission();
            sq.push(&futex)
                .map_err(|_| io::Error::other("io_uring queue full"))?;
            sq.push(&poll)
                .map_err(|_| io::Error::other("io_uring queue full"))?;
        }
        let ts = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
        // Cancel whatever is still waiting, and reap both before returning.
        let (mut futex_done, mut poll_done) = (false, false);
        let mut cancelled = false;
        loop {
            for c in self.ring.completion() {
                match c.user_data() {
                    TAG_FUTEX => futex_done = true,
                    TAG_POLL => poll_done = true,
                    _ => {}
                }
            }
            if futex_done && poll_done {
                return Ok(());
            }
            if !cancelled {
                let cancel = cancel_all();
                // SAFETY: a cancel request points at no memory of ours.
                unsafe {
                    self.ring
                        .submission()
                        .push(&cancel)
                        .map_err(|_| io::Error::other("io_uring queue full"))?;
                }
                cancelled = true;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A futex wait that runs in the background and shows as readiness of an
/// fd: [`FutexWatch::arm`] queues a `FUTEX_WAIT` on the watch's ring, and
/// when a wake ends it, the completion makes the ring's fd readable. So an
/// event loop (tokio) waits on a futex in shared memory with no thread
/// blocked on it.
pub struct FutexWatch {
    ring: IoUring,
    /// A wait is queued and has not completed.
    armed: bool,
}

impl FutexWatch {
    pub fn new() -> io::Result<FutexWatch> {
        Ok(FutexWatch {
            ring: IoUring::new(4)?,
            armed: false,
        })
    }

    /// Queues a wait for a wake on `word` while it holds `expected`, unless
    /// a wait is already queued (a wake, or a changed word, ends that one
    /// too). The kernel reads `word` once, when it queues the wait (a word
    /// that has already changed completes the wait at once); a shared
    /// futex's wait is keyed by the page, not the address, so nothing reads
    /// `word` afterwards.
    pub fn arm(&mut self, word: &AtomicU32, expected: u32) -> io::Result<()> {
        if self.armed {
            return Ok(());
        }
        let futex = futex_wait(word, expected);
        // SAFETY: `word` is live now, and `submit` below issues the wait
        // (which reads it) before this call returns.
        unsafe {
            self.ring
                .submission()
                .push(&futex)
                .map_err(|_| io::Error::other("io_uring queue full"))?;
        }
        self.ring.submit()?;
        self.armed = true;
        Ok(())
    }

    /// Takes the completions there are, without waiting; returns whether
    /// the queued wait has ended (it must then be armed again).
    pub fn reap(&mut self) -> bool {
        let ended = self.ring.completion().any(|c| c.user_data() == TAG_FUTEX);
        if ended {
            self.armed = false;
        }
        ended
    }
}

impl std::os::fd::AsRawFd for FutexWatch {
    /// Readable while a completion waits to be reaped.
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl Drop for FutexWatch {
    /// Cancels a queued wait and reaps it, so no request outlives the watch.
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let cancel = cancel_all();
        // SAFETY: a cancel request points at no memory of ours.
        if unsafe { self.ring.submission().push(&cancel) }.is_err() {
            return;
        }
        // Bounded: the cancel completes at once, and so does the wait it
        // cancels.
        for _ in 0..4 {
            if self.ring.submit_and_wait(1).is_err() || self.reap() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn wakes_on_the_futex_on_the_socket_and_times_out() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let word = Arc::new(AtomicU32::new(0));
        let mut w = FutexOrFd::new().expect("io_uring");
        use std::os::fd::AsRawFd;
        // Nothing happens: the timeout ends the wait.
        let t0 = Instant::now();
        w.wait(&word, 0, b.as_raw_fd(), Duration::from_millis(30))
            .expect("wait");
        assert!(t0.elapsed() >= Duration::from_millis(25));
        // A futex wake from another thread.
        let waker = wake_later(&word);
        let t0 = Instant::now();
        w.wait(&word, 0, b.as_raw_fd(), Duration::from_secs(5))
            .expect("wait");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "missed the futex wake"
        );
        waker.join().expect("waker");
        // The socket becomes readable.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            a.write_all(b"x").expect("write");
            a
        });
        let t0 = Instant::now();
        w.wait(&word, 1, b.as_raw_fd(), Duration::from_secs(5))
            .expect("wait");
        assert!(t0.elapsed() < Duration::from_secs(2), "missed the socket");
        let _a = writer.join().expect("writer");
    }

    /// Bumps and wakes `word` from another thread, 20 ms from now.
    fn wake_later(word: &Arc<AtomicU32>) -> std::thread::JoinHandle<()> {
        let word = word.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            word.fetch_add(1, std::sync::atomic::Ordering::Release);
            crate::futex::wake(&word, i32::MAX);
        })
    }

    fn readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call's duration.
        unsafe { libc::poll(&mut p, 1, timeout_ms) == 1 }
    }

    #[test]
    fn a_futex_watch_turns_a_wake_into_a_readable_fd() {
        use std::os::fd::AsRawFd;
        let word = Arc::new(AtomicU32::new(5));
        let mut w = FutexWatch::new().expect("io_uring");
        w.arm(&word, 5).expect("arm");
        w.arm(&word, 5).expect("arming twice queues one wait");
        assert!(!readable(w.as_raw_fd(), 30), "readable before any wake");
        assert!(!w.reap());
        let waker = wake_later(&word);
        assert!(readable(w.as_raw_fd(), 5000), "the wake was not seen");
        waker.join().expect("waker");
        assert!(w.reap(), "the wait ended");
        assert!(!readable(w.as_raw_fd(), 0), "reaped: not readable");
        // A word that has already moved on completes the wait at once.
        w.arm(&word, 5).expect("arm");
        assert!(readable(w.as_raw_fd(), 5000));
        assert!(w.reap());
        // A queued wait is cancelled on drop (this must not hang).
        w.arm(&word, 6).expect("arm");
        drop(w);
    }
}
