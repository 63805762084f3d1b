//! The tokio variant of [`Mailbox`](crate::Mailbox).
//!
//! Each operation runs the blocking one on tokio's blocking pool, so an
//! async task never stalls its worker thread. One operation runs at a time
//! per mailbox (they share it behind a mutex); open one mailbox per
//! concurrent receiver.
//!
//! [`PollableMailbox`] needs no blocking thread: tokio's reactor watches a
//! pollable mailbox's fd, which turns readable for messages on its eBPF
//! socket and on its rings (from other nodes) alike.

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

/// The fd of a pollable mailbox, for tokio's reactor (the mailbox owns
/// it and outlives this).
struct PollableFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for PollableFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// A pollable mailbox ([`Mailbox::open_pollable`]) for tokio: a receive
/// waits through tokio's reactor, with no blocking thread, on the mailbox's
/// [`Mailbox::pollable_fd`], which turns readable for messages on its eBPF
/// socket (senders on this node) and for wakes of its doorbell futex
/// (rings from other nodes, control events; an io_uring `FUTEX_WAIT`
/// turns those into readiness).
pub struct PollableMailbox {
    // Dropped before `inner`, which owns the fd (fields drop in order).
    fd: tokio::io::unix::AsyncFd<PollableFd>,
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
        // SAFETY: the mailbox owns the fd and lives in the same struct,
        // declared after the AsyncFd: it is dropped after it, so the fd
        // stays open and the same for the AsyncFd's whole life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                PollableFd(fd),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| Error::Io(e.into_parts().1))?;
        Ok(PollableMailbox { fd, inner: mailbox })
    }

    /// The next message.
    pub async fn recv(&mut self) -> Result<Message> {
        loop {
            // A receive that finds nothing arms the fd: a message that
            // comes in after it makes the fd readable.
            if let Some(m) = self.inner.try_recv()? {
                return Ok(m);
            }
            // Cleared before looking again: a message arriving after the
            // look raises readiness anew.
            let mut ready = self.fd.readable().await.map_err(Error::Io)?;
            ready.clear_ready();
        }
    }

    /// The mailbox, for everything else (bind, send, lookups).
    pub fn mailbox(&mut self) -> &mut Mailbox {
        &mut self.inner
    }
}
