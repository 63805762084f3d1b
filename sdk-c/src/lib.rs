//! `libnefele`: the Nefele C SDK.
//!
//! The seed's API, with its signatures, over the Rust SDK: process
//! management (`nefele_*`, in `nefele.h`) and Hermodr messaging (`hrmd_*`,
//! in `hermodr.h`). Every call blocks until done. Errors are negative
//! `NEFELE_E*` codes that [`hrmd_strerror`] explains; a NULL or malformed
//! argument is an error, never a crash, and no Rust panic crosses into C.
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use nefele_sdk::process::{self, GlobalPid, ProcError};
use nefele_sdk::{Error, SendError};

/// A process's cluster-wide id.
pub type nefele_pid_t = u64;
/// A byte of message data.
pub type byte = u8;

/// A NULL or malformed argument.
pub const NEFELE_EINVAL: c_int = -1;
/// No fabricd reachable (set NEFELE_FABRICD_SOCKET, or run under `nefele run`).
pub const NEFELE_ENODAEMON: c_int = -2;
/// No procmgrd serves this node.
pub const NEFELE_ENOPROCMGR: c_int = -3;
/// A malformed address.
pub const NEFELE_EADDR: c_int = -4;
/// Nobody is bound to the address.
pub const NEFELE_ENOMAILBOX: c_int = -5;
/// The receiver is gone (closed or died).
pub const NEFELE_EPEERGONE: c_int = -6;
/// Timed out.
pub const NEFELE_ETIMEDOUT: c_int = -7;
/// A message larger than the limit, or than the caller's buffer (the
/// message is kept: receive again with a larger buffer).
pub const NEFELE_ETOOBIG: c_int = -8;
/// No child to wait for.
pub const NEFELE_ECHILD: c_int = -9;
/// No such process.
pub const NEFELE_ESRCH: c_int = -10;
/// The program could not be started.
pub const NEFELE_ESPAWN: c_int = -11;
/// The request was refused (e.g. already bound), or the tenant policy keeps
/// this mailbox's tenant from the receiver's.
pub const NEFELE_EREFUSED: c_int = -12;
/// An I/O or protocol error.
pub const NEFELE_EIO: c_int = -13;
/// An internal error (a bug); details went to stderr.
pub const NEFELE_EINTERNAL: c_int = -14;

/// Most argv or envp entries accepted.
const MAX_VECTOR_ENTRIES: usize = 65536;

/// A messaging handle: one mailbox.
pub struct hrmd {
    mailbox: nefele_sdk::Mailbox,
    /// A message that did not fit the caller's buffer, kept for the next call.
    pending: Option<Vec<u8>>,
}

/// The messaging handle's C name.
pub type hrmd_t = hrmd;

fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        eprintln!("libnefele: internal error (panic) caught at the C boundary");
        fallback
    })
}

fn fabric_code(e: &Error) -> c_int {
    match e {
        Error::NoDaemon { .. } | Error::DaemonGone => NEFELE_ENODAEMON,
        Error::NoSuchMailbox(_) => NEFELE_ENOMAILBOX,
        Error::Address(_) => NEFELE_EADDR,
        Error::Refused { .. } => NEFELE_EREFUSED,
        Error::Send { reason, .. } => match reason {
            SendError::PeerGone => NEFELE_EPEERGONE,
            SendError::TooLarge { .. } => NEFELE_ETOOBIG,
            SendError::Timeout | SendError::WouldBlock => NEFELE_ETIMEDOUT,
            SendError::NoSuchMailbox => NEFELE_ENOMAILBOX,
            SendError::Denied => NEFELE_EREFUSED,
        },
        _ => NEFELE_EIO,
    }
}

/// 0, or the code of a fabric error.
fn status(r: Result<(), Error>) -> c_int {
    r.map_or_else(|e| fabric_code(&e), |()| 0)
}

fn proc_code(e: &ProcError) -> c_int {
    match e {
        ProcError::Fabric(f) => fabric_code(f),
        ProcError::NoProcmgr { .. } => NEFELE_ENOPROCMGR,
        ProcError::NoChild(_) => NEFELE_ECHILD,
        ProcError::NoProcess(_) => NEFELE_ESRCH,
        ProcError::SpawnFailed(_) => NEFELE_ESPAWN,
        ProcError::Refused(_) => NEFELE_EREFUSED,
        ProcError::Timeout(_) => NEFELE_ETIMEDOUT,
        ProcError::Protocol(_) => NEFELE_EIO,
    }
}

