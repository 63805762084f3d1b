//! Per-process limits through cgroup v1, the controllers this machine kind
//! mounts (`/sys/fs/cgroup/{memory,pids,cpu}`).
//!
//! Each limited process gets its own group `nefele/<pid>` under every
//! controller it needs a limit from, and joins them between fork and exec
//! (writing `0` to `cgroup.procs` moves the writer), so it never runs a
//! single instruction of its program unlimited. Unlimited spawns skip all
//! of this and keep the fast `posix_spawn` path. A limit that cannot be
//! applied (controller not mounted, no permission, a bad value) fails the
//! spawn with an error that says which and why.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::proto::Limits;

/// Where the v1 controllers are mounted.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// The groups made for one process.
#[derive(Debug, Default, Clone)]
pub struct Groups {
    dirs: Vec<PathBuf>,
    /// `<dir>/cgroup.procs` of each, ready for the child to open.
    procs_files: Vec<CString>,
}

impl Groups {
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Joins every group: runs in the child between fork and exec, so it
    /// only makes async-signal-safe calls (open, write, close).
    pub fn join_from_child(&self) -> std::io::Result<()> {
        for f in &self.procs_files {
            // SAFETY: `f` is a valid NUL-terminated path; open, write and
            // close are async-signal-safe, and the buffer is a static.
            unsafe {
                let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Removes the groups (once the process is gone; a group still holding
    /// processes it started stays).
    pub fn remove(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Makes the groups `limits` needs for process `name` under `root`.
pub fn prepare(root: &Path, name: &str, limits: &Limits) -> Result<Groups, String> {
    let mut wanted: Vec<(&str, &str, String)> = Vec::new();
    if limits.memory_bytes > 0 {
        if limits.memory_bytes < 1 << 20 {
            return Err(format!(
                "memory limit {} bytes: below the 1 MiB a process needs to start",
                limits.memory_bytes
            ));
        }
        wanted.push((
            "memory",
            "memory.limit_in_bytes",
            limits.memory_bytes.to_string(),
        ));
    }
    if limits.pids > 0 {
        wanted.push(("pids", "pids.max", limits.pids.to_string()));
    }
    if limits.cpu_shares > 0 {
        if limits.cpu_shares < 2 {
            return Err("cpu shares: at least 2".into());
        }
        wanted.push(("cpu", "cpu.shares", limits.cpu_shares.to_string()));
    }
    let mut groups = Groups::default();
    for (controller, file, value) in wanted {
        let mount = root.join(controller);
        if !mount.join("cgroup.procs").exists() {
            groups.remove();
            return Err(format!(
                "cannot apply the {controller} limit: no cgroup v1 {controller} controller is mounted at {}",
                mount.display()
            ));
        }
        let dir = mount.join("nefele").join(name);
        let made =
            std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join(file), &value));
        if let Err(e) = made {
            let _ = std::fs::remove_dir(&dir);
            groups.remove();
            return Err(format!(
                "cannot apply the {controller} limit ({file} = {value}) in {}: {e}",
                dir.display()
            ));
        }
        let procs = CString::new(
            dir.join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .map_err(|_| format!("{} has a NUL byte", dir.display()))?;
        groups.dirs.push(dir);
        groups.procs_files.push(procs);
    }
    Ok(groups)
}
