//! The store directory: checkpoint files, written so that none is ever seen half
//! written or overwritten, and the index that lists them.
//!
//! ```text
//!  DIR/index.json          the index (JSON, written atomically: index.json.tmp, fsync,
//!                          rename, fsync DIR)
//!  DIR/<name>.ckpt         a committed checkpoint (format: super::format)
//!  DIR/<name>.tmp          a checkpoint written and synced, not committed yet; removed
//!                          when the source does not COMMIT, and at start-up
//! ```
//!
//! A checkpoint is written to `<name>.tmp` and fsynced before the store says READY, so
//! READY means "it is on disk"; it becomes `<name>.ckpt` (and enters the index) only when
//! the source sends COMMIT, so a checkpoint exists only once its source committed it.
//! The final name is made with `link(2)`, which fails if the name exists: a checkpoint
//! is never overwritten. Names are `<image>-<n>`, `n` one counter for the directory kept
//! in the index and bumped before the file is written, so a name is never given twice,
//! even to a checkpoint that was never committed.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::format::{self, Checkpoint, FormatError};

/// Index file name.
pub const INDEX: &str = "index.json";
/// Index format version.
pub const INDEX_VERSION: u32 = 1;

/// One committed checkpoint, as the index lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Checkpoint name.
    pub name: String,
    /// Guest image.
    pub image: String,
    /// Guest start arguments.
    pub args: String,
    /// Guest memory bytes.
    pub mem_bytes: u64,
    /// Migrations before the snapshot.
    pub migrations: u64,
    /// Guest time at the snapshot (ns).
    pub guest_time_ns: u64,
    /// When it was written (UTC, `YYYY-MM-DDTHH:MM:SSZ`).
    pub created: String,
    /// The same, Unix seconds.
    pub created_unix: u64,
    /// The hypervisor that sent it (`ip:port`).
    pub source_peer: String,
    /// File name in the directory.
    pub file: String,
    /// File bytes.
    pub file_bytes: u64,
    /// SHA-256 of the guest memory at the snapshot (hex).
    pub memory_sha256: String,
}

/// The index file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// [`INDEX_VERSION`].
    pub version: u32,
    /// The next checkpoint number (never decreases).
    pub next: u64,
    /// Committed checkpoints, oldest first.
    pub checkpoints: Vec<Entry>,
}

/// Why loading a checkpoint failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// Not in the index.
    NotFound(String),
    /// In the index but its file is unreadable or missing.
    Io(String, String),
    /// The file failed verification.
    Damaged(String, FormatError),
    /// The file is a valid checkpoint, but not this one.
    Foreign(String, String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(n) => write!(f, "no checkpoint named {n}"),
            Self::Io(n, e) => write!(f, "checkpoint {n} cannot be read: {e}"),
            Self::Damaged(n, e) => write!(f, "checkpoint {n} is damaged: {e}"),
            Self::Foreign(n, why) => write!(f, "checkpoint {n} is damaged: {why}"),
        }
    }
}

/// A checkpoint written to `<name>.tmp` and synced, waiting for COMMIT. Dropped without
/// [`Store::commit`], its file is removed.
#[derive(Debug)]
pub struct Pending {
    tmp: PathBuf,
    /// The index entry it will get (created and peer filled in).
    pub entry: Entry,
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A store directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    index: Index,
    /// Largest guest memory accepted (bytes).
    pub max_mem: u64,
}

