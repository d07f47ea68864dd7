//! Appending to the log, rotating segments for snapshots, and the fsync policy.
//!
//! The store appends while it holds its write lock, so entries land in revision order and a
//! write is in the file before anyone can see it; [`Log::append`] is one `write(2)` of an
//! already framed buffer. fsync never runs under the store's lock: `always` waits for it after
//! the lock is released, and concurrent writers share one (the first to arrive syncs what
//! every writer appended so far, the others wait for it: group commit).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::record::{self, Entry, Header};
use super::{FsyncPolicy, WalError, log_path, sync_dir, write_message_frame};

/// Who this log belongs to, written into every segment header.
#[derive(Debug, Clone)]
pub struct Owner {
    pub cluster_id: u64,
    pub member_id: u64,
    pub token: String,
    /// The machine's boot the files are written under (see [`super::record::boot_id`]).
    pub boot_id: String,
}

struct Writer {
    dir: PathBuf,
    owner: Owner,
    file: Arc<File>,
    sequence: u64,
    /// Entries appended by this process: the positions fsync is tracked by.
    appended: u64,
    /// Bytes of log written since the last snapshot began (replayed segments included).
    since_snapshot: u64,
    /// The log size that calls for a snapshot; reported once per crossing.
    snapshot_at: u64,
    snapshot_requested: bool,
    /// Segments left by a rotation that were not synced yet.
    unsynced: Vec<Arc<File>>,
    /// Reused for every entry: the frame is built here, then written in one call.
    buf: Vec<u8>,
}

#[derive(Default)]
struct Synced {
    /// Every entry up to this position is on stable storage.
    position: u64,
    /// A writer is syncing; the others wait for it.
    busy: bool,
}

/// The open log of a running store.
pub struct Log {
    policy: FsyncPolicy,
    min_snapshot_bytes: u64,
    writer: Mutex<Writer>,
    synced: Mutex<Synced>,
    sync_done: Condvar,
}

/// What an append did.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    /// The entry's position, for [`Log::wait_durable`].
    pub position: u64,
    /// The log has just outgrown its snapshot: time to take one.
    pub snapshot_due: bool,
}

impl Log {
    /// Starts segment `sequence` (a new file) after `replayed` bytes of log still not
    /// covered by a snapshot of `snapshot_bytes`.
    pub fn create(
        dir: &Path,
        owner: Owner,
        sequence: u64,
        policy: FsyncPolicy,
        min_snapshot_bytes: u64,
        replayed: u64,
        snapshot_bytes: u64,
    ) -> Result<Self, WalError> {
        let file = create_segment(dir, &owner, sequence, policy)?;
        let writer = Writer {
            dir: dir.to_owned(),
            owner,
            file: Arc::new(file),
            sequence,
            appended: 0,
            since_snapshot: replayed,
            snapshot_at: min_snapshot_bytes.max(snapshot_bytes),
            snapshot_requested: false,
            unsynced: Vec::new(),
            buf: Vec::with_capacity(4096),
        };
        Ok(Self {
            policy,
            min_snapshot_bytes,
            writer: Mutex::new(writer),
            synced: Mutex::new(Synced::default()),
            sync_done: Condvar::new(),
        })
    }

    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    /// Whether a snapshot is due now (e.g. after replaying a long log).
    pub fn snapshot_due(&self) -> bool {
        let writer = self.writer.lock();
        writer.since_snapshot >= writer.snapshot_at
    }

    /// Writes one entry to the current segment. The caller holds the store's write lock.
    pub fn append(&self, entry: &Entry) -> std::io::Result<Appended> {
        let mut writer = self.writer.lock();
        let writer = &mut *writer;
        writer.buf.clear();
        write_message_frame(&mut writer.buf, entry);
        (&*writer.file).write_all(&writer.buf)?;
        writer.appended += 1;
        writer.since_snapshot += writer.buf.len() as u64;
        // A large write must not leave the buffer that size for good.
        if writer.buf.capacity() > 1 << 20 {
            writer.buf = Vec::with_capacity(4096);
        }
        let due = !writer.snapshot_requested && writer.since_snapshot >= writer.snapshot_at;
        writer.snapshot_requested |= due;
        Ok(Appended { position: writer.appended, snapshot_due: due })
    }

    /// With `always`, returns once the entry at `position` is on stable storage; the others
    /// return at once. Called after the store's lock is released.
    pub fn wait_durable(&self, position: u64) -> std::io::Result<()> {
        if self.policy != FsyncPolicy::Always {
            return Ok(());
        }
        self.sync_through(Some(position))
    }

    /// Syncs everything appended so far (the `batch` timer, and a clean shutdown).
    pub fn sync(&self) -> std::io::Result<()> {
        self.sync_through(None)
    }

    fn sync_through(&self, position: Option<u64>) -> std::io::Result<()> {
        let mut synced = self.synced.lock();
        loop {
            let target = position.unwrap_or(u64::MAX);
            if synced.position >= target {
                return Ok(());
            }
            if synced.busy {
                self.sync_done.wait(&mut synced);
                // A sync that ran without us may not have covered everything we asked for.
                continue;
            }
            synced.busy = true;
            drop(synced);
            let (files, upto) = {
                let mut writer = self.writer.lock();
                let mut files = std::mem::take(&mut writer.unsynced);
                files.push(Arc::clone(&writer.file));
                (files, writer.appended)
            };
            let result = files.iter().try_for_each(|file| file.sync_data());
            synced = self.synced.lock();
            synced.busy = false;
            if result.is_ok() {
                synced.position = synced.position.max(upto);
            }
            self.sync_done.notify_all();
            result?;
            if position.is_none() {
                return Ok(());
            }
        }
    }

    /// Closes the current segment and starts the next; returns the new sequence. Called while
    /// no write can append (the caller holds the store's lock), so that the state seen under
    /// that lock is exactly what the segments before the new one hold.
    pub fn rotate(&self) -> Result<u64, WalError> {
        let mut writer = self.writer.lock();
        let sequence = writer.sequence + 1;
        let file = create_segment(&writer.dir, &writer.owner, sequence, self.policy)?;
        let previous = std::mem::replace(&mut writer.file, Arc::new(file));
        if self.policy != FsyncPolicy::Never {
            writer.unsynced.push(previous);
        }
        writer.sequence = sequence;
        writer.since_snapshot = 0;
        writer.snapshot_requested = false;
        Ok(sequence)
    }

    /// A snapshot of `bytes` was written: the next is due once the log outgrows it.
    pub fn snapshot_written(&self, bytes: u64) {
        self.writer.lock().snapshot_at = self.min_snapshot_bytes.max(bytes);
    }

    /// A snapshot attempt failed: ask again at the next append.
    pub fn snapshot_failed(&self) {
        self.writer.lock().snapshot_requested = false;
    }
}

fn create_segment(dir: &Path, owner: &Owner, sequence: u64, policy: FsyncPolicy) -> Result<File, WalError> {
    let path = log_path(dir, sequence);
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(WalError::io("creating", &path))?;
    let header = Header::new(record::KIND_LOG, owner, sequence);
    let mut buf = Vec::new();
    write_message_frame(&mut buf, &header);
    file.write_all(&buf).map_err(WalError::io("writing", &path))?;
    if policy == FsyncPolicy::Always {
        file.sync_all().map_err(WalError::io("syncing", &path))?;
        sync_dir(dir)?;
    }
    Ok(file)
}
