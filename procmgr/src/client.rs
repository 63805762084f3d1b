//! Blocking calls to the local procmgrd, over one mailbox of the caller's.

use std::time::{Duration, Instant};

use fabric::addr::Address;
use fabric::client::Mailbox;
use prost::Message as _;

use crate::pid::GlobalPid;
use crate::proto::{self, request, response, ErrorCode};
use crate::{service_address, PID_ENV};

/// How long a call other than `wait` may take before it is given up.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the first call looks for a procmgrd on the node.
pub const FIND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error(transparent)]
    Fabric(#[from] fabric::client::Error),
    #[error("no procmgrd serves node {node} (looked for {address} for {FIND_TIMEOUT:?}); start one with `nefele up`, or run the program under `nefele run`")]
    NoProcmgr { node: u32, address: String },
    #[error("nothing to wait for: {0}")]
    NoChild(String),
    #[error("no such process: {0}")]
    NoProcess(String),
    #[error("{0}")]
    SpawnFailed(String),
    #[error("procmgrd refused: {0}")]
    Refused(String),
    #[error("procmgrd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("procmgr protocol error: {0}")]
    Protocol(String),
}

/// Where spawned processes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// One process: [`Placement::Any`]; several: [`Placement::Spread`].
    #[default]
    Default,
    /// The caller's node.
    Local,
    /// The given node.
    Node(u32),
    /// Power of two choices on gossiped load per core.
    Any,
    /// Each to the least loaded node, counting those just placed.
    Spread,
}

/// A finished process: its global pid and POSIX wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exited {
    pub pid: GlobalPid,
    pub status: i32,
}

/// The caller's side of procmgr.
pub struct ProcClient {
    mailbox: Mailbox,
    service: Address,
    me: u64,
    next_id: u64,
    found: bool,
    buf: Vec<u8>,
}

impl ProcClient {
    /// Talks to the procmgrd of the node whose fabricd listens at `socket`.
    pub fn open_at(socket: &std::path::Path) -> Result<ProcClient, ProcError> {
        Self::with_mailbox(Mailbox::open_at(socket)?)
    }

    /// Talks to the procmgrd of the local node (default fabricd socket).
    pub fn open() -> Result<ProcClient, ProcError> {
        Self::with_mailbox(Mailbox::open()?)
    }

