//! Values kept compressed, each on its own, with zstd dictionaries the store trains on its
//! own data.
//!
//! Cilium's values are small JSON documents of a few shapes (an ipcache entry is about 200
//! bytes, most of them field names and structure), so compressing one alone gains little,
//! while compressing it against a dictionary of its shape gains most: on the benchmark's
//! scenario 3 data a 16 KiB dictionary trained on 1,000 ipcache values packs the others about
//! 7:1, and values with varied pod names, namespaces and identities about 3:1. Each value stays
//! its own zstd frame, so a read decodes only what it returns (0.4 to 0.6 µs a value here, see
//! `examples/store_memory`).
//!
//! A dictionary belongs to a *group* of keys: the key up to its fourth `/`
//! (`cilium/state/ip/v1/`, `cilium/cache/nodes/v1/`), where one kind of value lives. A group's
//! first values are kept as written and sampled; once it has [`SAMPLE_VALUES`] of them or
//! [`SAMPLE_BYTES`], a background thread trains its dictionary, and the store packs the
//! values it kept plain on its next write ([`Packer::take_repacks`]). A group whose training
//! fails, whose dictionary saves less than a tenth on its next [`TRIAL_VALUES`] values (data
//! already compressed, such as Cilium's endpoint slices, or noise), or that comes after
//! [`MAX_GROUPS`], keeps its values plain.
//!
//! Only values the store holds alone are packed. A value shared with an in-process writer
//! (the mirror's sync store, through `Store::put_shared`) stays the writer's allocation:
//! packing it would add a copy, not save one.
//!
//! Frames carry their dictionary's ID (1 to [`MAX_GROUPS`], so one byte of header). IDs below
//! 32,768 are reserved by zstd's format for a future registry; these frames never leave the
//! process (responses, the log and snapshots hold values as written), so no reader of the
//! registry can meet them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::Bytes;
use parking_lot::Mutex;
use zstd::zstd_safe::{CCtx, CDict, DCtx, DDict};

use crate::blob::Blob;

/// Values sampled from a group before its dictionary is trained.
pub const SAMPLE_VALUES: usize = 1000;
/// Bytes sampled from a group before its dictionary is trained (fewer values if they are big).
pub const SAMPLE_BYTES: usize = 256 * 1024;
/// Groups given a dictionary; what the samples of the groups still training can hold is
/// bounded by this times [`SAMPLE_BYTES`].
pub const MAX_GROUPS: usize = 32;
/// Values a new dictionary is judged on.
pub const TRIAL_VALUES: u32 = 256;
/// Largest dictionary trained. ZDICT uses less when the samples are small.
const DICTIONARY_BYTES: usize = 16 * 1024;
/// Smaller values are kept plain: a frame's header alone is about 10 bytes.
const MIN_PACKED: usize = 48;
/// zstd's fastest level: on these values it packs as tightly as the default (3), and its
/// prepared dictionary needs 48 KiB of tables rather than 768.
const LEVEL: i32 = 1;

/// A version's value as the store holds it.
#[derive(Debug, Clone)]
pub enum Value {
    /// The bytes as written.
    Plain(Blob),
    /// A zstd frame of them, packed with the dictionary its header names.
    Packed(Blob),
}

impl Value {
    pub fn empty() -> Self {
        Value::Plain(Blob::empty())
    }

    /// The length of the value as written: what etcd reports and the quota counts.
    pub fn len(&self) -> usize {
        match self {
            Value::Plain(blob) => blob.len(),
            Value::Packed(frame) => content_size(frame),
        }
    }

    /// The bytes held for it: the frame's when packed.
    pub fn held(&self) -> usize {
        match self {
            Value::Plain(blob) | Value::Packed(blob) => blob.len(),
        }
    }

    #[cfg(test)]
    pub fn is_packed(&self) -> bool {
        matches!(self, Value::Packed(_))
    }
}

fn content_size(frame: &[u8]) -> usize {
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) => size as usize,
        // The store made the frame, with its content size: anything else is a bug.
        other => panic!("a packed value's frame has no content size: {other:?}"),
    }
}

