//! Binary shipping: a node asked to start a program it does not have
//! fetches it from the node that placed the spawn, into a
//! content-addressed cache, so a cluster needs no shared filesystem.
//!
//! Both halves are driven by procmgrd's loop, one message at a time (no
//! thread, no blocking wait): [`Source`] answers `Fetch` requests with
//! chunks of a local file, naming in each the whole file's SHA-256 (hashed
//! once per file version); [`Fetching`] takes the chunks on the other side.
//! The first chunk's hash is looked up in the [`Cache`] — a hit ends the
//! transfer there — and otherwise the chunks go to a temporary file that is
//! checked against hash and size, made executable and renamed to
//! `<cache>/<sha256>`: a file under its hash's name is always whole.
//!
//! Only the executable travels. The shared libraries it loads must exist
//! on the target node (ship static binaries, or programs whose libraries
//! are installed everywhere).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::proto::BinaryChunk;

/// Most bytes one chunk carries (one fabric message each).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Largest program that is shipped.
pub const MAX_BINARY_BYTES: u64 = 1 << 30;
/// Bytes the cache may hold; beyond that the least recently shipped files
/// go (a running program keeps its file open, so removing it is safe).
pub const MAX_CACHE_BYTES: u64 = 4 << 30;
/// Files whose hash a [`Source`] remembers.
pub const MAX_REMEMBERED_HASHES: usize = 256;
/// The cache directory when neither `--cache-dir` nor [`CACHE_DIR_ENV`] says
/// otherwise and procmgrd runs as root (others: `~/.cache/nefele/bin`).
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/nefele/bin";
/// Environment variable naming the cache directory.
pub const CACHE_DIR_ENV: &str = "NEFELE_CACHE_DIR";

/// A SHA-256 digest.
pub type Sha256 = [u8; 32];

/// `sha` in lowercase hex: the cached file's name.
pub fn hex(sha: &Sha256) -> String {
    sha.iter().map(|b| format!("{b:02x}")).collect()
}

/// The file exec would run for `path` on this node (relative to `cwd` if
/// it is relative, searched in `$PATH` if it has no '/'), if there is one.
pub fn locate(path: &str, cwd: &str) -> Option<PathBuf> {
    if path.contains('/') {
        let p = Path::new(path);
        let full = if p.is_absolute() || cwd.is_empty() {
            p.to_path_buf()
        } else {
            Path::new(cwd).join(p)
        };
        return full.is_file().then_some(full);
    }
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .map(|d| d.join(path))
        .find(|c| c.is_file())
}

