//! Processes anywhere in the cluster: spawn, wait, kill.
//!
//! Every call blocks until done, as in the seed. The calls share one
//! connection to the node's procmgrd per process, opened on first use
//! (through `$NEFELE_FABRICD_SOCKET`, which Nefele sets for the processes it
//! starts). Today processes start on the caller's node; placement across
//! nodes comes with the cluster.

use std::sync::Mutex;

use procmgr::client::ProcClient;
pub use procmgr::client::{Exited, ProcError};
pub use procmgr::pid::{GlobalPid, NODE_LOST};

static CLIENT: Mutex<Option<ProcClient>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut ProcClient) -> Result<T, ProcError>) -> Result<T, ProcError> {
    let mut guard = CLIENT.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        *guard = Some(ProcClient::open()?);
    }
    f(guard.as_mut().expect("opened just above"))
}

/// Starts `path` with `argv` (argv[0] included) and extra `env` entries
/// (`KEY=value`); returns its global pid.
pub fn spawn(path: &str, argv: &[String], env: &[String]) -> Result<GlobalPid, ProcError> {
    Ok(n_spawn(path, argv, env, 1)?[0])
}

/// Starts `n` copies of `path`.
pub fn n_spawn(
    path: &str,
    argv: &[String],
    env: &[String],
    n: u32,
) -> Result<Vec<GlobalPid>, ProcError> {
    with(|c| c.spawn(path, argv, env, n))
}

/// Waits for `pid`, or for any child of this process when `None`; with
/// `nohang`, `Ok(None)` if nothing has exited yet.
pub fn waitpid(pid: Option<GlobalPid>, nohang: bool) -> Result<Option<Exited>, ProcError> {
    with(|c| c.wait(pid, nohang))
}

/// Sends `signal` to `pid`.
pub fn kill(pid: GlobalPid, signal: i32) -> Result<(), ProcError> {
    with(|c| c.kill(pid, signal))
}

/// This process's global pid (a stand-in if Nefele did not start it).
pub fn getpid() -> Result<GlobalPid, ProcError> {
    with(|c| Ok(GlobalPid(c.me())))
}
