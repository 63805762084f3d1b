//! Memory segments that rings and doorbells live in.
//!
//! A segment is either a memfd (shareable with other processes by passing its
//! fd, which is how `fabricd` hands rings out) or anonymous memory (for the
//! in-process transport). Both are zero-filled when created, which the ring
//! protocol relies on.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{MmapOptions, MmapRaw};

/// A mapped, zero-initialised memory region, unmapped on drop.
pub struct Segment {
    map: MmapRaw,
    fd: Option<OwnedFd>,
}

// SAFETY: the mapping is plain shared memory; all access to its contents
// goes through atomics or through the ring protocol's ownership rules.
unsafe impl Send for Segment {}
// SAFETY: see above.
unsafe impl Sync for Segment {}

impl Segment {
    /// A new memfd of `len` bytes named `name` (visible in /proc/PID/fd).
    pub fn memfd(name: &str, len: usize) -> std::io::Result<Segment> {
        Self::from_fd_with(new_memfd(name, len)?, false)
    }

    /// [`Segment::memfd`] with every page allocated and mapped now: whoever
    /// maps it next only maps pages that exist (for 256 KiB, 0.03-0.05 ms
    /// against 0.17-0.26 ms for the first mapping of fresh pages here:
    /// `examples/ring_mapping`).
    pub fn memfd_populated(name: &str, len: usize) -> std::io::Result<Segment> {
        Self::from_fd_with(new_memfd(name, len)?, true)
    }

    /// Maps a segment received from another process.
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Segment> {
        Self::from_fd_with(fd, false)
    }

    /// Maps a segment received from another process with its pages faulted
    /// in up front (`MAP_POPULATE`), so the hot path never takes a page
    /// fault; used for rings.
    pub fn from_fd_populated(fd: OwnedFd) -> std::io::Result<Segment> {
        Self::from_fd_with(fd, true)
    }

    fn from_fd_with(fd: OwnedFd, populate: bool) -> std::io::Result<Segment> {
        let file = File::from(fd);
        let len = file.metadata()?.len() as usize;
        let mut opts = MmapOptions::new();
        opts.len(len);
        if populate {
            opts.populate();
        }
        let map = opts.map_raw(&file)?;
        Ok(Segment {
            map,
            fd: Some(file.into()),
        })
    }

    /// Anonymous private memory, for mailboxes of one process; faulted in
    /// up front like rings received from another process.
    pub fn anonymous(len: usize) -> std::io::Result<Segment> {
        let map = MmapOptions::new().len(len).populate().map_anon()?.into();
        Ok(Segment { map, fd: None })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The memfd, if this segment has one.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }
}

/// A zero-filled memfd of `len` bytes, closed on exec.
fn new_memfd(name: &str, len: usize) -> std::io::Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let file = File::from(fd);
    file.set_len(len as u64)?;
    Ok(file.into())
}
