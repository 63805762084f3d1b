//! `procmgrd`: starts processes for callers, reports their exits, kills
//! them on request.
//!
//! One mailbox, one loop: requests arrive as messages, and so do exits —
//! each child has a reaper thread that waits for exactly that child (never
//! `waitpid(-1)`, which would steal other children of the hosting process)
//! and reports its status to the loop over an in-process mailbox.
//!
//! Children inherit the daemon's stdout and stderr. When a process that
//! Nefele started exits, its still-running children are killed (SIGKILL):
//! an orphaned worker has nobody to report to.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use fabric::addr::PortId;
use fabric::client::Mailbox;
use fabric::ring::SendMode;
use prost::Message as _;

use crate::pid::{self, GlobalPid};
use crate::proto::{self, request, response, ErrorCode};
use crate::{service_address, PID_ENV};

/// Most processes one procmgrd tracks at once (running or not yet waited for).
pub const MAX_PROCESSES: usize = 4096;
/// Most processes one request may start.
pub const MAX_SPAWN_COUNT: u32 = 1024;

struct Proc {
    parent: u64,
    path: String,
    os_pid: u32,
    /// POSIX status once exited.
    status: Option<i32>,
}

struct Waiter {
    to: PortId,
    id: u64,
    pid: u64,
    parent: u64,
}

/// A procmgrd serving the node of the fabricd at `socket`.
pub struct ProcMgr {
    mailbox: Mailbox,
    reaper: Arc<Mutex<Mailbox>>,
    socket: PathBuf,
    node: u16,
    /// Random per start, so a restarted procmgrd does not reuse pids.
    generation: u16,
    /// The local part of the next global pid: a node-local sequence
    /// number, known before the fork so the child's environment can carry
    /// its global pid.
    next_local: u32,
    procs: HashMap<u64, Proc>,
    waiters: Vec<Waiter>,
    /// Children's stdout goes to /dev/null instead of ours.
    discard_stdout: bool,
}

impl ProcMgr {
    /// Opens its mailboxes on the fabricd at `socket` and binds the
    /// node's procmgr address.
    pub fn open(socket: &Path) -> anyhow::Result<ProcMgr> {
        let mut mailbox = Mailbox::open_at(socket)?;
        let node = mailbox.port().node;
        mailbox.bind(&service_address(node))?;
        let reaper = Arc::new(Mutex::new(Mailbox::open_at(socket)?));
        Ok(ProcMgr {
            mailbox,
            reaper,
            socket: socket.to_path_buf(),
            node: node as u16,
            generation: rand::random(),
            next_local: 1,
            procs: HashMap::new(),
            waiters: Vec::new(),
            discard_stdout: false,
        })
    }

    /// Sends the children's stdout to /dev/null (their stderr still comes
    /// through): for benchmarks that print their own results.
    pub fn discard_stdout(mut self) -> Self {
        self.discard_stdout = true;
        self
    }

