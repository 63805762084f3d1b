//! The tokio variant of [`Mailbox`](crate::Mailbox).
//!
//! Each operation runs the blocking one on tokio's blocking pool, so an
//! async task never stalls its worker thread. One operation runs at a time
//! per mailbox (they share it behind a mutex); open one mailbox per
//! concurrent receiver.
//!
//! [`PollableMailbox`] needs no blocking thread: a pollable mailbox
//! receives on its eBPF socket, which tokio's reactor watches, and on
//! rings (messages from other nodes), whose wake-ups reach the reactor
//! through an io_uring futex wait.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Address, Error, Mailbox, Message, PortId, Result, ToAddress};

/// An async handle on a mailbox; clones share it.
#[derive(Clone)]
pub struct AsyncMailbox {
    inner: Arc<Mutex<Mailbox>>,
}

impl From<Mailbox> for AsyncMailbox {
    fn from(m: Mailbox) -> Self {
        AsyncMailbox {
            inner: Arc::new(Mutex::new(m)),
        }
    }
}

impl AsyncMailbox {
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Mailbox) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut m = inner.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut m)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(format!("mailbox task failed: {e}"))))?
    }

    fn address(a: impl ToAddress) -> Result<Address> {
        Ok(a.to_address()?)
    }

    pub async fn port(&self) -> Result<PortId> {
        self.run(|m| Ok(m.port())).await
    }

    pub async fn bind(&self, address: impl ToAddress) -> Result<()> {
        let a = Self::address(address)?;
        self.run(move |m| m.bind(a)).await
    }

    pub async fn send(&self, to: impl ToAddress, data: Vec<u8>) -> Result<()> {
        let a = Self::address(to)?;
        self.run(move |m| m.send(a, &data)).await
    }

    pub async fn recv(&self) -> Result<Message> {
        self.run(|m| m.recv()).await
    }

    pub async fn recv_timeout(&self, timeout: Duration) -> Result<Option<Message>> {
        self.run(move |m| m.recv_timeout(timeout)).await
    }

    pub async fn service_exists(&self, address: impl ToAddress, timeout: Duration) -> Result<bool> {
        let a = Self::address(address)?;
        self.run(move |m| m.service_exists(a, timeout)).await
    }
}

/// The socket of a pollable mailbox, for tokio's reactor (the mailbox owns
/// it and outlives this).
struct SocketFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for SocketFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// A pollable mailbox ([`Mailbox::open_pollable`]) for tokio: a receive
/// waits through tokio's reactor, with no blocking thread, on the two ways
/// messages come in: the mailbox's eBPF socket (senders on this node), and
/// its doorbell futex, which senders through rings (other nodes) and the
/// daemon's control events wake; an io_uring `FUTEX_WAIT`
/// ([`fabric::uring::FutexWatch`]) makes that wake a readable fd.
pub struct PollableMailbox {
    // Dropped before `inner`, which owns the socket and the doorbell
    // (fields drop in order).
    socket: tokio::io::unix::AsyncFd<SocketFd>,
    doorbell: tokio::io::unix::AsyncFd<fabric::uring::FutexWatch>,
    inner: Mailbox,
}

impl PollableMailbox {
    /// Wraps a pollable mailbox; must be called inside a tokio runtime.
    pub fn new(mailbox: Mailbox) -> Result<PollableMailbox> {
        let fd = mailbox.pollable_fd().ok_or_else(|| {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a pollable mailbox: open it with Mailbox::open_pollable",
            ))
        })?;
        // SAFETY: the mailbox owns the socket behind `fd` and lives in the
        // same struct, declared after the AsyncFd: it is dropped after it,
        // so the fd stays open and the same for the AsyncFd's whole life.
        let socket = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                SocketFd(fd),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| Error::Io(e.into_parts().1))?;
        let watch = fabric::uring::FutexWatch::new().map_err(Error::Io)?;
        // SAFETY: the watch owns its ring's fd, which stays open and the
        // same until the watch is dropped, and the AsyncFd owns the watch.
        let doorbell = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(watch, tokio::io::Interest::READABLE)
        }
        .map_err(|e| Error::Io(e.into_parts().1))?;
        Ok(PollableMailbox {
            socket,
            doorbell,
            inner: mailbox,
        })
    }

    /// The next message.
    pub async fn recv(&mut self) -> Result<Message> {
        loop {
            if let Some(m) = self.inner.try_recv()? {
                return Ok(m);
            }
            // Announce the sleep (ring senders and the daemon then wake the
            // doorbell's futex), queue the futex wait, and look once more:
            // a message that came in between is seen here, any later one
            // wakes the futex or the socket. Dropping `parked` (also when
            // this future is dropped) ends the sleep.
            let parked = self.inner.inner.park();
            self.doorbell
                .get_mut()
                .arm(parked.word(), parked.seen())
                .map_err(Error::Io)?;
            if let Some(m) = self.inner.try_recv()? {
                return Ok(m);
            }
            // Readiness is cleared before looking again: a message arriving
            // after the look raises it anew.
            tokio::select! {
                ready = self.socket.readable() => ready.map_err(Error::Io)?.clear_ready(),
                ready = self.doorbell.readable_mut() => {
                    let mut ready = ready.map_err(Error::Io)?;
                    ready.get_inner_mut().reap();
                    ready.clear_ready();
                }
            }
            drop(parked);
        }
    }

    /// The mailbox, for everything else (bind, send, lookups).
    pub fn mailbox(&mut self) -> &mut Mailbox {
        &mut self.inner
    }
}
