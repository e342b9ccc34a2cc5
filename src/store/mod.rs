//! The persistent cache store behind one `Store` handle: entries and their variants, body blobs, tags, purges, integrity and schema versions; depends on key and policy data types only, and makes no HTTP decision.
//!
//! Layout under the data directory:
//! - `db/`: the sled database (records and indexes, see index.rs); disposable: moved aside if corrupt.
//! - `bodies/ab/cd/<blake3 hex>`: bodies larger than `inline_max`, one file per distinct content.
//! - `bodies/tmp/`: bodies being written; emptied at open.
//!
//! Invariants, and why they hold across a crash:
//! - A record never points at a body file that was not durably on disk first: the file is fsynced,
//!   renamed and its directory fsynced before the record's transaction is written.
//! - A body file is unlinked only after the transaction that dropped its last reference has been
//!   flushed (the store's flusher thread, `flush()`, or close), so a crash cannot resurrect a
//!   record whose file is gone. A crash can leave unreferenced files, which
//!   [`Store::sweep_orphan_bodies`] removes.
//! - Every body is verified against its blake3 when read; damage drops the entry.
//! - The counters and body reference counts change in the same transactions as the records;
//!   [`Store::reconcile`] recounts them online (after start, and after a record that no longer
//!   decoded was dropped or replaced, the one way they can drift).
//!
//! Mutation paths (all in `Shared`/`Index`): commit, remove (also eviction, purge, damaged
//! bodies), update (304, soft purge), drop of an undecodable record, and reconcile (counters
//! and reference counts only, never an entry's content).

pub mod admission;
mod bodies;
mod error;
mod format;
mod hot;
mod index;
mod migrate;
mod read_only;
mod reconcile;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;

pub use bodies::BodyStream;
pub use error::{LogLimit, StoreError};
pub use format::{FormatError, MAX_INLINE_MAX};
pub use hot::{Variant, Variants};
pub use migrate::CURRENT_SCHEMA;
pub use read_only::ReadOnlyStore;
pub use reconcile::{ReconcileReport, Repair};

/// Fuzzing entry (fuzz/record_decode): the record decoder on arbitrary bytes. Not an API.
#[doc(hidden)]
pub fn fuzz_decode_record(bytes: &[u8]) -> Result<Entry, FormatError> {
    format::decode_entry(bytes)
}

/// Fuzzing entry: the record encoder, to check that a decoded record round-trips. Not an API.
#[doc(hidden)]
pub fn fuzz_encode_record(entry: &Entry) -> Result<Vec<u8>, FormatError> {
    format::encode_entry(entry)
}

use admission::FrequencySketch;
use bodies::{Bodies, SpillFile};
use index::Index;
use reconcile::RecountStep;

use crate::key::{PrimaryKey, VariantKey};
use crate::policy::{Freshness, HeaderList};

/// How a store is tuned. The defaults suit a proxy with a few GiB of cache.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Bodies up to this many bytes live inline in the sled record; larger ones become body files.
    /// At most [`MAX_INLINE_MAX`]. Default 16 KiB (see the store benchmark: inline puts avoid two
    /// fsyncs, but sled rewrites whole leaves holding large values, so the limit stays small).
    pub inline_max: usize,
    /// sled page-cache bytes. Default 64 MiB.
    pub cache_capacity: u64,
    /// How often the store flushes sled to disk and unlinks released body files; `None` = only on
    /// [`Store::flush`] and close. Default `Some(500)`.
    pub flush_every_ms: Option<u64>,
    /// Bound on [`Store::usage`]; past it, least recently used entries are evicted down to
    /// [`EVICT_TO_PERCENT`] of it, sparing those used more often than the newcomers, and a
    /// newcomer used less often than the entry it would displace is not stored (TinyLFU, see
    /// admission.rs). `None` = unbounded. Default `None`.
    pub max_size: Option<u64>,
    /// Bytes of the in-memory hot tier (decoded records and verified bodies of recently used
    /// URLs; bodies up to 3/32 of it are kept whole). `0` = off. Default 0.
    pub hot_cache: u64,
    /// The flusher writes a database recovery snapshot after this many bytes of log, which bounds
    /// what a start after a crash replays; `None` (or no flusher, `flush_every_ms: None`) = only
    /// when opening and closing. Default 64 MiB: with a million entries, a crash after almost
    /// 128 MiB of unsnapshotted log took 0.95 s to the first hit (benches/warm_start.rs), so half
    /// that keeps the start well under a second (a million stored entries write about 2.3 GB).
    /// A snapshot runs on the flusher thread (0.3 s with a million entries), so that flush tick
    /// comes late by as much; writers do not wait for it.
    pub recovery_snapshot_every: Option<u64>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            inline_max: 16 * 1024,
            cache_capacity: 64 * 1024 * 1024,
            flush_every_ms: Some(500),
            max_size: None,
            hot_cache: 0,
            recovery_snapshot_every: Some(64 * 1024 * 1024),
        }
    }
}

/// Eviction's low-water mark: evicting in one batch down to this share of `max_size` keeps
/// it from running on every write once the cache is full.
pub const EVICT_TO_PERCENT: u64 = 90;

/// Touches buffered in memory before older ones are dropped (the order is a hint; losing a
/// few under extreme load only makes eviction slightly less precise).
const MAX_PENDING_TOUCHES: usize = 100_000;

/// Where an entry sits in the expiry order (see [`Store::expired_after`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiryPosition(Vec<u8>);

/// One stored response (one variant of one URL).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The readable URL ([`PrimaryKey::url`]).
    pub url: String,
    /// The response status.
    pub status: u16,
    /// The stored response header fields.
    pub headers: HeaderList,
    /// The selecting request values this variant was stored under (see [`VariantKey::new`]).
    pub vary: Vec<(String, Option<String>)>,
    /// Freshness facts computed by policy when the response was stored (kept to the millisecond).
    pub freshness: Freshness,
    /// Surrogate keys, for purge by tag.
    pub tags: Vec<String>,
    /// When the store took the entry (kept to the millisecond).
    pub stored_at: SystemTime,
    /// Filled by the store at commit; ignored on input.
    pub body: BodyInfo,
}

/// Where and what a stored body is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BodyInfo {
    /// Body length in bytes.
    pub len: u64,
    /// blake3 of the body; every read is checked against it.
    pub blake3: [u8; 32],
    /// `Some` = the body lives inline in the record; `None` = in the body file named by `blake3`.
    pub inline: Option<Bytes>,
}

