//! Reading the data directory back at start-up: the newest snapshot, then every segment after
//! it up to the first torn or corrupt frame, which is where the log is cut.
//!
//! Damage that a crash cannot explain is refused rather than repaired: a snapshot that does not
//! read whole, a frame with a good checksum that does not decode, an entry that does not follow
//! the store's revision, a missing segment. A crash can only tear the end of the last write, and
//! that is the only thing cut.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message;

use super::log::Owner;
use super::record::{self, Changes, Entry, Header, KeyVersions, LeaseGrant, Meta, SnapshotItem, snapshot_item::Kind};
use super::{
    FORMAT, FrameError, FrameReader, LOG_PREFIX, LOG_SUFFIX, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX, WalError, log_path,
    sequence_of, snapshot_path, sync_dir,
};

/// What recovery feeds the store, in order: a snapshot's parts (`meta` first), then the log's
/// entries. An `Err` names what does not fit, and stops recovery.
pub trait Replay {
    fn meta(&mut self, meta: Meta) -> Result<(), String>;
    fn key(&mut self, key: KeyVersions) -> Result<(), String>;
    fn lease(&mut self, lease: LeaseGrant) -> Result<(), String>;
    fn changes(&mut self, changes: Changes) -> Result<(), String>;
    fn entry(&mut self, entry: Entry) -> Result<(), String>;
}

/// What was found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The store's identity; `None` for a directory that holds no store yet.
    pub owner: Option<Owner>,
    /// The segment to write next.
    pub next_sequence: u64,
    /// Bytes of the snapshot read, and of the log replayed after it.
    pub snapshot_bytes: u64,
    pub log_bytes: u64,
    pub entries: u64,
    /// Where the log was cut, when it was (for the start-up log line).
    pub cut: Option<String>,
    /// The boot ID under which the last segment read was written.
    pub boot_id: Option<String>,
    /// The log ends with a clean shutdown's entry: everything in it was on disk.
    pub clean_shutdown: bool,
}

/// Reads `dir` (creating it when missing) into `replay`.
pub fn recover(dir: &Path, token: &str, replay: &mut impl Replay) -> Result<Recovered, WalError> {
    std::fs::create_dir_all(dir).map_err(WalError::io("creating", dir))?;
    let (snapshots, mut logs) = list(dir)?;
    let mut recovered = Recovered::default();
    let mut first_log = 1;
    if let Some(&sequence) = snapshots.last() {
        let path = snapshot_path(dir, sequence);
        let (owner, bytes) = read_snapshot(&path, sequence, token, replay)?;
        recovered.owner = Some(owner);
        recovered.snapshot_bytes = bytes;
        first_log = sequence;
        // Left by a crash between a snapshot's rename and the removal of what it replaced.
        remove_before(dir, sequence)?;
        logs.retain(|&s| s >= sequence);
    }
    if let Some(missing) = logs.iter().zip(first_log..).find(|(have, want)| *have != want).map(|(_, want)| want) {
        return Err(WalError::MissingSegment { dir: dir.to_owned(), missing, have: logs });
    }
    let mut last_kept = first_log.saturating_sub(1);
    for (i, &sequence) in logs.iter().enumerate() {
        let path = log_path(dir, sequence);
        let read = read_segment(&path, sequence, token, recovered.owner.as_ref(), replay)?;
        recovered.entries += read.entries;
        recovered.log_bytes += read.good_bytes;
        if read.boot_id.is_some() {
            recovered.boot_id = read.boot_id.clone();
        }
        if read.entries > 0 {
            recovered.clean_shutdown = read.ends_clean;
        }
        if recovered.owner.is_none() {
            recovered.owner = read.owner;
        }
        let Some(error) = read.stopped else {
            last_kept = sequence;
            continue;
        };
        // The log ends here: the cut segment keeps its whole frames, later ones go.
        let later = &logs[i + 1..];
        recovered.cut = Some(format!(
            "{}: {error}; cut at byte {}{}",
            path.display(),
            read.good_bytes,
            if later.is_empty() { String::new() } else { format!(", {} later segment(s) removed", later.len()) }
        ));
        if read.good_bytes == 0 {
            std::fs::remove_file(&path).map_err(WalError::io("removing", &path))?;
        } else {
            let file = std::fs::OpenOptions::new().write(true).open(&path).map_err(WalError::io("opening", &path))?;
            file.set_len(read.good_bytes).map_err(WalError::io("truncating", &path))?;
            file.sync_all().map_err(WalError::io("syncing", &path))?;
            last_kept = sequence;
        }
        for &later in later {
            let path = log_path(dir, later);
            std::fs::remove_file(&path).map_err(WalError::io("removing", &path))?;
        }
        sync_dir(dir)?;
        break;
    }
    recovered.next_sequence = last_kept + 1;
    Ok(recovered)
}