    fn with_mailbox(mailbox: Mailbox) -> Result<ProcClient, ProcError> {
        let port = mailbox.port();
        // A process Nefele started knows its global pid; any other caller is
        // known by its mailbox, in a range no procmgrd gives out.
        let me = std::env::var(PID_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or((0xffffu64 << 48) | port.port as u64);
        Ok(ProcClient {
            service: service_address(port.node),
            mailbox,
            me,
            next_id: 1,
            found: false,
            buf: Vec::new(),
        })
    }

    /// The caller's own global pid (or its stand-in when Nefele did not
    /// start it).
    pub fn me(&self) -> u64 {
        self.me
    }

    /// Starts `count` copies of `path` with `argv` (argv[0] included) and
    /// extra `env` entries (`KEY=value`), placed by default: one process
    /// by power of two choices, several spread over the nodes.
    pub fn spawn(
        &mut self,
        path: &str,
        argv: &[String],
        env: &[String],
        count: u32,
    ) -> Result<Vec<GlobalPid>, ProcError> {
        self.spawn_placed(path, argv, env, count, Placement::Default)
    }

    /// [`ProcClient::spawn`] with an explicit placement.
    pub fn spawn_placed(
        &mut self,
        path: &str,
        argv: &[String],
        env: &[String],
        count: u32,
        placement: Placement,
    ) -> Result<Vec<GlobalPid>, ProcError> {
        self.spawn_limited(path, argv, env, count, placement, None)
    }

    /// [`ProcClient::spawn_placed`] with per-process limits (cgroup v1 on
    /// the node each process runs on); a limit that cannot be applied fails
    /// the spawn.
    pub fn spawn_limited(
        &mut self,
        path: &str,
        argv: &[String],
        env: &[String],
        count: u32,
        placement: Placement,
        limits: Option<proto::Limits>,
    ) -> Result<Vec<GlobalPid>, ProcError> {
        let (placement, node) = match placement {
            Placement::Default => (proto::Placement::Default, 0),
            Placement::Local => (proto::Placement::Local, 0),
            Placement::Node(n) => (proto::Placement::Node, n),
            Placement::Any => (proto::Placement::Any, 0),
            Placement::Spread => (proto::Placement::Spread, 0),
        };
        let req = proto::Spawn {
            path: path.into(),
            argv: argv.to_vec(),
            env: env.to_vec(),
            cwd: String::new(),
            count,
            parent: self.me,
            placement: placement as i32,
            node,
            origin: 0,
            limits,
        };
        match self.call(request::Body::Spawn(req), Some(CALL_TIMEOUT))? {
            response::Body::Spawned(s) => Ok(s.pids.into_iter().map(GlobalPid).collect()),
            other => Err(unexpected(other)),
        }
    }

    /// Waits for `pid`, or any child of the caller if `pid` is `None`.
    /// With `nohang`, returns `None` at once if nothing has exited yet.
    pub fn wait(
        &mut self,
        pid: Option<GlobalPid>,
        nohang: bool,
    ) -> Result<Option<Exited>, ProcError> {
        let req = proto::Wait {
            pid: pid.map_or(0, |p| p.0),
            parent: self.me,
            nohang,
        };
        match self.call(request::Body::Wait(req), None)? {
            response::Body::Waited(w) if w.pid == 0 => Ok(None),
            response::Body::Waited(w) => Ok(Some(Exited {
                pid: GlobalPid(w.pid),
                status: w.status,
            })),
            other => Err(unexpected(other)),
        }
    }

    /// Sends `signal` to `pid`.
    pub fn kill(&mut self, pid: GlobalPid, signal: i32) -> Result<(), ProcError> {
        match self.call(
            request::Body::Kill(proto::Kill { pid: pid.0, signal }),
            Some(CALL_TIMEOUT),
        )? {
            response::Body::Ok(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Captured output of `pid` (on any node): bytes of `stream` (1:
    /// stdout, 2: stderr) from `offset`. The chunk says where its data
    /// starts (later than `offset` if older bytes were dropped) and whether
    /// the stream has ended.
    pub fn logs(
        &mut self,
        pid: GlobalPid,
        stream: u32,
        offset: u64,
    ) -> Result<proto::LogChunk, ProcError> {
        let req = proto::Logs {
            pid: pid.0,
            stream,
            offset,
            max_bytes: 0,
        };
        match self.call(request::Body::Logs(req), Some(CALL_TIMEOUT))? {
            response::Body::LogChunk(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// The processes the procmgrd of `node` tracks.
    pub fn list_on(&mut self, node: u32) -> Result<Vec<proto::ProcessInfo>, ProcError> {
        let own = std::mem::replace(&mut self.service, service_address(node));
        let found = std::mem::replace(&mut self.found, false);
        let listed = self.list();
        self.service = own;
        self.found = found;
        listed
    }

    /// The cluster's live nodes (just this one on a single node).
    pub fn live_nodes(&mut self) -> Result<Vec<u32>, ProcError> {
        let list = self.mailbox.nodes()?;
        let mut nodes: Vec<u32> = list
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.node)
            .collect();
        if nodes.is_empty() {
            nodes.push(self.mailbox.port().node);
        }
        nodes.sort_unstable();
        Ok(nodes)
    }

    /// The processes the node's procmgrd tracks.
    pub fn list(&mut self) -> Result<Vec<proto::ProcessInfo>, ProcError> {
        match self.call(request::Body::List(proto::List {}), Some(CALL_TIMEOUT))? {
            response::Body::Listed(l) => Ok(l.processes),
            other => Err(unexpected(other)),
        }
    }

    fn call(
        &mut self,
        body: request::Body,
        timeout: Option<Duration>,
    ) -> Result<response::Body, ProcError> {
        if !self.found {
            if !self.mailbox.service_exists(&self.service, FIND_TIMEOUT)? {
                return Err(ProcError::NoProcmgr {
                    node: self.mailbox.port().node,
                    address: self.service.to_string(),
                });
            }
            self.found = true;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.mailbox.send(
            &self.service,
            &proto::Request {
                id,
                body: Some(body),
                from_procmgr: false,
            }
            .encode_to_vec(),
        )?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.mailbox.recv_into(&mut self.buf, deadline)?.is_none() {
                return Err(ProcError::Timeout(timeout.unwrap_or_default()));
            }
            let resp = proto::Response::decode(&self.buf[..])
                .map_err(|e| ProcError::Protocol(e.to_string()))?;
            if resp.id != id {
                continue; // a late answer to a call that timed out
            }
            return match resp.body {
                Some(response::Body::Error(e)) => Err(
                    match ErrorCode::try_from(e.code).unwrap_or(ErrorCode::ErrorUnspecified) {
                        ErrorCode::ErrorNoChild => ProcError::NoChild(e.message),
                        ErrorCode::ErrorNoProcess => ProcError::NoProcess(e.message),
                        ErrorCode::ErrorSpawnFailed => ProcError::SpawnFailed(e.message),
                        _ => ProcError::Refused(e.message),
                    },
                ),
                Some(b) => Ok(b),
                None => Err(ProcError::Protocol("empty response".into())),
            };
        }
    }
}

fn unexpected(b: response::Body) -> ProcError {
    ProcError::Protocol(format!("unexpected response {b:?}"))
}
