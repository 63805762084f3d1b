//! How far the ring is from the simplest ring the hardware allows: a
//! ping-pong between two pinned threads over
//! - `floor`: one cache line bounced (as `nefele-perf`'s floor),
//! - `slot`: fixed 128-byte slots whose sequence word shares the first line
//!   with the data (56 B: one line; 64 B: the last 8 bytes spill into a
//!   second line, which the receiver loads in every poll),
//! - `ring`: `fabric::ring` itself, polled directly (no mailbox layer),
//!
//! all in the same rounds, so every ratio to the floor comes from one
//! machine state: `cargo run --release -p nefele-fabric --example
//! slot_pingpong [rounds]`.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fabric::futex::Check;
use fabric::ring::{Consumer, Doorbell, Poll, Producer, SendMode};
use fabric::segment::Segment;

const ROUND_TRIPS: usize = 20_000;
const SLOTS: usize = 4096;

#[repr(C, align(128))]
struct Slot {
    seq: AtomicU64,
    data: [u8; 120],
}

struct Slots(Vec<Slot>);

impl Slots {
    fn new() -> Arc<Slots> {
        Arc::new(Slots(
            (0..SLOTS)
                .map(|_| Slot {
                    seq: AtomicU64::new(0),
                    data: [0; 120],
                })
                .collect(),
        ))
    }

    fn send(&self, i: u64, msg: &[u8]) {
        let s = &self.0[i as usize % SLOTS];
        // SAFETY: one writer per slot at a time (the ping-pong alternates),
        // and the reader copies only after seeing the sequence word.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), s.data.as_ptr() as *mut u8, msg.len())
        };
        s.seq.store(i + 1, Ordering::Release);
    }

    fn recv(&self, i: u64, out: &mut [u8]) {
        let s = &self.0[i as usize % SLOTS];
        let second_line = (s as *const Slot as *const u8).wrapping_add(64) as *const u64;
        loop {
            let ready = s.seq.load(Ordering::Acquire) == i + 1;
            // SAFETY: inside the slot; the value is unused.
            std::hint::black_box(unsafe { std::ptr::read_volatile(second_line) });
            if ready {
                break;
            }
            std::hint::spin_loop();
        }
        // SAFETY: published by the Release store seen above.
        unsafe { std::ptr::copy_nonoverlapping(s.data.as_ptr(), out.as_mut_ptr(), out.len()) };
    }
}

fn pin(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(core).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

/// Median round trip of `ROUND_TRIPS` between the two cores: `ping` runs
/// on core 0 and is timed, `pong` on core 1.
fn rtt<P, Q>(ping: P, pong: Q) -> u64
where
    P: FnMut(u64),
    Q: FnMut(u64) + Send + 'static,
{
    let (mut ping, mut pong) = (ping, pong);
    let echo = std::thread::spawn(move || {
        pin(1);
        for i in 0..ROUND_TRIPS as u64 {
            pong(i);
        }
    });
    pin(0);
    let mut rtt: Vec<u64> = (0..ROUND_TRIPS as u64)
        .map(|i| {
            let t = Instant::now();
            ping(i);
            t.elapsed().as_nanos() as u64
        })
        .collect();
    echo.join().unwrap();
    rtt.sort_unstable();
    rtt[rtt.len() / 2]
}

fn floor() -> u64 {
    let word = Arc::new(AtomicU64::new(0));
    let peer = word.clone();
    let wait = |w: &AtomicU64, v: u64| {
        while w.load(Ordering::Acquire) != v {
            std::hint::spin_loop();
        }
    };
    rtt(
        move |i| {
            word.store(2 * i + 1, Ordering::Release);
            wait(&word, 2 * i + 2);
        },
        move |i| {
            wait(&peer, 2 * i + 1);
            peer.store(2 * i + 2, Ordering::Release);
        },
    )
}

fn slot(size: usize) -> u64 {
    let (ab, ba) = (Slots::new(), Slots::new());
    let (ab2, ba2) = (ab.clone(), ba.clone());
    let (msg, mut back, mut buf) = (vec![1u8; size], vec![0u8; size], vec![0u8; size]);
    rtt(
        move |i| {
            ab.send(i, &msg);
            ba.recv(i, &mut back);
        },
        move |i| {
            ab2.recv(i, &mut buf);
            ba2.send(i, &buf);
        },
    )
}

fn ring(size: usize) -> u64 {
    let link = || {
        let seg = Arc::new(Segment::anonymous(fabric::ring::segment_bytes(1 << 20)).unwrap());
        fabric::ring::format(&seg).unwrap();
        let bell = Segment::anonymous(fabric::ring::DOORBELL_BYTES).unwrap();
        let bell = Arc::new(Doorbell::new(bell).unwrap());
        (
            Producer::attach(seg.clone(), bell).unwrap(),
            Consumer::attach(seg).unwrap(),
        )
    };
    let recv = |c: &mut Consumer, out: &mut Vec<u8>| {
        while c.poll(out, Check::Quick) != Poll::Message {
            std::hint::spin_loop();
        }
    };
    let ((mut atx, mut brx), (mut btx, mut arx)) = (link(), link());
    let (msg, mut back, mut buf) = (vec![1u8; size], Vec::new(), Vec::new());
    rtt(
        move |_| {
            atx.send(&msg, SendMode::RELIABLE, None).unwrap();
            recv(&mut arx, &mut back);
        },
        move |_| {
            recv(&mut brx, &mut buf);
            btx.send(&buf, SendMode::RELIABLE, None).unwrap();
        },
    )
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(7, |a| a.parse().expect("rounds"));
    type Case = (&'static str, fn() -> u64);
    let cases: [Case; 4] = [
        ("slot 56 B (one line)", || slot(56)),
        ("slot 64 B (two lines)", || slot(64)),
        ("ring 0 B (one line)", || ring(0)),
        ("ring 64 B (two lines)", || ring(64)),
    ];
    let mut floors = Vec::new();
    let mut ratios = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        let f = floor();
        floors.push(f);
        for (k, (_, run)) in cases.iter().enumerate() {
            ratios[k].push(run() as f64 / f as f64);
        }
    }
    floors.sort_unstable();
    println!(
        "floor: median RTT {} ns over {rounds} rounds",
        floors[rounds / 2]
    );
    for ((name, _), mut r) in cases.iter().zip(ratios) {
        r.sort_by(f64::total_cmp);
        println!(
            "{name:24} RTT / floor: median {:.2}, range {:.2}-{:.2}",
            r[rounds / 2],
            r[0],
            r[rounds - 1]
        );
    }
}
