//! Network namespaces, for the tests and benchmarks that make several
//! nodes on one machine: `ip` (iproute2) to build them, and a way to run
//! code — and start threads, which stay there — inside one. Needs root.

use std::fs::File;
use std::io;
use std::process::Command;

/// Runs `ip ARGS`; its stderr becomes the error.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running ip (iproute2): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs `f` on this thread inside namespace `ns` (made with `ip netns
/// add`); threads it starts stay there. The thread moves back afterwards.
pub fn inside<T>(ns: &str, f: impl FnOnce() -> T) -> io::Result<T> {
    use nix::sched::{setns, CloneFlags};
    let home = File::open("/proc/thread-self/ns/net")?;
    setns(
        File::open(format!("/run/netns/{ns}"))?,
        CloneFlags::CLONE_NEWNET,
    )?;
    let out = f();
    setns(home, CloneFlags::CLONE_NEWNET)?;
    Ok(out)
}