struct Dictionary {
    compress: CDict<'static>,
    decompress: DDict<'static>,
}

enum Group {
    /// Values kept plain so far, one after another, and their lengths.
    Sampling {
        data: Vec<u8>,
        sizes: Vec<usize>,
    },
    Training,
    Ready {
        id: u32,
        trial: Trial,
    },
    /// Training failed, or the dictionary saved too little: the group's values stay plain.
    Plain,
}

/// What a new dictionary saved on the first values packed with it.
#[derive(Default)]
struct Trial {
    values: u32,
    written: usize,
    held: usize,
}

#[derive(Default)]
struct Groups {
    by_prefix: HashMap<Box<[u8]>, Group>,
    /// Groups whose dictionary arrived since the last write: their plain values are packed
    /// on the next one.
    repacks: Vec<Box<[u8]>>,
    /// The ID the next dictionary gets.
    next_id: u32,
    /// Training threads not yet joined (for tests, which wait for them).
    training: Vec<std::thread::JoinHandle<()>>,
}

/// The store's dictionaries and what it samples to train them; shared by the keyspace
/// (which decodes) and the store (which packs before it takes its lock).
pub struct Packer {
    /// Dictionary `id` at `id - 1`; set once each, so decoding takes no lock.
    dictionaries: Box<[OnceLock<Dictionary>]>,
    groups: Mutex<Groups>,
    repacks_due: AtomicBool,
    /// Handed to training threads, which outlive no store.
    this: Weak<Packer>,
}

impl std::fmt::Debug for Packer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packer").field("dictionaries", &self.dictionaries()).finish_non_exhaustive()
    }
}

thread_local! {
    static COMPRESSOR: RefCell<CCtx<'static>> = RefCell::new(CCtx::create());
    static DECOMPRESSOR: RefCell<DCtx<'static>> = RefCell::new(DCtx::create());
}

/// The group of `key`: up to and including its fourth `/`, or its last one if it has fewer.
pub fn group_of(key: &[u8]) -> &[u8] {
    let mut end = 0;
    for (i, _) in key.iter().enumerate().filter(|(_, b)| **b == b'/').take(4) {
        end = i + 1;
    }
    &key[..end]
}