/// Removes the snapshots and segments before `sequence`, and any temporary file.
pub(super) fn remove_before(dir: &Path, sequence: u64) -> Result<(), WalError> {
    let (snapshots, logs) = list(dir)?;
    let old_snapshots = snapshots.into_iter().filter(|&s| s < sequence).map(|s| snapshot_path(dir, s));
    let old_logs = logs.into_iter().filter(|&s| s < sequence).map(|s| log_path(dir, s));
    let mut removed = false;
    for path in old_snapshots.chain(old_logs) {
        std::fs::remove_file(&path).map_err(WalError::io("removing", &path))?;
        removed = true;
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// The sequence numbers of the snapshots and segments in `dir`, ascending; removes leftover
/// temporary files (a snapshot being written when the process died).
fn list(dir: &Path) -> Result<(Vec<u64>, Vec<u64>), WalError> {
    let (mut snapshots, mut logs) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir).map_err(WalError::io("listing", dir))? {
        let entry = entry.map_err(WalError::io("listing", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(sequence) = sequence_of(name, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX) {
            snapshots.push(sequence);
        } else if let Some(sequence) = sequence_of(name, LOG_PREFIX, LOG_SUFFIX) {
            logs.push(sequence);
        } else if name.starts_with(SNAPSHOT_PREFIX) && name.ends_with(".tmp") {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(WalError::io("removing", &path))?;
        }
    }
    snapshots.sort_unstable();
    logs.sort_unstable();
    Ok((snapshots, logs))
}

/// Checks a file's header against what this release reads and the store it should belong to.
fn check_header(
    path: &Path,
    payload: &Bytes,
    kind: u32,
    sequence: u64,
    token: &str,
    owner: Option<&Owner>,
) -> Result<Owner, WalError> {
    let not_ours = || WalError::NotOurs { path: path.to_owned() };
    let header = Header::decode(payload.clone()).map_err(|_| not_ours())?;
    if header.format > FORMAT {
        return Err(WalError::NewerFormat { path: path.to_owned(), found: header.format });
    }
    if header.format == 0 || header.kind != kind || header.sequence != sequence {
        return Err(not_ours());
    }
    if header.initial_cluster_token != token {
        return Err(WalError::TokenMismatch {
            path: path.to_owned(),
            found: header.initial_cluster_token,
            expected: token.to_owned(),
        });
    }
    if let Some(owner) = owner
        && (owner.cluster_id, owner.member_id) != (header.cluster_id, header.member_id)
    {
        return Err(WalError::IdentityMismatch {
            path: path.to_owned(),
            found: header.cluster_id,
            expected: owner.cluster_id,
        });
    }
    Ok(Owner {
        cluster_id: header.cluster_id,
        member_id: header.member_id,
        token: header.initial_cluster_token,
        boot_id: header.boot_id,
    })
}

fn open(path: &Path) -> Result<FrameReader<BufReader<File>>, WalError> {
    let file = File::open(path).map_err(WalError::io("opening", path))?;
    Ok(FrameReader::new(BufReader::with_capacity(1 << 20, file)))
}

fn read_snapshot(path: &Path, sequence: u64, token: &str, replay: &mut impl Replay) -> Result<(Owner, u64), WalError> {
    let corrupt = |reason: String| WalError::CorruptSnapshot { path: path.to_owned(), reason };
    let mut frames = open(path)?;
    let mut next = || match frames.next_frame() {
        Ok(Some(payload)) => Ok(payload),
        Ok(None) => Err(corrupt("ends before its last item".to_owned())),
        Err(FrameError::Io { source, .. }) => Err(WalError::Io { action: "reading", path: path.to_owned(), source }),
        Err(error) => Err(corrupt(error.to_string())),
    };
    let owner = check_header(path, &next()?, record::KIND_SNAPSHOT, sequence, token, None)?;
    let mut seen = record::End::default();
    let mut first = true;
    loop {
        let item = SnapshotItem::decode(next()?).map_err(|e| corrupt(format!("undecodable item: {e}")))?;
        let applied = match item.kind {
            Some(Kind::Meta(meta)) if first => replay.meta(meta),
            _ if first => return Err(corrupt("does not start with its metadata".to_owned())),
            Some(Kind::Key(key)) => {
                seen.keys += 1;
                replay.key(key)
            }
            Some(Kind::Lease(lease)) => {
                seen.leases += 1;
                replay.lease(lease)
            }
            Some(Kind::Changes(changes)) => {
                seen.changes += changes.keys.len() as u64;
                replay.changes(changes)
            }
            Some(Kind::End(end)) if end == seen => break,
            Some(Kind::End(end)) => return Err(corrupt(format!("holds {seen:?} where its end says {end:?}"))),
            // An item of a later release that does not change the format: skipped.
            Some(Kind::Meta(_)) | None => Ok(()),
        };
        applied.map_err(corrupt)?;
        first = false;
    }
    Ok((owner, frames.offset()))
}

struct SegmentRead {
    owner: Option<Owner>,
    boot_id: Option<String>,
    /// The last entry read is a clean shutdown's.
    ends_clean: bool,
    entries: u64,
    good_bytes: u64,
    /// Why reading stopped before the end of the file, if it did.
    stopped: Option<FrameError>,
}

fn read_segment(
    path: &Path,
    sequence: u64,
    token: &str,
    owner: Option<&Owner>,
    replay: &mut impl Replay,
) -> Result<SegmentRead, WalError> {
    let mut frames = open(path)?;
    let stopped = |error: FrameError, entries| match error {
        FrameError::Io { source, .. } => Err(WalError::Io { action: "reading", path: path.to_owned(), source }),
        error => Ok(SegmentRead {
            owner: None,
            boot_id: None,
            ends_clean: false,
            entries,
            good_bytes: 0,
            stopped: Some(error),
        }),
    };
    let header = match frames.next_frame() {
        Ok(Some(header)) => header,
        // A segment whose header never made it to the file holds nothing yet.
        Ok(None) => {
            return Ok(SegmentRead {
                owner: None,
                boot_id: None,
                ends_clean: false,
                entries: 0,
                good_bytes: 0,
                stopped: None,
            });
        }
        Err(error) => return stopped(error, 0),
    };
    let found = check_header(path, &header, record::KIND_LOG, sequence, token, owner)?;
    let mut read = SegmentRead {
        boot_id: Some(found.boot_id.clone()),
        owner: Some(found),
        ends_clean: false,
        entries: 0,
        good_bytes: frames.offset(),
        stopped: None,
    };
    loop {
        match frames.next_frame() {
            Ok(Some(payload)) => {
                let index = read.entries;
                let bad = |reason: String| WalError::BadEntry { path: PathBuf::from(path), index, reason };
                let entry = Entry::decode(payload).map_err(|e| bad(format!("undecodable: {e}")))?;
                read.ends_clean = matches!(entry.kind, Some(record::entry::Kind::Shutdown(_)));
                if !read.ends_clean {
                    replay.entry(entry).map_err(bad)?;
                }
                read.entries += 1;
                read.good_bytes = frames.offset();
            }
            Ok(None) => return Ok(read),
            Err(error) => {
                let entries = read.entries;
                let mut cut = stopped(error, entries)?;
                cut.owner = read.owner;
                cut.boot_id = read.boot_id;
                cut.good_bytes = read.good_bytes;
                return Ok(cut);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::{Commit, Compaction, entry};
    use super::super::{FsyncPolicy, Log, write_snapshot};
    use super::*;

    const TOKEN: &str = "pod-uid-1";

    fn owner() -> Owner {
        Owner { cluster_id: 0xc1, member_id: 0x31, token: TOKEN.to_owned(), boot_id: "boot-1".to_owned() }
    }

    /// What recovery handed over, in order.
    #[derive(Default)]
    struct Seen {
        items: Vec<String>,
    }

    impl Replay for Seen {
        fn meta(&mut self, meta: Meta) -> Result<(), String> {
            self.items.push(format!("meta {} {}", meta.revision, meta.compact_revision));
            Ok(())
        }
        fn key(&mut self, key: KeyVersions) -> Result<(), String> {
            self.items.push(format!("key {}", String::from_utf8_lossy(&key.key)));
            Ok(())
        }
        fn lease(&mut self, lease: LeaseGrant) -> Result<(), String> {
            self.items.push(format!("lease {}", lease.id));
            Ok(())
        }
        fn changes(&mut self, changes: Changes) -> Result<(), String> {
            self.items.push(format!("changes {:?}", changes.signed_revisions));
            Ok(())
        }
        fn entry(&mut self, entry: Entry) -> Result<(), String> {
            match entry.kind {
                Some(entry::Kind::Compaction(c)) => self.items.push(format!("compact {}", c.revision)),
                Some(entry::Kind::Commit(c)) => self.items.push(format!("commit {}", c.revision)),
                other => self.items.push(format!("{other:?}")),
            }
            Ok(())
        }
    }

    fn compaction(revision: i64) -> Entry {
        Entry { kind: Some(entry::Kind::Compaction(Compaction { revision })) }
    }

    fn commit(revision: i64) -> Entry {
        Entry { kind: Some(entry::Kind::Commit(Commit { revision, ops: vec![] })) }
    }

    fn log_with(dir: &Path, sequence: u64, entries: &[Entry]) -> Log {
        let log = Log::create(dir, owner(), sequence, FsyncPolicy::Never, u64::MAX, 0, 0).expect("log created");
        entries.iter().for_each(|e| {
            log.append(e).expect("appended");
        });
        log
    }

    fn recover_all(dir: &Path, token: &str) -> Result<(Recovered, Vec<String>), WalError> {
        let mut seen = Seen::default();
        recover(dir, token, &mut seen).map(|r| (r, seen.items))
    }

    fn size(path: &Path) -> u64 {
        std::fs::metadata(path).expect("exists").len()
    }

    #[test]
    fn an_empty_directory_holds_no_store_and_is_written_from_segment_one() {
        let dir = tempfile::tempdir().unwrap();
        let (recovered, seen) = recover_all(dir.path(), TOKEN).unwrap();
        assert!(recovered.owner.is_none());
        assert_eq!(recovered.next_sequence, 1);
        assert!(seen.is_empty());
    }

    #[test]
    fn every_entry_written_is_read_back_in_order_with_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 1, &[commit(2), commit(3), compaction(3)]);
        let (recovered, seen) = recover_all(dir.path(), TOKEN).unwrap();
        assert_eq!(seen, ["commit 2", "commit 3", "compact 3"]);
        let found = recovered.owner.expect("a store");
        assert_eq!((found.cluster_id, found.member_id), (0xc1, 0x31));
        assert_eq!((recovered.entries, recovered.next_sequence, recovered.cut), (3, 2, None));
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_whole_entry_and_stays_cut() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 1, &[commit(2), commit(3), commit(4)]);
        let path = log_path(dir.path(), 1);
        let whole = size(&path);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(whole - 3).unwrap();

        let (recovered, seen) = recover_all(dir.path(), TOKEN).unwrap();
        assert_eq!(seen, ["commit 2", "commit 3"]);
        assert!(recovered.cut.as_deref().is_some_and(|c| c.contains("torn")), "{:?}", recovered.cut);
        assert_eq!(size(&path), recovered.log_bytes, "the torn bytes are gone from the file");
        let (again, seen) = recover_all(dir.path(), TOKEN).unwrap();
        assert_eq!((seen.len(), again.cut), (2, None));
    }

    #[test]
    fn a_corrupt_entry_ends_the_log_there_and_later_segments_go() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 1, &[commit(2), commit(3), commit(4)]);
        log_with(dir.path(), 2, &[commit(5)]);
        let path = log_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 1; // the payload of commit 4
        bytes[at] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();

        let (recovered, seen) = recover_all(dir.path(), TOKEN).unwrap();
        assert_eq!(seen, ["commit 2", "commit 3"]);
        assert!(recovered.cut.as_deref().is_some_and(|c| c.contains("checksum")), "{:?}", recovered.cut);
        assert!(!log_path(dir.path(), 2).exists(), "nothing after the cut is replayed later");
        assert_eq!(recovered.next_sequence, 2);
    }

    #[test]
    fn a_segment_whose_header_was_torn_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 1, &[commit(2)]);
        log_with(dir.path(), 2, &[]);
        let second = log_path(dir.path(), 2);
        std::fs::OpenOptions::new().write(true).open(&second).unwrap().set_len(5).unwrap();
        let (recovered, seen) = recover_all(dir.path(), TOKEN).unwrap();
        assert_eq!(seen, ["commit 2"]);
        assert!(!second.exists());
        assert_eq!(recovered.next_sequence, 2);
    }

    #[test]
    fn a_directory_of_another_cluster_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 1, &[commit(2)]);
        let error = recover_all(dir.path(), "pod-uid-2").unwrap_err();
        assert!(matches!(&error, WalError::TokenMismatch { found, .. } if found == TOKEN), "{error}");
        assert!(error.to_string().contains("another cluster"), "{error}");
    }

    #[test]
    fn a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut header = Header::new(record::KIND_LOG, &owner(), 1);
        header.format = FORMAT + 1;
        let mut bytes = Vec::new();
        super::super::write_message_frame(&mut bytes, &header);
        std::fs::write(log_path(dir.path(), 1), bytes).unwrap();
        let error = recover_all(dir.path(), TOKEN).unwrap_err();
        assert!(matches!(error, WalError::NewerFormat { found, .. } if found == FORMAT + 1), "{error}");
    }

    #[test]
    fn a_snapshot_stands_for_the_segments_before_it_and_the_log_after_it_follows() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 1, &[commit(2)]);
        assert_eq!(log.rotate().unwrap(), 2);
        log.append(&commit(3)).unwrap();
        let key = KeyVersions { key: Bytes::from_static(b"k"), versions: vec![] };
        let changes = Changes { keys: vec![Bytes::from_static(b"k")], signed_revisions: vec![2] };
        let meta = Meta { revision: 2, compact_revision: 1 };
        let lease = LeaseGrant { id: 7, ttl: 60, owner: String::new() };
        write_snapshot(dir.path(), &owner(), 2, meta, [key], [lease], [changes]).unwrap();
        assert!(!log_path(dir.path(), 1).exists(), "replaced by the snapshot");

        let (recovered, seen) = recover_all(dir.path(), TOKEN).unwrap();
        assert_eq!(seen, ["meta 2 1", "key k", "lease 7", "changes [2]", "commit 3"]);
        assert_eq!(recovered.next_sequence, 3);
    }

    #[test]
    fn a_snapshot_cut_short_is_refused_not_taken_for_whole() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta { revision: 2, compact_revision: 1 };
        let keys = (0..3).map(|i| KeyVersions { key: Bytes::from(format!("k{i}")), versions: vec![] });
        write_snapshot(dir.path(), &owner(), 1, meta, keys, [], []).unwrap();
        let path = snapshot_path(dir.path(), 1);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 12]).unwrap();
        let error = recover_all(dir.path(), TOKEN).unwrap_err();
        assert!(matches!(error, WalError::CorruptSnapshot { .. }), "{error}");
    }

    #[test]
    fn a_gap_in_the_segments_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 1, &[commit(2)]);
        log_with(dir.path(), 3, &[commit(3)]);
        let error = recover_all(dir.path(), TOKEN).unwrap_err();
        assert!(matches!(error, WalError::MissingSegment { missing: 2, .. }), "{error}");
    }
}