/// A C string argument; NULL or not UTF-8 is `NEFELE_EINVAL`.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn text<'a>(p: *const c_char) -> Result<&'a str, c_int> {
    if p.is_null() {
        return Err(NEFELE_EINVAL);
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| NEFELE_EINVAL)
}

/// A NULL-terminated vector of C strings; NULL means empty.
///
/// # Safety
/// `v` is NULL or points to an array of C strings ending with NULL.
unsafe fn vector(v: *const *mut c_char) -> Result<Vec<String>, c_int> {
    let mut out = Vec::new();
    if v.is_null() {
        return Ok(out);
    }
    for i in 0..=MAX_VECTOR_ENTRIES {
        // SAFETY: within the array, which ends at the NULL we stop on.
        let p = unsafe { *v.add(i) };
        if p.is_null() {
            return Ok(out);
        }
        // SAFETY: a non-NULL entry is a C string by contract.
        out.push(unsafe { text(p) }?.to_owned());
    }
    Err(NEFELE_EINVAL)
}

/// # Safety
/// See [`nefele_n_spawn`].
unsafe fn spawn_into(
    pids: *mut nefele_pid_t,
    n: c_int,
    path: *const c_char,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    if pids.is_null() || n <= 0 {
        return NEFELE_EINVAL;
    }
    // SAFETY: forwarded caller contracts.
    let (path, mut argv, envp) = match unsafe { (text(path), vector(argv), vector(envp)) } {
        (Ok(p), Ok(a), Ok(e)) => (p, a, e),
        _ => return NEFELE_EINVAL,
    };
    if argv.is_empty() {
        argv.push(path.to_owned());
    }
    match process::n_spawn(path, &argv, &envp, n as u32) {
        Ok(got) => {
            for (i, p) in got.iter().enumerate().take(n as usize) {
                // SAFETY: the caller provides room for `n` pids.
                unsafe { *pids.add(i) = p.0 };
            }
            n
        }
        Err(e) => proc_code(&e),
    }
}

/// Starts `path` on the cluster with `argv` (NULL-terminated, argv[0]
/// included; NULL: just the path) and extra environment `envp`
/// (NULL-terminated `KEY=value`, or NULL). Stores the global pid in `*pid`.
/// Returns 0 or a negative `NEFELE_E*` code.
///
/// # Safety
/// `pid` points to writable memory; strings and vectors are NUL/NULL
/// terminated.
#[no_mangle]
pub unsafe extern "C" fn nefele_spawn(
    pid: *mut nefele_pid_t,
    path: *const c_char,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    // SAFETY: forwarded caller contracts.
    guard(NEFELE_EINTERNAL, || {
        match unsafe { spawn_into(pid, 1, path, argv, envp) } {
            1 => 0,
            e => e,
        }
    })
}

/// Starts `n` copies of `path`; stores their pids in `pids[0..n]`. Returns
/// `n` or a negative `NEFELE_E*` code (then none were started).
///
/// # Safety
/// `pids` has room for `n` pids; strings and vectors are NUL/NULL terminated.
#[no_mangle]
pub unsafe extern "C" fn nefele_n_spawn(
    pids: *mut nefele_pid_t,
    n: c_int,
    path: *const c_char,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    // SAFETY: forwarded caller contracts.
    guard(NEFELE_EINTERNAL, || unsafe {
        spawn_into(pids, n, path, argv, envp)
    })
}

/// Waits for `pid` to exit, or for any child of the caller when `pid` is 0.
/// Stores its POSIX status in `*status` (if not NULL): `<sys/wait.h>`
/// macros apply, and `NEFELE_WNODELOST(status)` tells a lost node. With
/// `options` containing `WNOHANG`, returns 0 if nothing has exited yet.
/// Returns the pid, or a negative `NEFELE_E*` code cast to `nefele_pid_t`
/// (test with `(int64_t)ret < 0`).
///
/// # Safety
/// `status` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nefele_waitpid(
    pid: nefele_pid_t,
    status: *mut c_int,
    options: c_int,
) -> nefele_pid_t {
    let fail = |code: c_int| code as i64 as nefele_pid_t;
    guard(fail(NEFELE_EINTERNAL), || {
        let target = if pid == 0 { None } else { Some(GlobalPid(pid)) };
        match process::waitpid(target, options & libc::WNOHANG != 0) {
            Ok(None) => 0,
            Ok(Some(e)) => {
                if !status.is_null() {
                    // SAFETY: non-NULL and writable by contract.
                    unsafe { *status = e.status };
                }
                e.pid.0
            }
            Err(e) => fail(proc_code(&e)),
        }
    })
}