impl Packer {
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            dictionaries: (0..MAX_GROUPS).map(|_| OnceLock::new()).collect(),
            groups: Mutex::default(),
            repacks_due: AtomicBool::new(false),
            this: this.clone(),
        })
    }

    /// How the store keeps `value`, written to `key`: packed when its group has a
    /// dictionary and that makes it smaller; else plain, sampled while the group trains.
    pub fn pack(&self, key: &[u8], value: &[u8]) -> Value {
        if value.len() < MIN_PACKED {
            return Value::Plain(Blob::copy_from(value));
        }
        let group = group_of(key);
        let (id, on_trial) = {
            let mut groups = self.groups.lock();
            match groups.by_prefix.get_mut(group) {
                Some(Group::Ready { id, trial }) => (Some(*id), trial.values < TRIAL_VALUES),
                Some(Group::Sampling { data, sizes }) => {
                    data.extend_from_slice(value);
                    sizes.push(value.len());
                    if sizes.len() >= SAMPLE_VALUES || data.len() >= SAMPLE_BYTES {
                        self.train(&mut groups, group);
                    }
                    (None, false)
                }
                Some(Group::Training | Group::Plain) => (None, false),
                None => {
                    if groups.by_prefix.len() < MAX_GROUPS {
                        let sampling = Group::Sampling { data: value.to_vec(), sizes: vec![value.len()] };
                        groups.by_prefix.insert(group.into(), sampling);
                    }
                    (None, false)
                }
            }
        };
        let kept = id.and_then(|id| self.packed_with(id, value));
        if on_trial {
            let held = match &kept {
                Some(Value::Packed(frame)) => frame.len(),
                _ => value.len(),
            };
            self.judge(group, value.len(), held);
        }
        kept.unwrap_or_else(|| Value::Plain(Blob::copy_from(value)))
    }

    /// Counts one value of `group`'s trial; at its end, a dictionary that saved less than a
    /// tenth is no longer used for new values (those it packed still decode with it).
    fn judge(&self, group: &[u8], written: usize, held: usize) {
        let mut groups = self.groups.lock();
        let Some(Group::Ready { trial, .. }) = groups.by_prefix.get_mut(group) else { return };
        trial.values += 1;
        trial.written += written;
        trial.held += held;
        if trial.values == TRIAL_VALUES && trial.held * 10 > trial.written * 9 {
            tracing::info!(
                group = %String::from_utf8_lossy(group),
                written = trial.written,
                packed = trial.held,
                "the value dictionary saves too little: values stay plain"
            );
            groups.by_prefix.insert(group.into(), Group::Plain);
        }
    }

    /// `value` packed with dictionary `id`, if that makes it smaller.
    fn packed_with(&self, id: u32, value: &[u8]) -> Option<Value> {
        let dictionary = self.dictionaries[id as usize - 1].get()?;
        COMPRESSOR.with_borrow_mut(|cctx| {
            let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(value.len()));
            cctx.compress_using_cdict(&mut frame, value, &dictionary.compress).ok()?;
            (frame.len() < value.len()).then(|| Value::Packed(Blob::copy_from(&frame)))
        })
    }

    /// The bytes of `value` as written: plain ones lent without a copy.
    pub fn unpack(&self, value: &Value) -> Bytes {
        let frame = match value {
            Value::Plain(blob) => return blob.to_bytes(),
            Value::Packed(frame) => frame,
        };
        let id = zstd::zstd_safe::get_dict_id_from_frame(frame).map_or(0, |id| id.get() as usize);
        let dictionary = id
            .checked_sub(1)
            .and_then(|i| self.dictionaries.get(i))
            .and_then(OnceLock::get)
            .unwrap_or_else(|| panic!("a packed value names dictionary {id}, which this store never made"));
        DECOMPRESSOR.with_borrow_mut(|dctx| {
            let mut out = Vec::with_capacity(content_size(frame));
            match dctx.decompress_using_ddict(&mut out, frame, &dictionary.decompress) {
                Ok(_) => Bytes::from(out),
                Err(code) => panic!("a packed value does not decode: {}", zstd::zstd_safe::get_error_name(code)),
            }
        })
    }

    /// A plain value of `key` packed, if its group has a dictionary now and that makes it
    /// smaller (for [`Packer::take_repacks`]).
    pub fn repack(&self, key: &[u8], value: &Value) -> Option<Value> {
        let Value::Plain(blob) = value else { return None };
        if blob.len() < MIN_PACKED {
            return None;
        }
        let id = match self.groups.lock().by_prefix.get(group_of(key)) {
            Some(Group::Ready { id, .. }) => *id,
            _ => return None,
        };
        self.packed_with(id, blob)
    }

    /// The groups whose dictionary arrived since the last call: the store packs their plain
    /// values. A relaxed flag keeps this off the lock on every write.
    pub fn take_repacks(&self) -> Vec<Box<[u8]>> {
        if !self.repacks_due.swap(false, Ordering::Relaxed) {
            return Vec::new();
        }
        std::mem::take(&mut self.groups.lock().repacks)
    }

    /// Starts training `group`'s dictionary from its samples on a thread of its own: it
    /// takes tens of milliseconds, too long to hold any lock for.
    fn train(&self, groups: &mut Groups, group: &[u8]) {
        let Some(Group::Sampling { data, sizes }) = groups.by_prefix.insert(group.into(), Group::Training) else {
            return;
        };
        // At most `MAX_GROUPS` groups are ever made, each trained once.
        groups.next_id += 1;
        let id = groups.next_id;
        let this = self.this.clone();
        let prefix: Box<[u8]> = group.into();
        let spawned = std::thread::Builder::new().name("store-dictionary".into()).spawn(move || {
            let trained = train(&data, &sizes, id);
            if let Some(packer) = this.upgrade() {
                packer.install(prefix, id, trained);
            }
        });
        match spawned {
            Ok(handle) => groups.training.push(handle),
            Err(error) => {
                tracing::warn!(%error, "no thread to train a value dictionary on: values stay plain");
                groups.by_prefix.insert(group.into(), Group::Plain);
            }
        }
    }

    fn install(&self, prefix: Box<[u8]>, id: u32, trained: Result<Dictionary, String>) {
        let mut groups = self.groups.lock();
        let state = match trained {
            Ok(dictionary) => {
                let _ = self.dictionaries[id as usize - 1].set(dictionary);
                groups.repacks.push(prefix.clone());
                self.repacks_due.store(true, Ordering::Relaxed);
                Group::Ready { id, trial: Trial::default() }
            }
            Err(error) => {
                tracing::info!(group = %String::from_utf8_lossy(&prefix), %error, "no value dictionary: values stay plain");
                Group::Plain
            }
        };
        groups.by_prefix.insert(prefix, state);
    }

    /// Dictionaries trained so far.
    pub fn dictionaries(&self) -> usize {
        self.dictionaries.iter().filter(|d| d.get().is_some()).count()
    }

    /// Waits for every training started so far.
    #[cfg(test)]
    pub fn trained(&self) {
        let handles = std::mem::take(&mut self.groups.lock().training);
        for handle in handles {
            handle.join().expect("training thread");
        }
    }
}

