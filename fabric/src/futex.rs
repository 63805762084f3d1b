//! Shared (not private) futex wait and wake on a `u32` in shared memory.
//!
//! Shared futexes are keyed by the physical page, so a waiter in one process
//! is woken by a waker in another. They are used even within one process:
//! private futexes were seen to lose wake-ups on this kernel when threads
//! start after a wait is armed.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, at most `timeout` (forever if `None`).
/// Returns on a wake, a timeout, a signal or a changed value; callers recheck
/// their condition in a loop.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, aligned u32 for the duration of the call; the
    // kernel only reads it. FUTEX_WAIT without FUTEX_PRIVATE_FLAG is the
    // shared variant. Errors (EAGAIN, ETIMEDOUT, EINTR) all mean "recheck".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for all processes of a host.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wakes up to `waiters` threads sleeping on `word`.
pub fn wake(word: &AtomicU32, waiters: i32) {
    // SAFETY: as in `wait`; FUTEX_WAKE does not dereference the value.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            waiters,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

use std::sync::atomic::{fence, Ordering};
use std::time::Instant;

/// A spin-then-park event in shared memory: one sleeper, any number of
/// wakers. The waker pays a fence and one load when nobody sleeps, and a
/// syscall only when somebody does.
///
/// Protocol (Dekker-style): the sleeper announces itself in `waiting`, fences,
/// then rechecks its condition before sleeping on `epoch`; the waker makes its
/// change visible, fences, and bumps `epoch` only if it sees `waiting`. One of
/// the two always sees the other, so no wake-up is lost.
#[repr(C)]
#[derive(Default)]
pub struct WaitWord {
    /// The futex word; bumped on every wake.
    pub epoch: AtomicU32,
    /// Non-zero while the sleeper is (about to be) parked.
    pub waiting: AtomicU32,
}

/// How thoroughly a poll of [`WaitWord::wait_until`] should look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// A spin iteration: look only at what the hot path waits for (a
    /// commit word); every load here delays noticing it.
    Quick,
    /// The first poll, every 64th spin, and every poll around parking:
    /// also look at rare conditions (a closed peer, control events).
    Full,
}

/// How long a waiter spins before it parks on the futex.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(20);
/// A parked waiter rechecks at least this often, so a condition that a dead
/// peer could not signal (a crashed process) is still noticed.
pub const PARK_SLICE: Duration = Duration::from_millis(100);

impl WaitWord {
    /// Calls `poll` until it yields a value or `deadline` passes (`None`
    /// then): first spinning for `spin`, then parking between polls.
    pub fn wait_until<T>(
        &self,
        spin: Duration,
        deadline: Option<Instant>,
        poll: impl FnMut(Check) -> Option<T>,
    ) -> Option<T> {
        self.wait_until_parking(spin, deadline, poll, |epoch, seen, slice| {
            wait(epoch, seen, Some(slice))
        })
    }

    /// [`WaitWord::wait_until`] that parks with `park(epoch, seen, slice)`
    /// instead of a plain futex wait: it must return at the latest when
    /// `epoch` is woken or changes from `seen`, or after `slice`; it may
    /// also return for other reasons (a socket became readable), after
    /// which `poll` looks again.
    pub fn wait_until_parking<T>(
        &self,
        spin: Duration,
        deadline: Option<Instant>,
        mut poll: impl FnMut(Check) -> Option<T>,
        mut park: impl FnMut(&AtomicU32, u32, Duration),
    ) -> Option<T> {
        if let Some(v) = poll(Check::Full) {
            return Some(v);
        }
        // The spin's clock starts at its first look at the clock, 64 rounds
        // in (a reading costs about as much as a round, and a message that
        // comes in those first rounds, as in a round trip, is taken without
        // paying for one).
        let mut spin_end: Option<Instant> = None;
        let mut i: u32 = 0;
        // A zero spin parks at once (the pure blocking path).
        while !spin.is_zero() {
            i = i.wrapping_add(1);
            let check = if i.is_multiple_of(64) {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return poll(Check::Full);
                }
                if now >= *spin_end.get_or_insert(now + spin) {
                    break;
                }
                Check::Full
            } else {
                Check::Quick
            };
            std::hint::spin_loop();
            if let Some(v) = poll(check) {
                return Some(v);
            }
        }
        loop {
            // A wait whose deadline has passed never announces itself, so a
            // non-blocking poll leaves `waiting` as it found it (an event
            // loop may have announced a sleep around it: see `announce`).
            let slice = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(PARK_SLICE),
                    _ => return poll(Check::Full),
                },
                None => PARK_SLICE,
            };
            let seen = self.announce();
            if let Some(v) = poll(Check::Full) {
                self.retire();
                return Some(v);
            }
            park(&self.epoch, seen, slice);
            self.retire();
            if let Some(v) = poll(Check::Full) {
                return Some(v);
            }
        }
    }

    /// The sleeper's half of the protocol, for a sleeper that parks
    /// elsewhere (an event loop waiting on the futex through io_uring):
    /// announces the sleep and returns the epoch to sleep on. The sleeper
    /// must then look at its condition once more, sleep only if it still
    /// does not hold, and [`retire`](WaitWord::retire) when it wakes.
    pub fn announce(&self) -> u32 {
        let seen = self.epoch.load(Ordering::Acquire);
        self.waiting.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        seen
    }

    /// Ends a sleep begun with [`announce`](WaitWord::announce): wakers stop
    /// paying for a wake-up.
    pub fn retire(&self) {
        self.waiting.store(0, Ordering::Relaxed);
    }

    /// Wakes the sleeper if there is one. Call after publishing the change
    /// the sleeper waits for.
    #[inline]
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) != 0 {
            self.notify_always();
        }
    }

    /// [`WaitWord::notify`] for a change published with a sequentially
    /// consistent read-modify-write (`swap`): on x86 that `xchg` is already
    /// the full barrier, and cheaper than a store plus `mfence`. Correct in
    /// the C++20 model too: the sleeper's SeqCst fence orders against the
    /// waker's SeqCst swap and load.
    #[inline]
    pub fn notify_after_seqcst_rmw(&self) {
        if self.waiting.load(Ordering::SeqCst) != 0 {
            self.notify_always();
        }
    }

    /// Wakes the sleeper unconditionally (rare events: close, new ring).
    pub fn notify_always(&self) {
        self.epoch.fetch_add(1, Ordering::Release);
        wake(&self.epoch, i32::MAX);
    }
}
