//! `uds-broker`: the design the eBPF path replaces. Every message goes from
//! the sender to a broker over a Unix stream socket and from the broker to
//! the receiver over another, framed with the fabric's wire header; the
//! broker reads the destination from the header, as `fabricd` would if it
//! relayed messages. The eBPF path makes that hop in the kernel instead.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use fabric::wire::{WireHeader, WirePort, WIRE_HEADER_BYTES};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use zerocopy::{FromBytes, IntoBytes};

use crate::endpoint::{Endpoint, PEER_TIMEOUT};

/// The broker's own address: a client's first frame goes to it and says
/// which port the client is.
const BROKER: WirePort = WirePort { node: 0, port: 0 };

/// Runs a broker for the two clients that connect to `listener`, until
/// either hangs up; pinned to `core` if given.
pub fn start(listener: UnixListener, core: Option<usize>) -> JoinHandle<Result<()>> {
    std::thread::spawn(move || -> Result<()> {
        if let Some(c) = core {
            crate::pin(c)?;
        }
        let mut clients: Vec<(WirePort, UnixStream)> = Vec::new();
        while clients.len() < 2 {
            let (mut s, _) = listener.accept()?;
            let (hello, _) = read_frame(&mut s, &mut Vec::new())?;
            if hello.dst != BROKER {
                bail!("a broker client must say hello first");
            }
            clients.push((hello.src, s));
        }
        let mut payload = Vec::new();
        let mut frame = Vec::new();
        loop {
            let mut fds: Vec<PollFd> = clients
                .iter()
                .map(|(_, s)| PollFd::new(s.as_fd(), PollFlags::POLLIN))
                .collect();
            let ms =
                PollTimeout::try_from(PEER_TIMEOUT.as_millis() as u64).unwrap_or(PollTimeout::MAX);
            if poll(&mut fds, ms)? == 0 {
                bail!("broker: no traffic for {PEER_TIMEOUT:?}");
            }
            let ready: Vec<usize> = fds
                .iter()
                .enumerate()
                .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(i, _)| i)
                .collect();
            drop(fds);
            for i in ready {
                let h = match read_frame(&mut clients[i].1, &mut payload) {
                    Ok((h, _)) => h,
                    Err(_) => return Ok(()), // a client hung up: the run is over
                };
                let Some(to) = clients.iter().position(|(p, _)| *p == h.dst) else {
                    bail!("broker: no client has port {}", h.dst.port);
                };
                frame.clear();
                frame.extend_from_slice(h.as_bytes());
                frame.extend_from_slice(&payload);
                clients[to].1.write_all(&frame)?;
            }
        }
    })
}

fn read_frame(s: &mut UnixStream, payload: &mut Vec<u8>) -> Result<(WireHeader, usize)> {
    let mut h = [0u8; WIRE_HEADER_BYTES];
    s.read_exact(&mut h)?;
    let h = WireHeader::read_from_bytes(&h[..]).expect("exact size");
    if !h.is_valid() {
        bail!("broker: not a wire header");
    }
    payload.resize(h.len as usize, 0);
    s.read_exact(payload)?;
    Ok((h, h.len as usize))
}

/// A client of the broker talking to one peer port.
pub struct BrokerEnd {
    stream: UnixStream,
    me: WirePort,
    peer: WirePort,
    frame: Vec<u8>,
}

impl BrokerEnd {
    pub fn connect(path: &std::path::Path, me: u32, peer: u32) -> Result<BrokerEnd> {
        let stream =
            UnixStream::connect(path).with_context(|| format!("broker at {}", path.display()))?;
        let me = WirePort { node: 1, port: me };
        let mut end = BrokerEnd {
            stream,
            me,
            peer: BROKER,
            frame: Vec::new(),
        };
        end.send(&[])?;
        end.peer = WirePort {
            node: 1,
            port: peer,
        };
        Ok(end)
    }
}

impl Endpoint for BrokerEnd {
    #[inline]
    fn send(&mut self, msg: &[u8]) -> Result<()> {
        let h = WireHeader::new(self.me, self.peer, 0, msg.len() as u32, 0, 0);
        self.frame.clear();
        self.frame.extend_from_slice(h.as_bytes());
        self.frame.extend_from_slice(msg);
        self.stream.write_all(&self.frame)?;
        Ok(())
    }
    #[inline]
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        read_frame(&mut self.stream, buf)?;
        Ok(())
    }
}