/// A dictionary trained on `data` (values of `sizes`), its ID set to `id`.
fn train(data: &[u8], sizes: &[usize], id: u32) -> Result<Dictionary, String> {
    let mut dictionary = zstd::dict::from_continuous(data, sizes, DICTIONARY_BYTES).map_err(|e| e.to_string())?;
    // A trained dictionary starts with its magic number and a random 32-bit ID (RFC 8878
    // §5); a small one makes every frame's header 3 bytes shorter.
    let header = dictionary.get_mut(4..8).ok_or("the dictionary has no header")?;
    header.copy_from_slice(&id.to_le_bytes());
    let compress = CDict::try_create(&dictionary, LEVEL).ok_or("zstd did not load the dictionary")?;
    let decompress = DDict::try_create(&dictionary).ok_or("zstd did not load the dictionary")?;
    Ok(Dictionary { compress, decompress })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipcache(i: usize) -> (String, String) {
        let ip = format!("10.{}.{}.{}", i >> 16 & 0xff, i >> 8 & 0xff, i & 0xff);
        let value = format!(
            r#"{{"IP":"{ip}","HostIP":"192.168.{}.{}","ID":{},"Key":0,"Metadata":"","K8sNamespace":"ns{}","K8sPodName":"app-{:x}"}}"#,
            i % 7,
            i % 200,
            65536 + i % 3000,
            i % 40,
            i.wrapping_mul(2654435761) % 0xffffff,
        );
        (format!("cilium/state/ip/v1/default/{ip}"), value)
    }

    #[test]
    fn a_key_belongs_to_the_group_of_its_first_four_path_segments() {
        assert_eq!(group_of(b"cilium/state/ip/v1/default/10.0.0.1"), b"cilium/state/ip/v1/");
        assert_eq!(group_of(b"cilium/state/nodes/v1/cluster1/node-a"), b"cilium/state/nodes/v1/");
        assert_eq!(group_of(b"cilium/cluster-config/c1"), b"cilium/cluster-config/");
        assert_eq!(group_of(b"plain"), b"");
    }

    #[test]
    fn values_stay_plain_until_their_group_has_a_dictionary_then_pack_and_read_back_as_written() {
        let packer = Packer::new();
        for i in 0..SAMPLE_VALUES {
            let (key, value) = ipcache(i);
            let kept = packer.pack(key.as_bytes(), value.as_bytes());
            assert!(!kept.is_packed(), "no dictionary yet");
            assert_eq!(packer.unpack(&kept), value.as_bytes());
        }
        packer.trained();
        assert_eq!(packer.take_repacks(), vec![Box::<[u8]>::from(&b"cilium/state/ip/v1/"[..])]);
        assert!(packer.take_repacks().is_empty(), "each group's repack is due once");
        let (mut raw, mut held) = (0, 0);
        for i in SAMPLE_VALUES..SAMPLE_VALUES + 500 {
            let (key, value) = ipcache(i);
            let kept = packer.pack(key.as_bytes(), value.as_bytes());
            let Value::Packed(frame) = &kept else { panic!("value {i} was not packed") };
            (raw, held) = (raw + value.len(), held + frame.len());
            assert_eq!(kept.len(), value.len(), "a packed value reports its length as written");
            assert_eq!(packer.unpack(&kept), value.as_bytes());
        }
        assert!(held * 2 < raw, "packed {held} bytes of {raw}");
    }

    #[test]
    fn a_value_of_a_group_without_a_dictionary_is_repacked_once_the_dictionary_arrives() {
        let packer = Packer::new();
        let (key, value) = ipcache(0);
        let first = packer.pack(key.as_bytes(), value.as_bytes());
        for i in 1..SAMPLE_VALUES {
            let (key, value) = ipcache(i);
            packer.pack(key.as_bytes(), value.as_bytes());
        }
        assert!(packer.repack(key.as_bytes(), &first).is_none(), "the dictionary is not there before training ends");
        packer.trained();
        let repacked = packer.repack(key.as_bytes(), &first).expect("packed with the new dictionary");
        assert_eq!(packer.unpack(&repacked), value.as_bytes());
        assert!(packer.repack(key.as_bytes(), &repacked).is_none(), "a packed value is left as it is");
    }

    #[test]
    fn short_values_and_values_of_other_groups_stay_plain() {
        let packer = Packer::new();
        for i in 0..SAMPLE_VALUES {
            let (key, value) = ipcache(i);
            packer.pack(key.as_bytes(), value.as_bytes());
        }
        packer.trained();
        assert!(!packer.pack(b"cilium/state/ip/v1/default/10.9.9.9", b"{\"IP\":\"10.9.9.9\"}").is_packed());
        let (_, value) = ipcache(7);
        assert!(!packer.pack(b"cilium/state/nodes/v1/c1/n1", value.as_bytes()).is_packed());
    }

    #[test]
    fn a_dictionary_that_saves_too_little_on_its_trial_is_no_longer_used() {
        let packer = Packer::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut noise = || {
            (0..200)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect::<Vec<u8>>()
        };
        for i in 0..SAMPLE_VALUES {
            packer.pack(format!("a/b/c/d/{i}").as_bytes(), &noise());
        }
        packer.trained();
        let on_trial =
            |packer: &Packer| matches!(packer.groups.lock().by_prefix.get(&b"a/b/c/d/"[..]), Some(Group::Ready { .. }));
        if on_trial(&packer) {
            for i in 0..TRIAL_VALUES {
                let value = noise();
                let kept = packer.pack(format!("a/b/c/d/t{i}").as_bytes(), &value);
                assert_eq!(packer.unpack(&kept), value);
            }
        }
        assert!(matches!(packer.groups.lock().by_prefix.get(&b"a/b/c/d/"[..]), Some(Group::Plain)));
    }

    #[test]
    fn a_group_whose_samples_cannot_train_a_dictionary_keeps_its_values_plain() {
        let packer = Packer::new();
        // One value of the whole sample size: ZDICT refuses to train on fewer than 5.
        let big: Vec<u8> = (0..SAMPLE_BYTES).map(|i| (i * 7 % 251) as u8).collect();
        assert!(!packer.pack(b"a/b/c/d/big", &big).is_packed());
        packer.trained();
        assert!(packer.take_repacks().is_empty());
        let (_, value) = ipcache(1);
        let kept = packer.pack(b"a/b/c/d/next", value.as_bytes());
        assert!(!kept.is_packed());
        assert_eq!(packer.unpack(&kept), value.as_bytes());
    }
}