    /// Serves in a thread of this process (embedded single nodes, tests,
    /// benchmarks), until the fabric connection is lost.
    pub fn spawn_thread(self) -> std::io::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
        std::thread::Builder::new()
            .name("procmgrd".into())
            .spawn(move || self.run())
    }

    /// Serves until the fabric connection is lost.
    pub fn run(mut self) -> anyhow::Result<()> {
        let reaper_port = lock(&self.reaper).port();
        let mut buf = Vec::new();
        loop {
            let Some(from) = self.mailbox.recv_into(&mut buf, None)? else {
                continue;
            };
            let req = match proto::Request::decode(&buf[..]) {
                Ok(r) => r,
                Err(e) => {
                    self.reply(
                        from,
                        0,
                        error(
                            ErrorCode::ErrorBadRequest,
                            format!("undecodable request: {e}"),
                        ),
                    );
                    continue;
                }
            };
            match req.body {
                Some(request::Body::ChildExited(e)) if from == reaper_port => {
                    self.exited(e.pid, e.status)
                }
                Some(request::Body::ChildExited(_)) => self.reply(
                    from,
                    req.id,
                    error(ErrorCode::ErrorBadRequest, "not accepted from outside"),
                ),
                Some(request::Body::Spawn(s)) => {
                    let body = self.spawn(s);
                    self.reply(from, req.id, body);
                }
                Some(request::Body::Wait(w)) => self.wait(from, req.id, w),
                Some(request::Body::Kill(k)) => {
                    let body = self.kill(k);
                    self.reply(from, req.id, body);
                }
                Some(request::Body::List(_)) => {
                    let processes = self
                        .procs
                        .iter()
                        .map(|(&pid, p)| proto::ProcessInfo {
                            pid,
                            parent: p.parent,
                            path: p.path.clone(),
                            running: p.status.is_none(),
                            status: p.status.unwrap_or(0),
                            os_pid: p.os_pid,
                        })
                        .collect();
                    self.reply(
                        from,
                        req.id,
                        response::Body::Listed(proto::Listed { processes }),
                    );
                }
                None => self.reply(
                    from,
                    req.id,
                    error(ErrorCode::ErrorBadRequest, "empty request"),
                ),
            }
        }
    }

    fn reply(&mut self, to: PortId, id: u64, body: response::Body) {
        let bytes = proto::Response {
            id,
            body: Some(body),
        }
        .encode_to_vec();
        // A caller that died before its answer is not an error of ours.
        if let Err(e) = self.mailbox.send_to_port(to, &bytes, SendMode::RELIABLE) {
            eprintln!("procmgrd: cannot answer {to}: {e}");
        }
    }

    fn spawn(&mut self, s: proto::Spawn) -> response::Body {
        let count = s.count.max(1);
        if count > MAX_SPAWN_COUNT {
            return error(
                ErrorCode::ErrorLimit,
                format!("at most {MAX_SPAWN_COUNT} processes per request"),
            );
        }
        if self.procs.len() + count as usize > MAX_PROCESSES {
            return error(
                ErrorCode::ErrorLimit,
                format!("this node tracks at most {MAX_PROCESSES} processes; wait for some"),
            );
        }
        if s.path.is_empty() {
            return error(ErrorCode::ErrorBadRequest, "spawn needs a path");
        }
        let mut pids = Vec::with_capacity(count as usize);
        for _ in 0..count {
            match self.start_one(&s) {
                Ok(p) => pids.push(p),
                Err(e) => {
                    for p in &pids {
                        let _ = self.kill(proto::Kill {
                            pid: *p,
                            signal: libc::SIGKILL,
                        });
                    }
                    return error(
                        ErrorCode::ErrorSpawnFailed,
                        format!("cannot start {}: {e}", s.path),
                    );
                }
            }
        }
        response::Body::Spawned(proto::Spawned { pids })
    }

    fn start_one(&mut self, s: &proto::Spawn) -> std::io::Result<u64> {
        let mut cmd = Command::new(&s.path);
        if let Some((arg0, rest)) = s.argv.split_first() {
            cmd.arg0(arg0).args(rest);
        }
        for kv in &s.env {
            match kv.split_once('=') {
                Some((k, v)) => cmd.env(k, v),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("environment entry {kv:?} has no '='"),
                    ))
                }
            };
        }
        if !s.cwd.is_empty() {
            cmd.current_dir(&s.cwd);
        }
        let gpid = GlobalPid::new(self.node, self.generation, self.next_local).0;
        cmd.env(fabric::daemon::SOCKET_ENV, &self.socket)
            .env(PID_ENV, gpid.to_string())
            .stdin(Stdio::null());
        if self.discard_stdout {
            cmd.stdout(Stdio::null());
        }
        let child = cmd.spawn()?;
        let os_pid = child.id();
        self.next_local = self.next_local.wrapping_add(1).max(1);
        self.procs.insert(
            gpid,
            Proc {
                parent: s.parent,
                path: s.path.clone(),
                os_pid,
                status: None,
            },
        );
        let reaper = self.reaper.clone();
        let to = self.mailbox.port();
        let reaper_thread = std::thread::Builder::new()
            .name(format!("reap-{os_pid}"))
            .spawn(move || {
                let mut child = child;
                let status = match child.wait() {
                    Ok(st) => pid::encode(st),
                    Err(_) => pid::NODE_LOST,
                };
                let msg = proto::Request {
                    id: 0,
                    body: Some(request::Body::ChildExited(proto::ChildExited {
                        pid: gpid,
                        status,
                    })),
                };
                let _ = lock(&reaper).send_to_port(to, &msg.encode_to_vec(), SendMode::RELIABLE);
            });
        if let Err(e) = reaper_thread {
            eprintln!("procmgrd: cannot start a reaper thread for {os_pid}: {e}");
        }
        Ok(gpid)
    }

    fn exited(&mut self, pid: u64, status: i32) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        p.status = Some(status);
        let parent = p.parent;
        // Orphans of a Nefele process are killed: nobody is left to wait.
        let orphans: Vec<u64> = self
            .procs
            .iter()
            .filter(|(_, c)| c.parent == pid && c.status.is_none())
            .map(|(&c, _)| c)
            .collect();
        for o in orphans {
            let _ = self.kill(proto::Kill {
                pid: o,
                signal: libc::SIGKILL,
            });
        }
        if let Some(i) = self
            .waiters
            .iter()
            .position(|w| w.pid == pid || (w.pid == 0 && w.parent == parent))
        {
            let w = self.waiters.remove(i);
            self.procs.remove(&pid);
            self.reply(
                w.to,
                w.id,
                response::Body::Waited(proto::Waited { pid, status }),
            );
        }
        // Nobody waits for the dead parent's exited orphans: drop them.
        self.procs
            .retain(|_, c| !(c.parent == pid && c.status.is_some()));
    }

    fn wait(&mut self, from: PortId, id: u64, w: proto::Wait) {
        let done = if w.pid != 0 {
            match self.procs.get(&w.pid) {
                None => Some(error(
                    ErrorCode::ErrorNoChild,
                    format!("no process {} to wait for", GlobalPid(w.pid)),
                )),
                Some(p) => p.status.map(|status| {
                    self.procs.remove(&w.pid);
                    response::Body::Waited(proto::Waited { pid: w.pid, status })
                }),
            }
        } else {
            let mine: Vec<(u64, Option<i32>)> = self
                .procs
                .iter()
                .filter(|(_, p)| p.parent == w.parent)
                .map(|(&k, p)| (k, p.status))
                .collect();
            if mine.is_empty() {
                Some(error(ErrorCode::ErrorNoChild, "no children to wait for"))
            } else {
                mine.into_iter()
                    .find_map(|(k, st)| st.map(|s| (k, s)))
                    .map(|(k, status)| {
                        self.procs.remove(&k);
                        response::Body::Waited(proto::Waited { pid: k, status })
                    })
            }
        };
        match done {
            Some(body) => self.reply(from, id, body),
            None if w.nohang => self.reply(
                from,
                id,
                response::Body::Waited(proto::Waited { pid: 0, status: 0 }),
            ),
            None => self.waiters.push(Waiter {
                to: from,
                id,
                pid: w.pid,
                parent: w.parent,
            }),
        }
    }

    fn kill(&mut self, k: proto::Kill) -> response::Body {
        match self.procs.get(&k.pid) {
            Some(p) if p.status.is_none() => {
                let sig = match nix::sys::signal::Signal::try_from(k.signal) {
                    Ok(s) => Some(s),
                    Err(_) if k.signal == 0 => None,
                    Err(_) => {
                        return error(
                            ErrorCode::ErrorBadRequest,
                            format!("{} is not a signal", k.signal),
                        )
                    }
                };
                match nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.os_pid as i32), sig) {
                    Ok(()) => response::Body::Ok(true),
                    Err(e) => error(
                        ErrorCode::ErrorNoProcess,
                        format!("kill {}: {e}", GlobalPid(k.pid)),
                    ),
                }
            }
            _ => error(
                ErrorCode::ErrorNoProcess,
                format!("no running process {}", GlobalPid(k.pid)),
            ),
        }
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> response::Body {
    response::Body::Error(proto::Error {
        code: code as i32,
        message: message.into(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
