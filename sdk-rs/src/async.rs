//! The tokio variant of [`Mailbox`](crate::Mailbox).
//!
//! Each operation runs the blocking one on tokio's blocking pool, so an
//! async task never stalls its worker thread. One operation runs at a time
//! per mailbox (they share it behind a mutex); open one mailbox per
//! concurrent receiver. A pollable-fd path that needs no blocking thread
//! comes with the eBPF socket transport.

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