/// Sends signal `sig` to `pid`. Returns 0 or a negative `NEFELE_E*` code.
#[no_mangle]
pub extern "C" fn nefele_kill(pid: nefele_pid_t, sig: c_int) -> c_int {
    guard(NEFELE_EINTERNAL, || {
        match process::kill(GlobalPid(pid), sig) {
            Ok(()) => 0,
            Err(e) => proc_code(&e),
        }
    })
}

/// Opens a mailbox on the local node. Returns NULL if no fabricd is
/// reachable (a message on stderr says how to start one).
#[no_mangle]
pub extern "C" fn hrmd_open() -> *mut hrmd_t {
    guard(std::ptr::null_mut(), || match nefele_sdk::Mailbox::open() {
        Ok(mailbox) => Box::into_raw(Box::new(hrmd {
            mailbox,
            pending: None,
        })),
        Err(e) => {
            eprintln!("hrmd_open: {e}");
            std::ptr::null_mut()
        }
    })
}

/// Closes a mailbox (its bindings go); NULL is ignored.
///
/// # Safety
/// `h` is NULL or from `hrmd_open`, and not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn hrmd_close(h: *mut hrmd_t) {
    guard((), || {
        if !h.is_null() {
            // SAFETY: from Box::into_raw in hrmd_open, closed once.
            drop(unsafe { Box::from_raw(h) });
        }
    })
}

/// # Safety
/// `h` is NULL or a live handle.
unsafe fn handle<'a>(h: *mut hrmd_t) -> Result<&'a mut hrmd, c_int> {
    // SAFETY: NULL or live by contract.
    unsafe { h.as_mut() }.ok_or(NEFELE_EINVAL)
}

/// A live handle and an address string, the first arguments of most
/// `hrmd_*` calls.
///
/// # Safety
/// As for [`handle`] and [`text`].
unsafe fn handle_and_address<'a>(
    h: *mut hrmd_t,
    addr: *const c_char,
) -> Result<(&'a mut hrmd, &'a str), c_int> {
    // SAFETY: forwarded caller contracts.
    unsafe { Ok((handle(h)?, text(addr)?)) }
}

fn ms(timeout_ms: c_int) -> Duration {
    if timeout_ms < 0 {
        Duration::from_secs(u32::MAX as u64)
    } else {
        Duration::from_millis(timeout_ms as u64)
    }
}

/// Binds `addr` (e.g. "printer@{8080,1,1}"). Returns 0 or a negative code.
///
/// # Safety
/// `h` is a live handle; `addr` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn hrmd_bind(h: *mut hrmd_t, addr: *const c_char) -> c_int {
    guard(NEFELE_EINTERNAL, || {
        // SAFETY: forwarded caller contracts.
        let (h, addr) = match unsafe { handle_and_address(h, addr) } {
            Ok(pair) => pair,
            Err(e) => return e,
        };
        status(h.mailbox.bind(addr))
    })
}

/// Whether a binding matching `addr` exists, waiting up to `timeout_ms`
/// (negative: without limit). False on any error too.
///
/// # Safety
/// `h` is a live handle; `addr` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn hrmd_service_exists(
    h: *mut hrmd_t,
    addr: *const c_char,
    timeout_ms: c_int,
) -> bool {
    guard(false, || {
        // SAFETY: forwarded caller contracts.
        let Ok((h, addr)) = (unsafe { handle_and_address(h, addr) }) else {
            return false;
        };
        h.mailbox
            .service_exists(addr, ms(timeout_ms))
            .unwrap_or(false)
    })
}