fn io(p: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", p.display())
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

/// Unix seconds now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    /// Default memory limit: 4 GiB.
    pub const DEFAULT_MAX_MEM: u64 = 4 << 30;

    /// Opens (creating it if needed) the store in `dir`: reads the index and removes
    /// uncommitted `.tmp` files left by an earlier run. Returns the store and what it
    /// cleaned up.
    pub fn open(dir: &Path) -> Result<(Self, Vec<String>), String> {
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let path = dir.join(INDEX);
        let index = match fs::read(&path) {
            Ok(b) => {
                let i: Index = serde_json::from_slice(&b)
                    .map_err(|e| format!("{}: not a store index: {e}", path.display()))?;
                if i.version != INDEX_VERSION {
                    return Err(format!(
                        "{}: index version {} (this is {INDEX_VERSION})",
                        path.display(),
                        i.version
                    ));
                }
                i
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index {
                version: INDEX_VERSION,
                next: 1,
                checkpoints: Vec::new(),
            },
            Err(e) => return Err(io(&path, e)),
        };
        let mut cleaned = Vec::new();
        for e in fs::read_dir(dir).map_err(|e| io(dir, e))?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".tmp") && fs::remove_file(e.path()).is_ok() {
                cleaned.push(n);
            }
        }
        Ok((
            Self {
                dir: dir.to_path_buf(),
                index,
                max_mem: Self::DEFAULT_MAX_MEM,
            },
            cleaned,
        ))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The committed checkpoints, oldest first.
    pub fn list(&self) -> &[Entry] {
        &self.index.checkpoints
    }

    fn save_index(&self) -> Result<(), String> {
        let path = self.dir.join(INDEX);
        let tmp = self.dir.join(format!("{INDEX}.tmp"));
        let json = serde_json::to_vec_pretty(&self.index).map_err(|e| e.to_string())?;
        let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(&json)
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .map_err(|e| io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
        sync_dir(&self.dir)
    }

    /// Draws the next name for a checkpoint of `image` (`<image>-<n>`) and records the
    /// counter, so the name is never given again.
    fn next_name(&mut self, image: &str) -> Result<String, String> {
        loop {
            let n = self.index.next;
            self.index.next += 1;
            // The image name is at most 32 characters: the name fits 64.
            let name = format!("{image}-{n}");
            let taken = self.index.checkpoints.iter().any(|e| e.name == name)
                || self.dir.join(format!("{name}.ckpt")).exists();
            if !taken {
                self.save_index()?;
                return Ok(name);
            }
        }
    }

    /// Names `c` (its `name` is set here), writes it to `<name>.tmp` and syncs it. The
    /// checkpoint is not visible until [`Store::commit`].
    pub fn write_pending(&mut self, c: &mut Checkpoint, peer: &str) -> Result<Pending, String> {
        c.name = self.next_name(&c.image)?;
        c.created_unix = now_unix();
        let tmp = self.dir.join(format!("{}.tmp", c.name));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io(&tmp, e))?;
        let mut pending = Pending {
            tmp: tmp.clone(),
            entry: Entry {
                name: c.name.clone(),
                image: c.image.clone(),
                args: c.args.clone(),
                mem_bytes: c.mem.len() as u64,
                migrations: c.migrations,
                guest_time_ns: c.time_ns,
                created: format::utc(c.created_unix),
                created_unix: c.created_unix,
                source_peer: peer.to_string(),
                file: format!("{}.ckpt", c.name),
                file_bytes: 0,
                memory_sha256: String::new(),
            },
            done: false,
        };
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let written = format::encode(c, &mut w).map_err(|e| io(&tmp, e))?;
        let f = w.into_inner().map_err(|e| io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
        pending.entry.file_bytes = written.bytes;
        pending.entry.memory_sha256 = format::hex(&written.memory_sha256);
        Ok(pending)
    }

    /// Makes a pending checkpoint final: `<name>.ckpt` (never replacing a file of that
    /// name) and an index entry. Returns the entry.
    pub fn commit(&mut self, mut p: Pending) -> Result<Entry, String> {
        let path = self.dir.join(&p.entry.file);
        fs::hard_link(&p.tmp, &path).map_err(|e| io(&path, e))?;
        p.done = true;
        let _ = fs::remove_file(&p.tmp);
        sync_dir(&self.dir)?;
        let entry = p.entry.clone();
        self.index.checkpoints.push(entry.clone());
        self.save_index()?;
        Ok(entry)
    }

    /// Loads checkpoint `name` and verifies it entirely (format, SHA-256, that it is
    /// the checkpoint the index lists under that name).
    pub fn load(&self, name: &str) -> Result<(Checkpoint, Entry), LoadError> {
        let entry = self
            .index
            .checkpoints
            .iter()
            .find(|e| e.name == name && format::valid_name(name))
            .ok_or_else(|| LoadError::NotFound(name.to_string()))?;
        let path = self.dir.join(&entry.file);
        let len = fs::metadata(&path)
            .map_err(|e| LoadError::Io(name.to_string(), e.to_string()))?
            .len();
        // Bounded before reading: the largest file a guest of max_mem can give.
        let most = self.max_mem + self.max_mem / (8 * 4096) + 64 * 1024;
        if len > most {
            return Err(LoadError::Damaged(
                name.to_string(),
                FormatError::Length {
                    have: len,
                    want: None,
                },
            ));
        }
        let bytes = fs::read(&path).map_err(|e| LoadError::Io(name.to_string(), e.to_string()))?;
        let c = format::decode(&bytes, self.max_mem)
            .map_err(|e| LoadError::Damaged(name.to_string(), e))?;
        if c.name != name {
            return Err(LoadError::Foreign(
                name.to_string(),
                format!("its file holds checkpoint {}", c.name),
            ));
        }
        let sha = format::hex(&format::memory_sha256(&c.mem));
        if sha != entry.memory_sha256 || c.mem.len() as u64 != entry.mem_bytes {
            return Err(LoadError::Foreign(
                name.to_string(),
                "its memory is not the one the index records".into(),
            ));
        }
        Ok((c, entry.clone()))
    }
}

/// The index as a table, for people.
pub fn table(entries: &[Entry]) -> String {
    let mut s = format!(
        "{:<24} {:<12} {:>10} {:>5} {:>14} {:<20} {:<21} {:>10}  {:<16}  ARGS\n",
        "NAME", "IMAGE", "MEM", "MIGR", "GUEST-TIME-MS", "CREATED", "SOURCE", "FILE", "MEM-SHA256"
    );
    for e in entries {
        s.push_str(&format!(
            "{:<24} {:<12} {:>10} {:>5} {:>14} {:<20} {:<21} {:>10}  {:<16}  {}\n",
            e.name,
            e.image,
            e.mem_bytes,
            e.migrations,
            e.guest_time_ns / 1_000_000,
            e.created,
            e.source_peer,
            e.file_bytes,
            &e.memory_sha256[..e.memory_sha256.len().min(16)],
            e.args
        ));
    }
    s
}
