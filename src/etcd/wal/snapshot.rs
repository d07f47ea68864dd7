//! Writing a snapshot: item by item into a temporary file, then synced, renamed into place and
//! the directory synced, whatever the fsync policy (a snapshot replaces the log before it, so
//! it must be on disk before that log goes); only then are the older files removed.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::log::Owner;
use super::record::{self, Changes, End, Header, KeyVersions, LeaseGrant, Meta, SnapshotItem, snapshot_item::Kind};
use super::{WalError, snapshot_path, sync_dir, write_message_frame};

pub struct SnapshotSink {
    dir: PathBuf,
    sequence: u64,
    tmp: PathBuf,
    out: BufWriter<File>,
    buf: Vec<u8>,
    end: End,
    bytes: u64,
}

impl SnapshotSink {
    /// Starts the snapshot that stands for every segment before `sequence`.
    pub fn create(dir: &Path, owner: &Owner, sequence: u64, meta: Meta) -> Result<Self, WalError> {
        let path = snapshot_path(dir, sequence);
        let tmp = path.with_extension("snap.tmp");
        let file = File::create(&tmp).map_err(WalError::io("creating", &tmp))?;
        let mut sink = Self {
            dir: dir.to_owned(),
            sequence,
            tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            buf: Vec::new(),
            end: End::default(),
            bytes: 0,
        };
        let header = Header::new(record::KIND_SNAPSHOT, owner, sequence);
        sink.write(&header)?;
        sink.item(Kind::Meta(meta))?;
        Ok(sink)
    }

    pub fn key(&mut self, key: KeyVersions) -> Result<(), WalError> {
        self.end.keys += 1;
        self.item(Kind::Key(key))
    }

    pub fn lease(&mut self, lease: LeaseGrant) -> Result<(), WalError> {
        self.end.leases += 1;
        self.item(Kind::Lease(lease))
    }

    pub fn changes(&mut self, changes: Changes) -> Result<(), WalError> {
        self.end.changes += changes.keys.len() as u64;
        self.item(Kind::Changes(changes))
    }

    /// Makes the snapshot durable and removes the files it replaces; returns its size.
    pub fn finish(mut self) -> Result<u64, WalError> {
        self.item(Kind::End(self.end.clone()))?;
        let file = self.out.into_inner().map_err(|e| WalError::Io {
            action: "writing",
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(WalError::io("syncing", &self.tmp))?;
        let path = snapshot_path(&self.dir, self.sequence);
        std::fs::rename(&self.tmp, &path).map_err(WalError::io("renaming", &path))?;
        sync_dir(&self.dir)?;
        super::recover::remove_before(&self.dir, self.sequence)?;
        Ok(self.bytes)
    }

    fn item(&mut self, kind: Kind) -> Result<(), WalError> {
        self.write(&SnapshotItem { kind: Some(kind) })
    }

    fn write(&mut self, message: &impl prost::Message) -> Result<(), WalError> {
        self.buf.clear();
        write_message_frame(&mut self.buf, message);
        self.bytes += self.buf.len() as u64;
        self.out.write_all(&self.buf).map_err(WalError::io("writing", &self.tmp))
    }
}

/// Changes per [`Changes`] item: big enough that framing costs nothing, small enough that
/// reading one back never needs much memory.
pub const CHANGES_PER_ITEM: usize = 4096;

/// A whole snapshot from in-memory parts (tests and small stores).
pub fn write_snapshot(
    dir: &Path,
    owner: &Owner,
    sequence: u64,
    meta: Meta,
    keys: impl IntoIterator<Item = KeyVersions>,
    leases: impl IntoIterator<Item = LeaseGrant>,
    changes: impl IntoIterator<Item = Changes>,
) -> Result<u64, WalError> {
    let mut sink = SnapshotSink::create(dir, owner, sequence, meta)?;
    keys.into_iter().try_for_each(|k| sink.key(k))?;
    leases.into_iter().try_for_each(|l| sink.lease(l))?;
    changes.into_iter().try_for_each(|c| sink.changes(c))?;
    sink.finish()
}