/// Sends `len` bytes to `addr`, reliably. Returns 0 or a negative code.
///
/// # Safety
/// `h` is a live handle; `addr` is NUL-terminated; `data` points to `len`
/// readable bytes (it may be NULL when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn hrmd_message(
    h: *mut hrmd_t,
    addr: *const c_char,
    data: *const byte,
    len: libc::size_t,
) -> c_int {
    guard(NEFELE_EINTERNAL, || {
        // SAFETY: forwarded caller contracts.
        let (h, addr) = match unsafe { handle_and_address(h, addr) } {
            Ok(pair) => pair,
            Err(e) => return e,
        };
        if data.is_null() && len != 0 {
            return NEFELE_EINVAL;
        }
        if len > nefele_sdk::MAX_MESSAGE_BYTES {
            return NEFELE_ETOOBIG;
        }
        let bytes = if len == 0 {
            &[][..]
        } else {
            // SAFETY: `len` readable bytes at `data` by contract.
            unsafe { std::slice::from_raw_parts(data, len) }
        };
        status(h.mailbox.send(addr, bytes))
    })
}

/// Receives the next message into `buf` (room for `cap` bytes), waiting up
/// to `timeout_ms` (negative: without limit; 0: do not wait). Returns its
/// length, or a negative code: `NEFELE_ETIMEDOUT`, or `NEFELE_ETOOBIG` when
/// it does not fit (it is kept for the next call).
///
/// # Safety
/// `h` is a live handle; `buf` has `cap` writable bytes (NULL if `cap` is 0).
#[no_mangle]
pub unsafe extern "C" fn hrmd_receive(
    h: *mut hrmd_t,
    buf: *mut byte,
    cap: libc::size_t,
    timeout_ms: c_int,
) -> libc::ssize_t {
    guard(NEFELE_EINTERNAL as libc::ssize_t, || {
        // SAFETY: forwarded caller contract.
        let Ok(h) = (unsafe { handle(h) }) else {
            return NEFELE_EINVAL as libc::ssize_t;
        };
        if buf.is_null() && cap != 0 {
            return NEFELE_EINVAL as libc::ssize_t;
        }
        let msg = match h.pending.take() {
            Some(m) => m,
            None => match h.mailbox.recv_timeout(ms(timeout_ms)) {
                Ok(Some(m)) => m.data,
                Ok(None) => return NEFELE_ETIMEDOUT as libc::ssize_t,
                Err(e) => return fabric_code(&e) as libc::ssize_t,
            },
        };
        if msg.len() > cap {
            h.pending = Some(msg);
            return NEFELE_ETOOBIG as libc::ssize_t;
        }
        if !msg.is_empty() {
            // SAFETY: `cap` >= msg.len() writable bytes at `buf`.
            unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), buf, msg.len()) };
        }
        msg.len() as libc::ssize_t
    })
}

/// A static description of a `NEFELE_E*` code (0: "success").
#[no_mangle]
pub extern "C" fn hrmd_strerror(err: c_int) -> *const c_char {
    let s: &'static CStr = match err {
        0 => c"success",
        NEFELE_EINVAL => c"invalid argument (NULL or malformed)",
        NEFELE_ENODAEMON => c"no fabricd reachable: set NEFELE_FABRICD_SOCKET, start one with `nefele up`, or run under `nefele run`",
        NEFELE_ENOPROCMGR => c"no procmgrd serves this node: start one with `nefele up`, or run under `nefele run`",
        NEFELE_EADDR => c"malformed address (see the address forms in the README)",
        NEFELE_ENOMAILBOX => c"no mailbox is bound to that address",
        NEFELE_EPEERGONE => c"the receiver is gone (closed or died)",
        NEFELE_ETIMEDOUT => c"timed out",
        NEFELE_ETOOBIG => c"message too large (for the limit, or for the buffer: it is kept, receive again with a larger one)",
        NEFELE_ECHILD => c"no child to wait for",
        NEFELE_ESRCH => c"no such process",
        NEFELE_ESPAWN => c"the program could not be started",
        NEFELE_EREFUSED => c"refused (e.g. already bound, or the tenant policy keeps this tenant from that mailbox)",
        NEFELE_EIO => c"I/O or protocol error",
        NEFELE_EINTERNAL => c"internal error (a bug; details on stderr)",
        _ => c"unknown error code",
    };
    s.as_ptr()
}
