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

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};

/// `FUTEX2_SIZE_U32`: the futex word is 32 bits; no `FUTEX2_PRIVATE`, so the
/// futex is shared between processes.
const FUTEX2_SIZE_U32: u32 = 0x02;
/// Wake on any wake bitset.
const FUTEX_BITSET_MATCH_ANY: u64 = 0xffff_ffff;

const TAG_FUTEX: u64 = 1;
const TAG_POLL: u64 = 2;
const TAG_CANCEL: u64 = 3;

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
        let futex = opcode::FutexWait::new(
            word.as_ptr().cast_const(),
            expected as u64,
            FUTEX_BITSET_MATCH_ANY,
            FUTEX2_SIZE_U32,
        )
        .build()
        .user_data(TAG_FUTEX);
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
                let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                    .build()
                    .user_data(TAG_CANCEL);
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
        let waker = {
            let word = word.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                word.fetch_add(1, std::sync::atomic::Ordering::Release);
                crate::futex::wake(&word, i32::MAX);
            })
        };
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
}