/// Counters kept in the database, updated in the same transactions as the entries (not scanned),
/// plus a few counted in memory since open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Stored entries (variants).
    pub entries: u64,
    /// Sum of the body lengths of all entries (inline and file, shared files counted per entry).
    pub body_bytes: u64,
    /// Distinct body files referenced.
    pub body_files: u64,
    /// Bytes in referenced body files (each distinct file once): the disk the bodies use.
    pub body_file_bytes: u64,
    /// Records dropped since open because they did not decode.
    pub dropped_records: u64,
    /// Entries dropped since open because their body was damaged or missing.
    pub damaged_bodies: u64,
    /// Bytes of all encoded records (headers, metadata, inline bodies).
    pub record_bytes: u64,
    /// Bytes of the keys and index rows of every entry and body file in the database, with
    /// sled's per-row overhead (see `index::index_bytes`).
    pub index_bytes: u64,
    /// Bytes of the quarantined copy of a corrupt database, if one is kept (`db.corrupt-*`).
    pub quarantined_bytes: u64,
    /// What `max_size` bounds ([`Store::usage`]): records + index rows + body files +
    /// quarantined copy.
    pub usage_bytes: u64,
    /// Entries evicted since open to stay under `max_size`.
    pub evictions: u64,
    /// Entries not stored since open because the store was full of entries used more often.
    pub rejected: u64,
}

/// A handle to an open store. Cheap to clone; all clones share one database. Send + Sync.
/// The database closes (flushed) when the last clone, writer and body stream are dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Owns the flusher thread; its drop stops the thread before the database closes, so that
/// dropping the last `Store` really releases the directory lock.
struct Inner {
    /// `Some` until drop.
    shared: Option<Arc<Shared>>,
    flusher: Option<Flusher>,
}

struct Flusher {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// URL fences kept before the older half is folded into one fence for everything (about 2 MiB).
/// At 500 successful POSTs a second to distinct URLs a fold comes about every 33 s, and then
/// refuses storing any fetch whose origin request began before the folded fences: a download
/// longer than that is served but not stored (folding by age would avoid it).
const MAX_URL_FENCES: usize = 1 << 15;

/// Purge fences: a write whose origin request was sent under generation `g` is refused if a
/// fence for everything, or for its URL, was raised after `g`.
#[derive(Default)]
struct Fences {
    refuse_all_before: u64,
    /// Primary hash → the generation its last fence raised.
    by_url: HashMap<[u8; 32], u64>,
}

impl Fences {
    fn refuse(&self, key: &VariantKey, generation: u64) -> bool {
        self.refuse_all_before > generation
            || self
                .by_url
                .get(key.primary_hash())
                .is_some_and(|&fence| fence > generation)
    }

    fn refuse_all(&mut self, generation: u64) {
        self.refuse_all_before = generation;
        // Every URL fence is older, so this one covers them.
        self.by_url.clear();
    }

    /// Bounded memory: the older half of the URL fences becomes one fence for everything up to
    /// them. Only writes that began before them (the longest-running ones) are refused too.
    fn fold_oldest_half(&mut self) {
        let mut raised: Vec<u64> = self.by_url.values().copied().collect();
        let mid = raised.len() / 2;
        let (_, &mut median, _) = raised.select_nth_unstable(mid);
        self.refuse_all_before = self.refuse_all_before.max(median);
        self.by_url.retain(|_, raised| *raised > median);
    }
}

struct Shared {
    /// Accesses since the last persist: key → access stamp. Hits only write here.
    touches: Mutex<HashMap<VariantKey, u64>>,
    /// The last access stamp handed out: wall-clock ms, but strictly increasing, so that two
    /// uses in the same millisecond (or under a stopped clock) still order by recency.
    stamp: AtomicU64,
    max_size: Option<u64>,
    recovery_snapshot_every: Option<u64>,
    evictions: AtomicU64,
    rejected: AtomicU64,
    /// How often each URL (primary hash) was looked up lately: eviction's sense of value.
    sketch: FrequencySketch,
    /// The highest lookup count among entries stored over budget since the last eviction:
    /// eviction spares victims used more often than that.
    pressure: AtomicU8,
    /// See [`StoreStats::quarantined_bytes`]; measured at open and by [`Store::refresh_quarantine`].
    quarantined_bytes: AtomicU64,
    /// Set by a commit that left the store over `max_size`; the flusher thread evicts.
    over_budget: AtomicBool,
    dir: PathBuf,
    index: Index,
    bodies: Bodies,
    inline_max: usize,
    /// Bumped by every purge and URL fence; a write remembers it from before its origin request.
    generation: AtomicU64,
    /// Which writes are refused. Writers hold it shared from their check to their transaction;
    /// a purge takes it exclusively only to raise a fence. So a write either lands before the
    /// purge scans, or sees the fence.
    purge_lock: RwLock<Fences>,
    /// Body files released by committed transactions, to unlink after the next flush. Its lock
    /// also orders file installs against unlinks: an install + its reference happen under it,
    /// and an unlink re-checks the reference count under it.
    released: Mutex<ReleasedFiles>,
    /// Held by one flush-and-unlink at a time: each unlinks what was released before its flush.
    flushing: Mutex<()>,
    damaged: AtomicU64,
    quarantined: Option<PathBuf>,
    /// Body files hashed whole (by their writer, or by a range read) and found intact (see
    /// [`Store::open_body_range`]).
    verified: bodies::Verified,
    /// Recently used records and verified bodies in memory; every index mutation invalidates.
    hot: hot::Hot,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data behind; carry on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Opens or creates the store under `dir` (`dir/db` for sled, `dir/bodies/` for body files).
    /// O(1) in the number of entries: nothing is scanned.
    ///
    /// A corrupt sled directory is renamed to `dir/db.corrupt-<unix secs>` (logged at error level,
    /// see [`Store::quarantined`]) and an empty store opened. A newer schema version is refused
    /// with [`StoreError::NewerSchema`]; an older one is upgraded in place. A directory held by
    /// another process gives [`StoreError::Locked`].
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        // The only clock read of the store, used to name a quarantined directory.
        Store::open_at(dir, opts, SystemTime::now())
    }