/// Which version of a file a remembered hash belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileVersion {
    fn of(m: &fs::Metadata) -> FileVersion {
        FileVersion {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

/// The sending side: chunks of local programs.
#[derive(Default)]
pub struct Source {
    hashes: HashMap<PathBuf, (FileVersion, Sha256)>,
}

impl Source {
    /// At most `max_bytes` (0: [`CHUNK_BYTES`]) of the program `path` from
    /// `offset`, or why it cannot be shipped.
    pub fn chunk(
        &mut self,
        path: &str,
        cwd: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<BinaryChunk, String> {
        let full = locate(path, cwd).ok_or_else(|| format!("{path} is not here either"))?;
        let file = File::open(&full).map_err(|e| format!("{}: {e}", full.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("{}: {e}", full.display()))?;
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(format!("{} is not executable", full.display()));
        }
        if meta.size() > MAX_BINARY_BYTES {
            return Err(format!(
                "{} has {} bytes; at most {MAX_BINARY_BYTES} are shipped",
                full.display(),
                meta.size()
            ));
        }
        let version = FileVersion::of(&meta);
        let sha256 = match self.hashes.get(&full) {
            Some((v, sha)) if *v == version => *sha,
            _ => {
                let sha = hash_file(&file).map_err(|e| format!("{}: {e}", full.display()))?;
                if self.hashes.len() >= MAX_REMEMBERED_HASHES {
                    self.hashes.clear();
                }
                self.hashes.insert(full.clone(), (version, sha));
                sha
            }
        };
        let want = match max_bytes as usize {
            0 => CHUNK_BYTES,
            n => n.min(CHUNK_BYTES),
        };
        let len = meta.size().saturating_sub(offset).min(want as u64) as usize;
        let mut data = vec![0; len];
        file.read_exact_at(&mut data, offset)
            .map_err(|e| format!("{}: {e}", full.display()))?;
        Ok(BinaryChunk {
            sha256: sha256.to_vec(),
            size: meta.size(),
            offset,
            data,
        })
    }
}

fn hash_file(mut file: &File) -> std::io::Result<Sha256> {
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0; 256 << 10];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(hasher.finalize().into()),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// The receiving side's store: `<dir>/<sha256 in hex>`, executable.
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// A cache in `dir` (created when the first file arrives).
    pub fn new(dir: impl Into<PathBuf>) -> Cache {
        Cache { dir: dir.into() }
    }

    /// `$NEFELE_CACHE_DIR`, else [`DEFAULT_CACHE_DIR`] for root and
    /// `~/.cache/nefele/bin` for others.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os(CACHE_DIR_ENV) {
            return d.into();
        }
        match std::env::var_os("HOME") {
            Some(home) if !nix::unistd::Uid::effective().is_root() => {
                Path::new(&home).join(".cache/nefele/bin")
            }
            _ => DEFAULT_CACHE_DIR.into(),
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cached file with this hash, if there is one.
    pub fn get(&self, sha: &Sha256) -> Option<PathBuf> {
        let p = self.dir.join(hex(sha));
        p.is_file().then_some(p)
    }

    fn begin(&self, first: &BinaryChunk, sha256: Sha256) -> Result<Incoming, String> {
        if first.size > MAX_BINARY_BYTES {
            return Err(format!(
                "{} bytes; at most {MAX_BINARY_BYTES} are shipped",
                first.size
            ));
        }
        fs::create_dir_all(&self.dir).map_err(|e| {
            format!(
                "cannot create the binary cache {}: {e} (choose one with --cache-dir or ${CACHE_DIR_ENV})",
                self.dir.display()
            )
        })?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temp = self
            .dir
            .join(format!(".{}.{}.{n}.part", hex(&sha256), std::process::id()));
        let file = File::create(&temp).map_err(|e| format!("{}: {e}", temp.display()))?;
        Ok(Incoming {
            sha256,
            size: first.size,
            received: 0,
            hasher: sha2::Sha256::new(),
            file,
            temp,
        })
    }

    /// Removes the least recently shipped files until at most `max_bytes`
    /// remain, never `keep`.
    fn trim(&self, max_bytes: u64, keep: &Path) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            // Temporary files (".…part") are transfers in progress.
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| {
                let m = e.metadata().ok().filter(|m| m.is_file())?;
                Some((m.modified().ok()?, m.size(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, size, path) in files {
            if total <= max_bytes {
                break;
            }
            if path != keep && fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
    }
}

/// A file being received into the cache.
struct Incoming {
    sha256: Sha256,
    size: u64,
    received: u64,
    hasher: sha2::Sha256,
    file: File,
    temp: PathBuf,
}

impl Incoming {
    /// Takes the next chunk; true once the file is complete.
    fn add(&mut self, c: &BinaryChunk) -> Result<bool, String> {
        if c.sha256 != self.sha256 || c.size != self.size {
            return Err("the program changed during the transfer".into());
        }
        if c.offset != self.received {
            return Err(format!(
                "a chunk from offset {} where {} was expected",
                c.offset, self.received
            ));
        }
        if c.data.is_empty() && self.received < self.size {
            return Err(format!(
                "the program ended after {} of {} bytes",
                self.received, self.size
            ));
        }
        self.file
            .write_all(&c.data)
            .map_err(|e| format!("{}: {e}", self.temp.display()))?;
        self.hasher.update(&c.data);
        self.received += c.data.len() as u64;
        Ok(self.received >= self.size)
    }

    /// Checks the whole and moves it to its name in `cache`.
    fn finish(self, cache: &Cache) -> Result<PathBuf, String> {
        let sha: Sha256 = self.hasher.clone().finalize().into();
        if self.received != self.size || sha != self.sha256 {
            return Err(format!(
                "the received program ({} bytes, sha256 {}) is not the one announced ({} bytes, sha256 {})",
                self.received,
                hex(&sha),
                self.size,
                hex(&self.sha256)
            ));
        }
        let io = |e: std::io::Error| format!("{}: {e}", self.temp.display());
        self.file.sync_all().map_err(io)?;
        fs::set_permissions(&self.temp, fs::Permissions::from_mode(0o755)).map_err(io)?;
        let dest = cache.dir.join(hex(&self.sha256));
        fs::rename(&self.temp, &dest).map_err(io)?;
        cache.trim(MAX_CACHE_BYTES, &dest);
        Ok(dest)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // After `finish` the temporary name is gone already.
        let _ = fs::remove_file(&self.temp);
    }
}

/// One program being fetched: feed it the chunks as they arrive.
#[derive(Default)]
pub struct Fetching {
    incoming: Option<Incoming>,
}

impl Fetching {
    /// The offset to ask for next.
    pub fn next_offset(&self) -> u64 {
        self.incoming.as_ref().map_or(0, |i| i.received)
    }

    /// Takes a chunk: `Some(path)` once the program is in `cache` (at the
    /// first chunk if it was there already), `None` while more is needed.
    pub fn take(&mut self, cache: &Cache, c: &BinaryChunk) -> Result<Option<PathBuf>, String> {
        if self.incoming.is_none() {
            let sha: Sha256 = c.sha256.as_slice().try_into().map_err(|_| {
                format!("a chunk names a {}-byte hash, not SHA-256", c.sha256.len())
            })?;
            if let Some(cached) = cache.get(&sha) {
                return Ok(Some(cached));
            }
            self.incoming = Some(cache.begin(c, sha)?);
        }
        let incoming = self.incoming.as_mut().expect("set above");
        if !incoming.add(c)? {
            return Ok(None);
        }
        let done = self.incoming.take().expect("set above");
        done.finish(cache).map(Some)
    }

    /// The hash of the program, once the first chunk named it.
    pub fn sha256(&self) -> Option<Sha256> {
        self.incoming.as_ref().map(|i| i.sha256)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a whole transfer of `path` with `chunk`-byte chunks.
    fn ship(
        source: &mut Source,
        cache: &Cache,
        path: &str,
        chunk: u32,
    ) -> Result<(PathBuf, usize), String> {
        let mut fetching = Fetching::default();
        for requests in 1..=10_000 {
            let c = source.chunk(path, "", fetching.next_offset(), chunk)?;
            if let Some(p) = fetching.take(cache, &c)? {
                return Ok((p, requests));
            }
        }
        panic!("the transfer did not end");
    }

    fn program(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("prog");
        fs::write(&p, bytes).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn a_program_arrives_whole_under_its_hash_and_executable() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let prog = program(src.path(), &bytes);
        let cache = Cache::new(dst.path().join("cache"));
        let (got, requests) =
            ship(&mut Source::default(), &cache, prog.to_str().unwrap(), 4096).unwrap();
        assert_eq!(requests, 3, "10 000 bytes in 4096-byte chunks");
        assert_eq!(fs::read(&got).unwrap(), bytes);
        let sha: Sha256 = sha2::Sha256::digest(&bytes).into();
        assert_eq!(got, cache.dir().join(hex(&sha)));
        assert_eq!(
            fs::metadata(&got).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // Nothing else is left in the cache (no temporary files).
        assert_eq!(fs::read_dir(cache.dir()).unwrap().count(), 1);

        // The second time the first chunk's hash finds it cached.
        let (again, requests) =
            ship(&mut Source::default(), &cache, prog.to_str().unwrap(), 4096).unwrap();
        assert_eq!((again, requests), (got, 1));
    }

    #[test]
    fn an_empty_program_ships_in_one_chunk() {
        let src = tempfile::tempdir().unwrap();
        let prog = program(src.path(), b"");
        let cache = Cache::new(src.path().join("cache"));
        let (got, requests) =
            ship(&mut Source::default(), &cache, prog.to_str().unwrap(), 0).unwrap();
        assert_eq!(requests, 1);
        assert_eq!(fs::metadata(got).unwrap().len(), 0);
    }

    #[test]
    fn a_program_that_changes_during_the_transfer_is_refused_and_leaves_nothing() {
        let src = tempfile::tempdir().unwrap();
        let prog = program(src.path(), &[1; 5000]);
        let cache = Cache::new(src.path().join("cache"));
        let mut source = Source::default();
        let mut fetching = Fetching::default();
        let path = prog.to_str().unwrap();
        let first = source.chunk(path, "", 0, 4096).unwrap();
        assert_eq!(fetching.take(&cache, &first), Ok(None));
        // Rewritten in place, with another length: a new version.
        fs::write(&prog, [2; 6000]).unwrap();
        let next = source
            .chunk(path, "", fetching.next_offset(), 4096)
            .unwrap();
        let err = fetching.take(&cache, &next).unwrap_err();
        assert!(err.contains("changed during the transfer"), "{err}");
        drop(fetching);
        assert_eq!(fs::read_dir(cache.dir()).unwrap().count(), 0);
    }

    #[test]
    fn corrupted_data_fails_the_hash_check() {
        let src = tempfile::tempdir().unwrap();
        let prog = program(src.path(), &[3; 100]);
        let cache = Cache::new(src.path().join("cache"));
        let mut c = Source::default()
            .chunk(prog.to_str().unwrap(), "", 0, 0)
            .unwrap();
        c.data[50] ^= 1;
        let err = Fetching::default().take(&cache, &c).unwrap_err();
        assert!(err.contains("is not the one announced"), "{err}");
        assert!(cache.get(&c.sha256.clone().try_into().unwrap()).is_none());
    }

    #[test]
    fn what_cannot_be_shipped_says_why() {
        let src = tempfile::tempdir().unwrap();
        let mut source = Source::default();
        let err = source.chunk("/no/such/prog", "", 0, 0).unwrap_err();
        assert!(err.contains("/no/such/prog is not here either"), "{err}");
        let data = src.path().join("data");
        fs::write(&data, b"x").unwrap();
        let err = source.chunk(data.to_str().unwrap(), "", 0, 0).unwrap_err();
        assert!(err.contains("is not executable"), "{err}");
        // Relative paths resolve against the spawn's working directory.
        program(src.path(), b"#!/bin/sh\n");
        let c = source
            .chunk("./prog", src.path().to_str().unwrap(), 0, 0)
            .unwrap();
        assert_eq!(c.data, b"#!/bin/sh\n");
    }

    #[test]
    fn the_cache_keeps_its_bound_dropping_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let p = dir.path().join(name);
            fs::write(&p, [0u8; 100]).unwrap();
            let t =
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(i as u64 + 1);
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        cache.trim(200, &dir.path().join("a"));
        // "a" is kept although oldest; "b" goes first, then the bound holds.
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a", "c"].map(String::from).to_vec());
        cache.trim(150, &dir.path().join("c"));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "a went, c kept"
        );
    }
}
