//! Framing of the control socket: Unix `SOCK_SEQPACKET`, one protobuf
//! message per packet, shared-memory fds attached with `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};

/// Largest control packet, in bytes. Control messages are small; a larger
/// packet is a protocol error.
pub const MAX_PACKET_BYTES: usize = 64 << 10;
/// Most fds attached to one packet.
pub const MAX_FDS_PER_PACKET: usize = 4;

fn seqpacket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Connects to a daemon's control socket.
pub fn connect(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = seqpacket()?;
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// Binds and listens on a control socket path.
pub fn listen(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = seqpacket()?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    socket::listen(&fd, socket::Backlog::new(128)?)?;
    Ok(fd)
}

/// Accepts one connection.
pub fn accept(listener: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let raw = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sends one packet with `fds` attached.
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    let n = socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if n != bytes.len() {
        return Err(std::io::Error::other("short write on a seqpacket socket"));
    }
    Ok(())
}

/// What one receive gave.
pub enum Packet {
    Data {
        len: usize,
        fds: Vec<OwnedFd>,
    },
    /// The peer closed the connection.
    Closed,
    /// Non-blocking receive found nothing.
    Empty,
}

/// Receives one packet into `buf` (resized to [`MAX_PACKET_BYTES`]).
pub fn recv(sock: BorrowedFd<'_>, buf: &mut Vec<u8>, nonblocking: bool) -> std::io::Result<Packet> {
    buf.resize(MAX_PACKET_BYTES, 0);
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_PACKET]);
    let mut iov = [IoSliceMut::new(buf)];
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let msg = match socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
        Ok(m) => m,
        Err(nix::errno::Errno::EAGAIN) => return Ok(Packet::Empty),
        Err(nix::errno::Errno::ECONNRESET) => return Ok(Packet::Closed),
        Err(e) => return Err(e.into()),
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel installed these fds for us just now.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "control packet larger than MAX_PACKET_BYTES",
        ));
    }
    let len = msg.bytes;
    if len == 0 && fds.is_empty() {
        return Ok(Packet::Closed);
    }
    Ok(Packet::Data { len, fds })
}