    /// [`Store::open`] with the current time given (it names a quarantined directory).
    pub fn open_at(dir: &Path, opts: StoreOptions, now: SystemTime) -> Result<Store, StoreError> {
        if opts.inline_max > MAX_INLINE_MAX {
            return Err(StoreError::InvalidOptions(format!(
                "inline_max {} is over the maximum of {MAX_INLINE_MAX}",
                opts.inline_max
            )));
        }
        std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
        let (index, quarantined) = index::open(&dir.join("db"), opts.cache_capacity, now)?;
        migrate::prepare(&index, dir)?;
        // Only now that we hold the database lock is it safe to clear another run's temp files.
        let bodies = Bodies::open(&dir.join("bodies"))?;
        let newest_stamp = index.newest_access_stamp()?;
        let quarantined_bytes = index::quarantined_bytes(&dir.join("db"));
        if quarantined_bytes > 0 {
            tracing::warn!(
                bytes = quarantined_bytes,
                "a quarantined copy of a corrupt store database is kept in the data directory and counts toward max_size; delete the db.corrupt-* directory once inspected"
            );
        }
        // About one sketch slot per entry the bound can hold (entries of 8 KiB on average);
        // 2 bytes each, at most 4 MiB. At least 16 Ki slots (32 KiB): a small cache still sees
        // many distinct URLs, and a crowded sketch over-counts one-hit URLs (a one-hit entry
        // counted twice is spared by eviction, seen in the crash test with 1 Ki slots).
        let expected = opts.max_size.map_or(1 << 16, |m| m / 8192);
        let sketch = FrequencySketch::new(expected.clamp(1 << 14, 1 << 21) as usize);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            index,
            bodies,
            inline_max: opts.inline_max,
            generation: AtomicU64::new(0),
            purge_lock: RwLock::new(Fences::default()),
            released: Mutex::new(ReleasedFiles::default()),
            flushing: Mutex::new(()),
            damaged: AtomicU64::new(0),
            quarantined,
            touches: Mutex::new(HashMap::new()),
            stamp: AtomicU64::new(newest_stamp),
            max_size: opts.max_size,
            recovery_snapshot_every: opts.recovery_snapshot_every,
            evictions: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            sketch,
            pressure: AtomicU8::new(0),
            quarantined_bytes: AtomicU64::new(quarantined_bytes),
            over_budget: AtomicBool::new(false),
            verified: bodies::Verified::default(),
            hot: hot::Hot::new(opts.hot_cache),
        });
        let flusher = opts
            .flush_every_ms
            .map(|ms| Flusher::start(shared.clone(), Duration::from_millis(ms.max(1))));
        Ok(Store {
            inner: Arc::new(Inner {
                shared: Some(shared),
                flusher,
            }),
        })
    }

    fn shared(&self) -> &Shared {
        self.inner
            .shared
            .as_deref()
            .expect("the store is shared until its last handle drops")
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.shared().dir
    }

    /// Where a corrupt database was moved when this store opened, if it was.
    pub fn quarantined(&self) -> Option<&Path> {
        self.shared().quarantined.as_deref()
    }

    /// Every stored variant of a URL (a prefix scan on the primary hash). Undecodable records are
    /// deleted, logged and skipped. Counts the lookup for eviction (memory only), hit or miss:
    /// the proxy calls this once per request.
    pub fn variants(&self, primary: &PrimaryKey) -> Result<Vec<(VariantKey, Entry)>, StoreError> {
        self.shared().sketch.record(primary.hash());
        self.shared().index.scan_primary(primary.hash()).collect()
    }

    /// Every stored variant of a URL, for serving: from the hot tier when it holds the URL,
    /// else read from the index (and kept in the hot tier).
    pub fn lookup(&self, primary: &PrimaryKey) -> Result<Variants, StoreError> {
        // Every lookup, hit or miss, counts for eviction (TinyLFU, memory only).
        self.shared().sketch.record(primary.hash());
        self.peek(primary)
    }

    /// [`Store::lookup`] without counting a use: a second look on behalf of the same request.
    pub fn peek(&self, primary: &PrimaryKey) -> Result<Variants, StoreError> {
        let s = self.shared();
        if let Some(hit) = s.hot.records(primary.hash()) {
            return Ok(hit);
        }
        let version = s.hot.records_version();
        let variants: Variants = s
            .index
            .scan_primary(primary.hash())
            .map(|item| item.map(|(key, entry)| Variant::new(key, entry)))
            .collect::<Result<_, _>>()?;
        s.hot
            .keep_records(*primary.hash(), variants.clone(), version);
        Ok(variants)
    }

    /// The entry stored under `key`.
    pub fn get(&self, key: &VariantKey) -> Result<Option<Entry>, StoreError> {
        self.shared().index.get(key)
    }

    /// The body of `entry` (as returned by this store for `key`) as a verified stream of chunks.
    ///
    /// An inline body is checked before the first chunk: if damaged, the entry is removed and
    /// [`StoreError::BodyCorrupt`] returned. A body file is hashed as it streams; on damage the
    /// stream's last item is an `Err` and the entry is removed. A missing file gives
    /// [`StoreError::BodyMissing`] and removes the entry.
    pub async fn open_body(
        &self,
        key: &VariantKey,
        entry: &Entry,
    ) -> Result<BodyStream, StoreError> {
        let body = &entry.body;
        let hot = &self.shared().hot;
        // A held copy matched this very hash when it was taken: no disk read, no re-hash.
        if let Some(verified) = hot.body(&body.blake3) {
            return Ok(BodyStream::inline(verified));
        }
        if let Some(inline) = &body.inline {
            if inline.len() as u64 != body.len || *blake3::hash(inline).as_bytes() != body.blake3 {
                self.drop_damaged(
                    key,
                    &body.blake3,
                    &entry.url,
                    "inline body does not match its hash",
                );
                return Err(StoreError::BodyCorrupt {
                    url: entry.url.clone(),
                });
            }
            hot.keep_body(body.blake3, inline.clone());
            return Ok(BodyStream::inline(inline.clone()));
        }
        let path = self.shared().bodies.path_of(&body.blake3);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.drop_damaged(key, &body.blake3, &entry.url, "body file is missing");
                return Err(StoreError::BodyMissing(path));
            }
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let (store, key_copy, hash, url) = (self.clone(), *key, body.blake3, entry.url.clone());
        let on_damage = Box::new(move || {
            store.drop_damaged(&key_copy, &hash, &url, "body file does not match its hash");
        });
        let stream = BodyStream::file(file, body.len, body.blake3, entry.url.clone(), on_damage);
        // Small enough for the hot tier: keep the copy this read makes, once it verified. One
        // read per body at a time does, so cold readers do not each buffer their own copy.
        match hot::Filling::begin(&self.shared_arc(), body.len, body.blake3) {
            Some(filling) => Ok(stream.keeping(Box::new(move |verified| filling.done(verified)))),
            None => Ok(stream),
        }
    }

    /// `len` bytes of the body of `entry` starting at byte `start`, verified, for a range request.
    ///
    /// Integrity: a range must never hand out bytes that were not checked against the body's
    /// blake3, yet the time to serve the last 64 KiB of a 1 GiB body must not depend on its
    /// size. Streaming from the start (as [`Store::open_body`] does) fails the second goal;
    /// per-chunk hashes would need a new on-disk format. So the first range read of a body file
    /// in this process hashes the whole file (unless this process wrote it: its writer hashed
    /// every byte at commit), then remembers that the file (by content hash,
    /// device, inode, size, mtime and ctime) is intact; later range reads of the unchanged file
    /// seek straight to `start`. Any write to the file, a replacement or a `touch` changes the
    /// stamp and forces a fresh hash; a mismatch drops the entry and gives
    /// [`StoreError::BodyCorrupt`] before any byte is sent. (Silent media corruption that
    /// changes no metadata would go unseen until the next restart or full read; the store's
    /// full reads still verify every byte.) Inline bodies are checked whole and sliced.
    pub async fn open_body_range(
        &self,
        key: &VariantKey,
        entry: &Entry,
        start: u64,
        len: u64,
    ) -> Result<BodyStream, StoreError> {
        let body = &entry.body;
        if start.checked_add(len).is_none_or(|end| end > body.len) {
            return Err(StoreError::InvalidOptions(format!(
                "range of {len} bytes at {start} is outside a body of {} bytes",
                body.len
            )));
        }
        // In range by the check above, and an inline or hot body is small.
        let (from, to) = (start as usize, (start + len) as usize);
        if let Some(verified) = self.shared().hot.body(&body.blake3) {
            return Ok(BodyStream::inline(verified.slice(from..to)));
        }
        if let Some(inline) = &body.inline {
            if inline.len() as u64 != body.len || *blake3::hash(inline).as_bytes() != body.blake3 {
                self.drop_damaged(
                    key,
                    &body.blake3,
                    &entry.url,
                    "inline body does not match its hash",
                );
                return Err(StoreError::BodyCorrupt {
                    url: entry.url.clone(),
                });
            }
            return Ok(BodyStream::inline(inline.slice(from..to)));
        }
        let path = self.shared().bodies.path_of(&body.blake3);
        let shared = self
            .inner
            .shared
            .clone()
            .expect("the store is shared until its last handle drops");
        let (hash, total, at) = (body.blake3, body.len, path.clone());
        // Hashing a large file is blocking work: keep it off the async worker.
        let checked =
            tokio::task::spawn_blocking(move || -> std::io::Result<Option<std::fs::File>> {
                let mut file = std::fs::File::open(&at)?;
                let before = bodies::FileStamp::of(&file.metadata()?);
                if shared.verified.is_verified(&hash, &before) {
                    return Ok(Some(file));
                }
                let intact = bodies::file_matches(&mut file, total, &hash)?;
                // Changed while we read it: what we hashed may not be what we would send.
                if !intact || bodies::FileStamp::of(&file.metadata()?) != before {
                    shared.verified.forget(&hash);
                    return Ok(None);
                }
                shared.verified.insert(hash, before);
                Ok(Some(file))
            })
            .await
            .map_err(|e| StoreError::Io {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
        let file = match checked {
            Ok(Some(file)) => file,
            Ok(None) => {
                self.drop_damaged(key, &hash, &entry.url, "body file does not match its hash");
                return Err(StoreError::BodyCorrupt {
                    url: entry.url.clone(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.drop_damaged(key, &hash, &entry.url, "body file is missing");
                return Err(StoreError::BodyMissing(path));
            }
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let mut file = tokio::fs::File::from_std(file);
        tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| StoreError::Io {
                path: path.clone(),
                source: e,
            })?;
        Ok(BodyStream::file_slice(file, len, entry.url.clone()))
    }

    /// Reads a whole body into memory, verified (for tests and small bodies).
    pub async fn read_body_to_vec(
        &self,
        key: &VariantKey,
        entry: &Entry,
    ) -> Result<Vec<u8>, StoreError> {
        let mut stream = self.open_body(key, entry).await?;
        let mut out = Vec::with_capacity(usize::try_from(entry.body.len).unwrap_or(0).min(1 << 24));
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => out.extend_from_slice(&c),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Err(StoreError::BodyCorrupt {
                        url: entry.url.clone(),
                    });
                }
                Err(e) => {
                    return Err(StoreError::Io {
                        path: self.shared().bodies.path_of(&entry.body.blake3),
                        source: e,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Removes an entry whose body turned out damaged, unless it was replaced meanwhile.
    fn drop_damaged(&self, key: &VariantKey, body: &[u8; 32], url: &str, why: &str) {
        tracing::warn!(url, key = %key.to_hex(), why, "dropping cache entry with a damaged body");
        self.shared().damaged.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self
            .shared()
            .remove_entry(key, Some(&|e: &Entry| e.body.blake3 == *body))
        {
            tracing::error!(url, error = %e, "cannot remove damaged cache entry");
        }
    }

    /// Begins storing a response whose body arrives in chunks. `entry.body` is ignored.
    /// Captures the purge generation: if any purge happens before commit, the commit fails with
    /// [`StoreError::Superseded`]. Dropping the writer without commit aborts it, leaving nothing.
    pub fn begin_write(&self, key: VariantKey, entry: Entry) -> BodyWriter {
        self.begin_write_since(key, entry, self.purge_generation())
    }

    /// Like `begin_write`, for a response whose origin request was sent under `generation`
    /// (from `purge_generation`): a purge between that request and the commit refuses it, so
    /// content fetched before a purge is never stored after it.
    pub fn begin_write_since(&self, key: VariantKey, entry: Entry, generation: u64) -> BodyWriter {
        BodyWriter {
            generation,
            store: self.clone(),
            key,
            entry,
            hasher: blake3::Hasher::new(),
            len: 0,
            buf: Vec::new(),
            spill: None,
            poisoned: false,
        }
    }

    /// After a 304: replaces the headers and freshness of an existing entry (body untouched).
    /// `Ok(false)` if the entry is gone.
    pub fn update_meta(
        &self,
        key: &VariantKey,
        body: &[u8; 32],
        headers: HeaderList,
        freshness: Freshness,
        generation: u64,
    ) -> Result<bool, StoreError> {
        let shared = self.shared();
        // Same rule as a body commit: a revalidation that began before a purge must not
        // make the purged (or soft-purged) entry fresh again.
        let fences = shared.purge_lock.read().unwrap_or_else(|e| e.into_inner());
        if fences.refuse(key, generation) {
            return Err(StoreError::Superseded);
        }
        let updated = shared.index.update(key, Some(body), &|e: &mut Entry| {
            e.headers = headers.clone();
            e.freshness = freshness;
        });
        shared.hot.invalidate(key);
        updated
    }

    /// The current purge generation; pass it to `update_meta` from before the origin request.
    pub fn purge_generation(&self) -> u64 {
        self.shared().generation.load(Ordering::SeqCst)
    }

    /// Removes one entry; `true` if it was there.
    pub fn remove(&self, key: &VariantKey) -> Result<bool, StoreError> {
        self.shared().remove_entry(key, None)
    }

    /// Removes one entry the expiry index listed, only if it is still dead at `now` and not
    /// `spared` when the removal happens: an entry a fetch replaced since the sweep read the
    /// index stays. `true` if it was removed.
    pub fn remove_expired(
        &self,
        key: &VariantKey,
        now: SystemTime,
        spared: impl Fn(&Entry) -> bool,
    ) -> Result<bool, StoreError> {
        let now_ms = format::time_to_ms(now);
        let still_dead = |e: &Entry| index::expiry_ms(e) <= now_ms && !spared(e);
        self.shared().remove_entry(key, Some(&still_dead))
    }

    /// Purges every variant of a URL. `soft` keeps them but stale from `now` on
    /// ([`Freshness::expired_at`]). Returns the number of entries affected.
    pub fn purge_url(
        &self,
        primary: &PrimaryKey,
        soft: bool,
        now: SystemTime,
    ) -> Result<usize, StoreError> {
        let s = self.shared();
        s.fence_url(primary.hash());
        // One URL: the other URLs' hot records stay (a POST must not empty the hot tier).
        s.purge(s.index.scan_primary(primary.hash()), soft, now)
    }

    /// Purges every entry whose readable URL starts with `url_prefix` (a range scan of the URL index).
    pub fn purge_prefix(
        &self,
        url_prefix: &str,
        soft: bool,
        now: SystemTime,
    ) -> Result<usize, StoreError> {
        let s = self.shared();
        s.bump_generation();
        let _forget = ForgetHotRecords(&s.hot);
        s.purge(s.index.scan_url_prefix(url_prefix), soft, now)
    }

    /// Purges every entry tagged `tag` (Surrogate-Key).
    pub fn purge_tag(&self, tag: &str, soft: bool, now: SystemTime) -> Result<usize, StoreError> {
        let s = self.shared();
        s.bump_generation();
        let _forget = ForgetHotRecords(&s.hot);
        s.purge(s.index.scan_tag(tag), soft, now)
    }

    /// Purges every entry.
    pub fn purge_all(&self, soft: bool, now: SystemTime) -> Result<usize, StoreError> {
        let s = self.shared();
        s.bump_generation();
        let _forget = ForgetHotRecords(&s.hot);
        s.purge(s.index.scan_all(), soft, now)
    }

    /// Streams entries for dump, optionally filtered by URL prefix and tag, one at a time.
    pub fn entries<'s>(
        &'s self,
        url_prefix: Option<&str>,
        tag: Option<&str>,
    ) -> impl Iterator<Item = Result<(VariantKey, Entry), StoreError>> + use<'s> {
        let index = &self.shared().index;
        let prefix = url_prefix.map(str::to_owned);
        let iter: Box<dyn Iterator<Item = Result<(VariantKey, Entry), StoreError>> + 's> =
            match (tag, prefix) {
                (Some(tag), prefix) => {
                    Box::new(
                        index
                            .scan_tag(tag)
                            .filter(move |item| match (item, &prefix) {
                                (Ok((_, e)), Some(p)) => e.url.starts_with(p.as_str()),
                                _ => true,
                            }),
                    )
                }
                (None, Some(prefix)) => Box::new(index.scan_url_prefix(&prefix)),
                (None, None) => Box::new(index.scan_all()),
            };
        iter
    }

    /// Keys whose `stale_until()` is at or before `now`, oldest first, at most `limit`.
    pub fn expired(&self, now: SystemTime, limit: usize) -> Result<Vec<VariantKey>, StoreError> {
        self.shared()
            .index
            .scan_expired(format::time_to_ms(now), limit)
    }

    /// Like [`Store::expired`], resuming after `after` (a position from an earlier call), with
    /// each key's position: a sweep can walk every expired entry in batches without starting
    /// over from the oldest each time.
    pub fn expired_after(
        &self,
        after: Option<&ExpiryPosition>,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<(ExpiryPosition, VariantKey)>, StoreError> {
        let rows = self.shared().index.scan_expired_after(
            after.map(|p| p.0.as_slice()),
            format::time_to_ms(now),
            limit,
        )?;
        Ok(rows
            .into_iter()
            .map(|(row, k)| (ExpiryPosition(row), k))
            .collect())
    }

    /// The store's counters (read from the database, not scanned). Zeroes if it cannot be read.
    pub fn stats(&self) -> StoreStats {
        let s = self.shared();
        let mut stats = s.index.stats().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read store counters");
            StoreStats::default()
        });
        stats.damaged_bodies = s.damaged.load(Ordering::Relaxed);
        stats.evictions = s.evictions.load(Ordering::Relaxed);
        stats.rejected = s.rejected.load(Ordering::Relaxed);
        stats.quarantined_bytes = s.quarantined_bytes.load(Ordering::Relaxed);
        stats.usage_bytes = stats.record_bytes
            + stats.index_bytes
            + stats.body_file_bytes
            + stats.quarantined_bytes;
        stats
    }

    /// A commit that leaves the store over `max_size` wakes the flusher thread to evict (or
    /// evicts right here when there is no such thread), so the bound holds within one batch.
    fn after_commit(&self) {
        let s = self.shared();
        let Some(max) = s.max_size else { return };
        if s.usage() <= max {
            return;
        }
        match &self.inner.flusher {
            Some(f) => {
                s.over_budget.store(true, Ordering::SeqCst);
                let _guard = lock(&f.stop.0);
                f.stop.1.notify_all();
            }
            None => s.evict_if_over(),
        }
    }

    /// Notes that `key` was used at `now`, for the eviction order. Memory only: the order is
    /// persisted in batches by the flusher thread, so a hit never waits on a disk write.
    pub fn touch(&self, key: &VariantKey, now: SystemTime) {
        let s = self.shared();
        let stamp = s.next_stamp(format::time_to_ms(now));
        let mut touches = lock(&s.touches);
        if touches.len() < MAX_PENDING_TOUCHES || touches.contains_key(key) {
            touches.insert(*key, stamp);
        }
    }

    /// Bytes the cache holds: every record (inline bodies included), the keys and index rows of
    /// every entry, every distinct body file, and a quarantined database copy if one is kept.
    /// This is what `max_size` bounds; superseded versions in sled's log come on top (see
    /// `tests/it/bounds.rs` for the measured slack).
    pub fn usage(&self) -> u64 {
        self.shared().usage()
    }

    /// Evicts least recently used entries until `usage() <= target`; returns how many went.
    pub fn evict_to(&self, target: u64) -> Result<u64, StoreError> {
        self.shared().evict_to(target)
    }

    /// Makes every change so far durable (buffered accesses included), then unlinks body files
    /// released before it. The transaction, the fsync and the unlinks run on a blocking thread,
    /// never on the async worker that awaits this.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let shared = self.shared_arc();
        tokio::task::spawn_blocking(move || shared.flush_and_unlink())
            .await
            .map_err(|e| StoreError::Io {
                path: PathBuf::new(),
                source: std::io::Error::other(format!("store flush task failed: {e}")),
            })?
    }

    /// Writes a database recovery snapshot now (the flusher does so every
    /// [`StoreOptions::recovery_snapshot_every`] bytes of log), so that a crash after it replays
    /// only what is written later. Blocking. False if sled skipped it (a page was being allocated).
    pub fn write_recovery_snapshot(&self) -> Result<bool, StoreError> {
        self.shared().index.write_snapshot()
    }

    fn shared_arc(&self) -> Arc<Shared> {
        self.inner
            .shared
            .clone()
            .expect("the store is shared until its last handle drops")
    }

    /// The schema version recorded in the database (after open: always [`CURRENT_SCHEMA`]).
    pub fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        self.shared().index.schema_version()
    }

    /// Re-measures the quarantined database copy (an operator may have deleted it), so that
    /// usage stops counting it. A few `stat` calls; run it from maintenance.
    pub fn refresh_quarantine(&self) {
        let s = self.shared();
        let bytes = index::quarantined_bytes(&s.dir.join("db"));
        s.quarantined_bytes.store(bytes, Ordering::Relaxed);
    }

    /// True if a record that no longer decoded was dropped or replaced since the last
    /// [`Store::reconcile`] began: what it held in the counters and body reference counts is
    /// still counted, until the next reconcile.
    pub fn reconcile_wanted(&self) -> bool {
        self.shared().index.drift_suspected()
    }

    /// Recounts the counters ([`StoreStats`]) and the body reference counts from the records and
    /// sets right whatever drifted, logging what it fixed. Online: it walks the records in
    /// batches of `batch`, each holding off writers only for its own duration, while the store
    /// keeps serving, and folds in every write made meanwhile, so the result is exact. Blocking:
    /// run it on a background thread. Stops early (to resume on a later call) once
    /// `keep_going` returns false; `None` then.
    pub fn reconcile(
        &self,
        batch: usize,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Option<ReconcileReport>, StoreError> {
        self.reconcile_begin();
        while keep_going() {
            if let Some(report) = self.reconcile_step(batch)? {
                return Ok(Some(report));
            }
        }
        Ok(None)
    }

    /// Starts a [`Store::reconcile`] to be driven by [`Store::reconcile_step`] (no-op if one is
    /// under way).
    pub fn reconcile_begin(&self) {
        self.shared().index.recount_begin();
    }

    /// One batch of a reconcile begun by [`Store::reconcile_begin`]; the report once it is done
    /// (also when none was begun: an empty report).
    pub fn reconcile_step(&self, batch: usize) -> Result<Option<ReconcileReport>, StoreError> {
        let s = self.shared();
        let (report, freed) = match s.index.recount_step(batch)? {
            RecountStep::Idle => (Some(ReconcileReport::default()), Vec::new()),
            RecountStep::More { freed } => (None, freed),
            RecountStep::Done { report, freed } => (Some(report), freed),
        };
        // Their stale reference is gone: unlink them after the next flush, like any release.
        lock(&s.released).extend(&freed);
        if let Some(r) = &report {
            if r.repaired.is_empty() && r.refs_repaired == 0 && r.undecodable == 0 {
                tracing::debug!(records = r.records, "store counters agree with the records");
            } else {
                let repaired: Vec<String> = r
                    .repaired
                    .iter()
                    .map(|f| format!("{} {} -> {}", f.counter, f.was, f.now))
                    .collect();
                tracing::warn!(
                    records = r.records,
                    counters = %repaired.join(", "),
                    body_refs = r.refs_repaired,
                    undecodable = r.undecodable,
                    "store counters had drifted from the records; set them right"
                );
            }
        }
        Ok(report)
    }

    /// Deletes body files that no entry references (left by a crash between writing a body and
    /// its record, or by a record that no longer decodes). Walks the body directory: run it from
    /// maintenance, not on the request path. Returns the number of files deleted.
    pub fn sweep_orphan_bodies(&self) -> Result<u64, StoreError> {
        let s = self.shared();
        // An unreferenced file whose release is not durable yet may be referenced again after a
        // crash: find the candidates, make every change so far durable, then re-check each one
        // under the lock as `unlink_released` does (a newer release waits for its own flush).
        let mut candidates = Vec::new();
        for (hash, path) in s.bodies.list()? {
            let orphan = match hash {
                Some(hash) if s.bodies.path_of(&hash) == path => s.index.refcount(&hash)? == 0,
                // A file not at its own content address is never read: delete it whatever its name.
                _ => true,
            };
            if orphan {
                candidates.push((hash, path));
            }
        }
        if candidates.is_empty() {
            return Ok(0);
        }
        s.index.flush()?;
        let mut deleted = 0;
        for (hash, path) in candidates {
            let pending = lock(&s.released);
            let still_orphan = match hash {
                Some(hash) if s.bodies.path_of(&hash) == path => {
                    !pending.contains(&hash) && s.index.refcount(&hash)? == 0
                }
                _ => true,
            };
            if still_orphan {
                s.bodies.remove_path(&path)?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

impl Shared {
    fn next_stamp(&self, now_ms: u64) -> u64 {
        let prev = self
            .stamp
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                Some(now_ms.max(p.saturating_add(1)))
            })
            .unwrap_or(0);
        now_ms.max(prev.saturating_add(1))
    }

    fn usage(&self) -> u64 {
        let db = self
            .index
            .stats()
            .map_or(0, |s| s.record_bytes + s.index_bytes + s.body_file_bytes);
        db + self.quarantined_bytes.load(Ordering::Relaxed)
    }

    /// Writes the buffered touches into the access order, in one transaction.
    fn persist_touches(&self) -> Result<(), StoreError> {
        // Swapped out whole, so hits wait only for the swap, not for the copy.
        let taken = std::mem::take(&mut *lock(&self.touches));
        let touches: Vec<(VariantKey, u64)> = taken.into_iter().collect();
        if touches.is_empty() {
            return Ok(());
        }
        self.index.touch(&touches)
    }

    fn evict_to(&self, target: u64) -> Result<u64, StoreError> {
        // Recent hits must count before choosing victims.
        self.persist_touches()?;
        // Victims looked up more often than the entries that filled the store are spared (moved
        // to the recent end) instead; an explicit evict_to, with no such entries, spares none.
        let pressure = match self.pressure.swap(0, Ordering::SeqCst) {
            0 => u8::MAX,
            p => p,
        };
        // At most about one pass over the entries is spared, so that a store whose entries are
        // all hot still gets below the target.
        let spare_limit = self.index.stats().map_or(0, |s| s.entries);
        let (mut evicted, mut spared) = (0u64, 0u64);
        while self.usage() > target {
            let victims = self.index.least_recently_used(64)?;
            if victims.is_empty() {
                break;
            }
            let before = (evicted, spared);
            let mut spare = Vec::new();
            for (stamp, key) in victims {
                let used = self.sketch.estimate(key.primary_hash());
                if spared < spare_limit && admission::spares(used, pressure) {
                    spared += 1;
                    spare.push((key, self.next_stamp(0)));
                    continue;
                }
                if self.remove_entry(&key, None)? {
                    evicted += 1;
                } else {
                    // A row whose entry is gone would come first in every pass: drop it.
                    self.index.forget_access(stamp, &key)?;
                }
                if self.usage() <= target {
                    break;
                }
            }
            if !spare.is_empty() {
                self.index.touch(&spare)?;
            }
            if (evicted, spared) == before && self.index.least_recently_used(1)?.is_empty() {
                break;
            }
        }
        if spared > 0 {
            tracing::debug!(spared, evicted, "eviction spared entries used more often");
        }
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        Ok(evicted)
    }

    /// TinyLFU admission for a commit of `key` adding about `adding` bytes: if it would take the
    /// store past `max_size`, the entry eviction would take first (the least recently used one
    /// not used since the last persist) must not have been looked up more often.
    fn admit(&self, key: &VariantKey, adding: u64) -> Result<(), StoreError> {
        let Some(max) = self.max_size else {
            return Ok(());
        };
        if self.usage().saturating_add(adding) <= max {
            return Ok(());
        }
        let candidate = self.sketch.estimate(key.primary_hash());
        // The index scan runs before the touches lock is taken: every hit takes that lock.
        let oldest = self.index.least_recently_used(8)?;
        let victim = {
            let touched = lock(&self.touches);
            oldest
                .into_iter()
                .map(|(_, k)| k)
                .find(|k| k != key && !touched.contains_key(k))
        };
        if let Some(victim) = victim
            && !admission::admits(candidate, self.sketch.estimate(victim.primary_hash()))
        {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::NotAdmitted);
        }
        self.pressure.fetch_max(candidate.max(1), Ordering::SeqCst);
        Ok(())
    }

    /// Evicts down to the low-water mark if the store is over `max_size`.
    fn evict_if_over(&self) {
        self.over_budget.store(false, Ordering::SeqCst);
        let Some(max) = self.max_size else { return };
        if self.usage() <= max {
            return;
        }
        match self.evict_to(max / 100 * EVICT_TO_PERCENT) {
            Ok(n) => tracing::debug!(
                evicted = n,
                usage = self.usage(),
                "evicted to stay under max_size"
            ),
            Err(e) => tracing::error!(error = %e, "eviction failed"),
        }
    }

    /// Refuses every write whose origin request was sent before now.
    fn bump_generation(&self) {
        let mut fences = self.purge_lock.write().unwrap_or_else(|e| e.into_inner());
        let now = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        fences.refuse_all(now);
    }

    /// Refuses the writes of one URL's variants whose origin request was sent before now; the
    /// other URLs' fetches in flight are untouched.
    fn fence_url(&self, primary: &[u8; 32]) {
        let mut fences = self.purge_lock.write().unwrap_or_else(|e| e.into_inner());
        let now = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        fences.by_url.insert(*primary, now);
        if fences.by_url.len() > MAX_URL_FENCES {
            fences.fold_oldest_half();
        }
    }

    fn purge(
        &self,
        matching: impl Iterator<Item = Result<(VariantKey, Entry), StoreError>>,
        soft: bool,
        now: SystemTime,
    ) -> Result<usize, StoreError> {
        let mut affected = 0;
        for item in matching {
            let (key, _) = item?;
            let hit = if soft {
                let updated = self.index.update(&key, None, &|e: &mut Entry| {
                    e.freshness = e.freshness.expired_at(now);
                });
                self.hot.invalidate(&key);
                updated?
            } else {
                self.remove_entry(&key, None)?
            };
            affected += usize::from(hit);
        }
        Ok(affected)
    }

    fn remove_entry(
        &self,
        key: &VariantKey,
        only_if: Option<&dyn Fn(&Entry) -> bool>,
    ) -> Result<bool, StoreError> {
        // The transaction and the note of what it freed happen under one lock, so an unlink that
        // checks a file's reference count sees either both or neither (see `unlink_released`).
        let mut released = lock(&self.released);
        let removed = self.index.remove(key, only_if);
        self.hot.invalidate(key);
        match removed? {
            Some(freed) => {
                released.extend(&freed);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The locked part of a commit: generation check, body file install, one transaction.
    fn install_and_index(
        &self,
        key: &VariantKey,
        entry: &Entry,
        record: &[u8],
        temp: Option<tempfile::TempPath>,
        generation: u64,
    ) -> Result<(), StoreError> {
        let fences = self.purge_lock.read().unwrap_or_else(|e| e.into_inner());
        if fences.refuse(key, generation) {
            return Err(StoreError::Superseded);
        }
        // Before the file moves into place: a refused body is just a dropped temp file.
        let file_bytes = if entry.body.inline.is_none() {
            entry.body.len
        } else {
            0
        };
        let adding = record.len() as u64 + index::index_bytes(entry) + file_bytes;
        self.admit(key, adding)?;
        let mut released = lock(&self.released);
        let installed = temp.is_some();
        if let Some(temp) = temp {
            self.bodies.install(temp, &entry.body.blake3)?;
            // The writer hashed every byte of this file: the first range read of it need not
            // hash it again (a 1 GiB body would cost seconds).
            let path = self.bodies.path_of(&entry.body.blake3);
            if let Ok(meta) = std::fs::metadata(&path) {
                self.verified
                    .insert(entry.body.blake3, bodies::FileStamp::of(&meta));
            }
        }
        let stamp = self.next_stamp(format::time_to_ms(entry.stored_at));
        let committed = self.index.commit(key, record, entry, stamp);
        self.hot.invalidate(key);
        match committed {
            Ok(freed) => {
                released.extend(&freed);
                Ok(())
            }
            Err(e) => {
                // The file is in place but nothing new references it: unlink it with the others.
                if installed {
                    released.extend(&[entry.body.blake3]);
                }
                Err(e)
            }
        }
    }

    /// Unlinks the first `n` released body files if they are still unreferenced. Call only once
    /// the transactions that released them are durable.
    ///
    /// The reference count read here is sled's in-memory state, which may be ahead of the disk.
    /// A count of 0 is safe to act on only if it is durable: if the file was referenced again
    /// and released again since (both after the flush), the newer release is not durable yet,
    /// and a crash would bring back the record that references it. Such a newer release is
    /// later in the list (every release is noted there under the lock, atomically with its
    /// transaction), so that file waits for the flush after it.
    fn unlink_released(&self, n: usize) {
        let mut released = lock(&self.released);
        for hash in released.take_first(n) {
            if released.contains(&hash) {
                continue;
            }
            match self.index.refcount(&hash) {
                Ok(0) => {
                    if let Err(e) = self.bodies.unlink(&hash) {
                        tracing::warn!(error = %e, "cannot delete released body file");
                    }
                }
                // Referenced again by a newer write: keep it.
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot check body reference; keeping file"),
            }
        }
    }

    /// Persists buffered accesses, flushes sled, then unlinks the files released before the flush.
    fn flush_and_unlink(&self) -> Result<(), StoreError> {
        let _one_at_a_time = lock(&self.flushing);
        if let Err(e) = self.persist_touches() {
            tracing::warn!(error = %e, "cannot persist the access order");
        }
        let before = lock(&self.released).len();
        // On error nothing is taken from the list: not durable yet, try again next time.
        self.index.flush()?;
        self.unlink_released(before);
        Ok(())
    }
}

/// Forgets every hot record when a purge of many URLs ends, however it ends (each changed
/// entry's URL is also forgotten as it changes).
struct ForgetHotRecords<'a>(&'a hot::Hot);

impl Drop for ForgetHotRecords<'_> {
    fn drop(&mut self) {
        self.0.invalidate_all();
    }
}

/// Body files released by committed transactions, oldest first, waiting for a flush before
/// they may be unlinked. Counted per hash, so "released again since" is one lookup.
#[derive(Default)]
struct ReleasedFiles {
    order: std::collections::VecDeque<[u8; 32]>,
    count: HashMap<[u8; 32], u32>,
}

impl ReleasedFiles {
    fn extend(&mut self, hashes: &[[u8; 32]]) {
        for hash in hashes {
            self.order.push_back(*hash);
            *self.count.entry(*hash).or_insert(0) += 1;
        }
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    /// True if `hash` has a release in the list.
    fn contains(&self, hash: &[u8; 32]) -> bool {
        self.count.contains_key(hash)
    }

    /// Removes and returns the `n` oldest releases.
    fn take_first(&mut self, n: usize) -> Vec<[u8; 32]> {
        let n = n.min(self.order.len());
        let taken: Vec<[u8; 32]> = self.order.drain(..n).collect();
        for hash in &taken {
            if let Some(c) = self.count.get_mut(hash) {
                *c -= 1;
                if *c == 0 {
                    self.count.remove(hash);
                }
            }
        }
        taken
    }
}

impl Flusher {
    fn start(shared: Arc<Shared>, every: Duration) -> Flusher {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = stop.clone();
        let thread = std::thread::Builder::new()
            .name("larder-store-flush".into())
            .spawn(move || {
                let (stopped, wake) = &*signal;
                loop {
                    {
                        let guard = lock(stopped);
                        let (guard, _) = wake
                            .wait_timeout_while(guard, every, |stop| {
                                !*stop && !shared.over_budget.load(Ordering::SeqCst)
                            })
                            .unwrap_or_else(|e| e.into_inner());
                        if *guard {
                            return;
                        }
                    }
                    shared.evict_if_over();
                    if let Err(e) = shared.flush_and_unlink() {
                        // A snapshot now would only fail the same way.
                        tracing::error!(error = %e, "store background flush failed");
                        continue;
                    }
                    if let Some(every) = shared.recovery_snapshot_every {
                        let started = Instant::now();
                        match shared.index.snapshot_if_due(every) {
                            Ok(true) => tracing::debug!(
                                ms = started.elapsed().as_millis() as u64,
                                "wrote a database recovery snapshot"
                            ),
                            Ok(false) => {}
                            Err(e) => tracing::warn!(
                                error = %e,
                                "database recovery snapshot failed; next try after another interval of log"
                            ),
                        }
                    }
                }
            });
        match thread {
            Ok(t) => Flusher {
                stop,
                thread: Some(t),
            },
            Err(e) => {
                // Without the thread the store still works; it is flushed on flush() and close.
                tracing::error!(error = %e, "cannot start the store flusher thread");
                Flusher { stop, thread: None }
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(f) = &mut self.flusher {
            *lock(&f.stop.0) = true;
            f.stop.1.notify_all();
            if let Some(t) = f.thread.take() {
                let _ = t.join();
            }
        }
        let Some(shared) = self.shared.take() else {
            return;
        };
        if let Err(e) = shared.flush_and_unlink() {
            tracing::error!(error = %e, "store flush on close failed");
        }
        // sled 0.34 writes a recovery snapshot itself only while opening; the flusher's bound
        // the replay after a crash, and this one leaves (next to) nothing to replay at the next
        // start. Sound while body streams still hold the database: the snapshot is fuzzy.
        let mut written = false;
        for _ in 0..3 {
            match shared.index.write_snapshot() {
                Ok(true) => written = true,
                Ok(false) => continue,
                Err(e) => tracing::warn!(error = %e, "store snapshot on close failed"),
            }
            break;
        }
        if !written {
            tracing::warn!(
                "no recovery snapshot written on close; the next open replays the log since the last one"
            );
        }
    }
}

/// A response body being stored: buffered in memory up to `inline_max`, then spilled to a temp
/// file in the bodies directory. Dropping it without [`BodyWriter::commit`] aborts: the temp file is
/// removed and nothing is stored.
pub struct BodyWriter {
    store: Store,
    key: VariantKey,
    entry: Entry,
    generation: u64,
    hasher: blake3::Hasher,
    len: u64,
    buf: Vec<u8>,
    spill: Option<SpillFile>,
    poisoned: bool,
}

impl BodyWriter {
    /// Appends a chunk of the body.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(poisoned());
        }
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        let result = self.append(chunk).await;
        self.poisoned = result.is_err();
        result
    }

    async fn append(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        if let Some(spill) = &mut self.spill {
            return spill.write(chunk).await;
        }
        if self.buf.len() + chunk.len() <= self.store.shared().inline_max {
            self.buf.extend_from_slice(chunk);
            return Ok(());
        }
        let mut spill = self.store.shared().bodies.spill()?;
        spill.write(&std::mem::take(&mut self.buf)).await?;
        spill.write(chunk).await?;
        self.spill = Some(spill);
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores the entry if the body is complete: with `expected_len = Some(n)` exactly `n` bytes
    /// must have been written, else [`StoreError::Truncated`]. A body file is fsynced and renamed to
    /// its content address (one copy per content); its reference count, the record, the tag, URL
    /// and expiry indexes and the counters change in one transaction. Replacing an entry releases
    /// the old body. Returns the entry as `get` will return it.
    pub async fn commit(self, expected_len: Option<u64>) -> Result<Entry, StoreError> {
        if self.poisoned {
            return Err(poisoned());
        }
        if let Some(expected) = expected_len
            && expected != self.len
        {
            return Err(StoreError::Truncated {
                expected,
                got: self.len,
            });
        }
        let BodyWriter {
            store,
            key,
            mut entry,
            generation,
            hasher,
            len,
            buf,
            spill,
            ..
        } = self;
        entry.body = BodyInfo {
            len,
            blake3: *hasher.finalize().as_bytes(),
            inline: spill.is_none().then(|| Bytes::from(buf)),
        };
        let entry = format::normalize(entry);
        let record = format::encode_entry(&entry)?;
        let temp = match spill {
            Some(spill) => Some(spill.finish().await?),
            None => None,
        };
        // The rename, directory fsync and sled transaction block: keep them (and any eviction
        // the commit triggers) off the async worker that serves requests.
        tokio::task::spawn_blocking(move || {
            store
                .shared()
                .install_and_index(&key, &entry, &record, temp, generation)?;
            store.after_commit();
            Ok(entry)
        })
        .await
        .map_err(|e| StoreError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(format!("store commit task failed: {e}")),
        })?
    }
}

fn poisoned() -> StoreError {
    StoreError::Io {
        path: PathBuf::new(),
        source: std::io::Error::other("an earlier write to this body failed"),
    }
}

#[cfg(test)]
mod tests;
