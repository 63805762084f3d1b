//! Global pids and wait statuses.
//!
//! A global pid is a `u64`: `node` (16 bits) | `generation` (16 bits) |
//! local id (32 bits). The local id is a node-local sequence number that
//! procmgrd assigns before the fork (so the child's environment can carry
//! its global pid; the OS pid is listed beside it), and the generation is
//! drawn at random each time procmgrd starts, so a global pid is not
//! reused for another process while it could still be waited for.
//!
//! Wait statuses use the POSIX encoding, so `<sys/wait.h>` macros work on
//! them; [`NODE_LOST`] is a status none of those macros accepts, tested by
//! `NEFELE_WNODELOST`.

/// A process's cluster-wide id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GlobalPid(pub u64);

impl GlobalPid {
    pub const fn new(node: u16, generation: u16, local: u32) -> Self {
        GlobalPid(((node as u64) << 48) | ((generation as u64) << 32) | local as u64)
    }
    pub const fn node(self) -> u16 {
        (self.0 >> 48) as u16
    }
    pub const fn generation(self) -> u16 {
        (self.0 >> 32) as u16
    }
    pub const fn local(self) -> u32 {
        self.0 as u32
    }
}

impl std::fmt::Display for GlobalPid {
    /// `node.generation.pid`, e.g. `1.4711.23456`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.node(), self.generation(), self.local())
    }
}

/// The status of a process whose node was lost before it exited: neither
/// `WIFEXITED`, `WIFSIGNALED`, `WIFSTOPPED` nor `WIFCONTINUED` holds for it.
pub const NODE_LOST: i32 = 0x100ff;

/// POSIX status of a normal exit with `code`.
pub const fn exited(code: i32) -> i32 {
    (code & 0xff) << 8
}

/// POSIX status of a death by `signal`.
pub const fn signaled(signal: i32) -> i32 {
    signal & 0x7f
}

/// The POSIX status of a finished `std::process::ExitStatus`.
pub fn encode(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.into_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_fields_round_trip() {
        let p = GlobalPid::new(3, 0xbeef, 123_456);
        assert_eq!((p.node(), p.generation(), p.local()), (3, 0xbeef, 123_456));
        assert_eq!(p.to_string(), "3.48879.123456");
    }

    #[test]
    fn statuses_match_the_libc_macros() {
        let e = exited(42);
        assert!(libc::WIFEXITED(e) && libc::WEXITSTATUS(e) == 42);
        let s = signaled(9);
        assert!(libc::WIFSIGNALED(s) && libc::WTERMSIG(s) == 9);
        let st = NODE_LOST;
        assert!(
            !libc::WIFEXITED(st)
                && !libc::WIFSIGNALED(st)
                && !libc::WIFSTOPPED(st)
                && !libc::WIFCONTINUED(st)
        );
    }
}
