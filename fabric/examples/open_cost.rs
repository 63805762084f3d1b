//! What opening a mailbox costs, and where: opens mailboxes one after
//! another against a daemon of its own (with the eBPF path when run as
//! root), with and without the eBPF socket each gets at open (`early`),
//! and prints the p50 and p99 of each way.
//!
//!   cargo run --release -p nefele-fabric --example open_cost [opens]
mod common;

use std::time::Instant;

use fabric::client::Mailbox;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("opens: a number"))
        .unwrap_or(500);
    let (_dir, d, path) = common::temp_daemon();
    println!("eBPF path: {}", d.stats().ebpf);
    for early in [true, false] {
        let mut took: Vec<u128> = (0..n)
            .map(|_| {
                let t = Instant::now();
                let m = Mailbox::open_at_with(&path, early).unwrap();
                let dt = t.elapsed().as_micros();
                drop(m);
                dt
            })
            .collect();
        took.sort_unstable();
        println!(
            "early {early:5}: open p50 {} us, p99 {} us ({n} opens)",
            took[n / 2],
            took[n * 99 / 100]
        );
    }
}
