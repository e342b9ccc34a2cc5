//! The sled trees holding entry records and everything indexed from them (URLs, tags, expiry, body reference counts, counters, schema version); the ONLY file that uses sled.
//!
//! Trees (layout frozen as schema v1, see `migrations/0001-initial.md`):
//! - `entries`:  variant key (64 B) → record (format.rs)
//! - `urls`:     url bytes ‖ variant key → ""            (purge/dump by URL prefix = range scan)
//! - `tags`:     u32 BE len ‖ tag ‖ variant key → ""     (purge/dump by tag)
//! - `expiry`:   stale_until unix ms u64 BE ‖ variant key → ""   (oldest first)
//! - `bodyrefs`: body blake3 (32 B) → u64 BE reference count (file bodies only)
//! - `meta`:     "schema_version" → u32 BE; "stat.*" → u64 BE counters
//! - `access`, `lru`: the access order (schema v2, `migrations/0002-access-order.md`)
//!
//! Every change to an entry updates all of these in ONE sled transaction, so after a crash the
//! indexes and counters agree with the records. Index rows whose record is gone or disagrees
//! (possible only after a record failed to decode) are deleted when a scan meets them; the
//! counters and reference counts such a record held are set right by a recount
//! ([`Index::recount_step`], reconcile.rs), which the store runs in the background after start
//! and again after a record failed to decode.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::SystemTime;

use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree, abort,
};
use sled::{Db, Transactional, Tree};

use super::format::{FormatError, decode_entry, encode_entry, time_to_ms};
use super::reconcile::{Change, ReconcileReport, Recount, RecountStep, Repair, Share, Totals};
use super::{Entry, StoreError, StoreStats};
use crate::key::VariantKey;

const KEY_LEN: usize = 64;
/// Index rows carry everything in their key.
const EMPTY: &[u8] = &[];
pub(super) const SCHEMA_KEY: &[u8] = b"schema_version";
const STAT_ENTRIES: &[u8] = b"stat.entries";
const STAT_BODY_BYTES: &[u8] = b"stat.body_bytes";
const STAT_FILES: &[u8] = b"stat.files";
const STAT_FILE_BYTES: &[u8] = b"stat.file_bytes";
/// Sum of the encoded record sizes (inline bodies included).
const STAT_RECORD_BYTES: &[u8] = b"stat.record_bytes";
/// Sum of what the keys and index rows of every entry (and every reference row) take in sled,
/// see [`index_bytes`]. With the records and the body files: the bytes the cache holds, which
/// eviction keeps under `max_size`. Added after schema v2 shipped; a store without it gets it
/// from the recount after start.
const STAT_INDEX_BYTES: &[u8] = b"stat.index_bytes";

/// What sled stores per row besides its key and value bytes: an item header in its leaf and its
/// share of the leaf's own header and of the page table (sled splits leaves at 16 items).
/// Measured in `tests/it/bounds.rs::small_entries_stay_within_max_size`; sled's log keeps
/// superseded versions on top of that until it cleans a segment, which is its stated slack.
pub(super) const ROW_OVERHEAD: u64 = 300;

/// The `bodyrefs` row of one body file.
pub(super) const REF_ROW_BYTES: u64 = 32 + 8 + ROW_OVERHEAD;

/// Bytes the keys and index rows of `e` take in sled: its `entries` key, its `urls`, `tags`,
/// `expiry`, `access` and `lru` rows, each with [`ROW_OVERHEAD`]. Charged to usage with the
/// record, so that a cache of many small entries is bounded too.
pub(super) fn index_bytes(e: &Entry) -> u64 {
    let key = KEY_LEN as u64;
    let tags: u64 = e.tags.iter().map(|t| 4 + t.len() as u64 + key).sum();
    let rows = 5 + e.tags.len() as u64;
    key + (e.url.len() as u64 + key)
        + tags
        + (8 + key)
        + (key + 8)
        + (8 + key)
        + rows * ROW_OVERHEAD
}

/// What a record of `record_len` bytes that decodes to `entry` (or does not decode) counts for.
fn share(record_len: usize, entry: Option<&Entry>) -> Share {
    match entry {
        Some(e) => Share {
            record_bytes: record_len as u64,
            index_bytes: index_bytes(e),
            body_bytes: e.body.len,
            file: is_file(e).then_some((e.body.blake3, e.body.len)),
        },
        // Nothing in it can be trusted but its size: the recount sets the rest right.
        None => Share {
            record_bytes: record_len as u64,
            ..Share::default()
        },
    }
}

pub(super) fn db_err(e: sled::Error) -> StoreError {
    StoreError::Db(Box::new(e))
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => db_err(e),
    }
}

/// The open sled database and its trees.
pub(super) struct Index {
    db: Db,
    entries: Tree,
    urls: Tree,
    tags: Tree,
    expiry: Tree,
    refs: Tree,
    meta: Tree,
    /// key → last access (ms, big-endian): where the key's row sits in `lru` (schema v2).
    access: Tree,
    /// last access ms ‖ key → (): least recently used first (schema v2).
    lru: Tree,
    /// Records dropped because they did not decode, since open.
    dropped: AtomicU64,
    /// The recount in progress, if any. Every mutation of a record holds this lock across its
    /// transaction, and so does each recount batch: a batch sees no half-applied change, and
    /// every change behind the walk is folded into it (see reconcile.rs).
    recount: Mutex<Option<Recount>>,
    /// Set when a record's share could not be subtracted (it did not decode): the counters
    /// may be off until the next recount.
    drift: AtomicBool,
    /// The log position the newest sled recovery snapshot covers (see [`Index::snapshot_if_due`]).
    snapshot_at: AtomicI64,
}

/// The eight trees inside one transaction.
struct Tx<'a> {
    e: &'a TransactionalTree,
    u: &'a TransactionalTree,
    t: &'a TransactionalTree,
    x: &'a TransactionalTree,
    r: &'a TransactionalTree,
    m: &'a TransactionalTree,
    a: &'a TransactionalTree,
    l: &'a TransactionalTree,
}

type TxResult<T> = ConflictableTransactionResult<T, StoreError>;

/// Opens (or creates) the sled database at `path`. On corruption the directory is renamed to
/// `<path>.corrupt-<unix secs of now>` and an empty one is opened: the cache is disposable, the
/// proxy is not. Returns where the damaged directory went, if it was moved.
pub(super) fn open(
    path: &Path,
    cache_capacity: u64,
    now: SystemTime,
) -> Result<(Index, Option<PathBuf>), StoreError> {
    match try_open(path, cache_capacity) {
        Ok(index) => Ok((index, None)),
        Err(Failure::Corrupt(why)) => {
            let aside = quarantine_path(path, now);
            tracing::error!(
                store = %path.display(),
                moved_to = %aside.display(),
                error = %why,
                "store database is corrupt; moved it aside and starting with an empty cache"
            );
            std::fs::rename(path, &aside).map_err(StoreError::io(path))?;
            prune_quarantined(path, &aside);
            match try_open(path, cache_capacity) {
                Ok(index) => Ok((index, Some(aside))),
                Err(Failure::Corrupt(why)) => Err(StoreError::Db(why.into())),
                Err(Failure::Other(e)) => Err(e),
            }
        }
        Err(Failure::Other(e)) => Err(e),
    }
}

enum Failure {
    Corrupt(String),
    Other(StoreError),
}

/// [`try_open_now`], waiting up to a second for a lock this process just released: sled lets go
/// of its file lock only when its I/O threads finish with a handle that was dropped, so a
/// reopen in the same process (tests, a restart in place) can find it still held.
fn try_open(path: &Path, cache_capacity: u64) -> Result<Index, Failure> {
    let mut tries = 0;
    loop {
        match try_open_now(path, cache_capacity) {
            Err(Failure::Other(StoreError::Locked(_))) if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn try_open_now(path: &Path, cache_capacity: u64) -> Result<Index, Failure> {
    // sled has been seen to panic instead of erroring on some damaged logs; a panic while opening
    // is treated like reported corruption, never allowed to take the process down.
    let attempt = std::panic::catch_unwind(|| -> sled::Result<Index> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity)
            // The store runs its own flusher: it must know when a flush finished, to unlink
            // released body files only once their removal is durable.
            .flush_every_ms(None)
            .open()?;
        let index = Index {
            entries: db.open_tree("entries")?,
            urls: db.open_tree("urls")?,
            tags: db.open_tree("tags")?,
            expiry: db.open_tree("expiry")?,
            refs: db.open_tree("bodyrefs")?,
            meta: db.open_tree("meta")?,
            access: db.open_tree("access")?,
            lru: db.open_tree("lru")?,
            snapshot_at: AtomicI64::new(db.stable_log_position()),
            db,
            dropped: AtomicU64::new(0),
            recount: Mutex::new(None),
            drift: AtomicBool::new(false),
        };
        // Reading one key forces recovery far enough to surface a damaged meta tree now.
        index.meta.get(SCHEMA_KEY)?;
        Ok(index)
    });
    match attempt {
        Ok(Ok(index)) => Ok(index),
        Ok(Err(e)) => Err(classify(path, e)),
        Err(_) => Err(Failure::Corrupt("sled panicked while opening".into())),
    }
}

fn classify(path: &Path, e: sled::Error) -> Failure {
    match e {
        // `Unsupported` is what sled says when its `conf` file holds garbage; to the cache that is
        // the same as corruption.
        sled::Error::Corruption { .. }
        | sled::Error::ReportableBug(_)
        | sled::Error::Unsupported(_) => Failure::Corrupt(e.to_string()),
        // sled reports a held lock as a generic I/O error ("could not acquire lock on …").
        sled::Error::Io(ref io)
            if io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock") =>
        {
            Failure::Other(StoreError::Locked(path.to_path_buf()))
        }
        other => Failure::Other(db_err(other)),
    }
}

fn quarantine_path(path: &Path, now: SystemTime) -> PathBuf {
    let secs = time_to_ms(now) / 1000;
    let base = format!("{}.corrupt-{secs}", path.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    // Two corruptions within one second must not collide.
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    candidate
}

/// Quarantined copies kept next to the database: the newest one, for inspection. Older ones
/// are deleted so that repeated corruption cannot fill the disk with copies.
const KEEP_QUARANTINED: usize = 1;

/// The `<db>.corrupt-*` directories next to the database at `path`.
fn quarantined_dirs(path: &Path) -> Vec<PathBuf> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.corrupt-", name.to_string_lossy());
    let Ok(items) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    items
        .flatten()
        .filter(|i| i.file_name().to_string_lossy().starts_with(&prefix))
        .map(|i| i.path())
        .collect()
}

/// Deletes quarantined copies other than `keep` beyond [`KEEP_QUARANTINED`], oldest first.
fn prune_quarantined(path: &Path, keep: &Path) {
    let mut others: Vec<(SystemTime, PathBuf)> = quarantined_dirs(path)
        .into_iter()
        .filter(|p| p != keep)
        .map(|p| {
            let at = std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (at, p)
        })
        .collect();
    // Newest first; the one just moved aside counts as the newest.
    others.sort_by(|a, b| b.cmp(a));
    for (_, old) in others.into_iter().skip(KEEP_QUARANTINED.saturating_sub(1)) {
        match std::fs::remove_dir_all(&old) {
            Ok(()) => tracing::warn!(
                removed = %old.display(),
                kept = %keep.display(),
                "deleted an older quarantined store database (only the newest copy is kept)"
            ),
            Err(e) => tracing::error!(
                path = %old.display(),
                error = %e,
                "cannot delete an older quarantined store database"
            ),
        }
    }
}

/// Bytes of the quarantined copies next to the database at `path` (they count toward the data
/// directory's size until an operator deletes them).
pub(super) fn quarantined_bytes(path: &Path) -> u64 {
    fn du(dir: &Path) -> u64 {
        let Ok(items) = std::fs::read_dir(dir) else {
            return 0;
        };
        items
            .flatten()
            .map(|i| match i.metadata() {
                Ok(m) if m.is_dir() => du(&i.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    quarantined_dirs(path).iter().map(|d| du(d)).sum()
}

fn url_row(url: &str, key: &VariantKey) -> Vec<u8> {
    let mut row = Vec::with_capacity(url.len() + KEY_LEN);
    row.extend_from_slice(url.as_bytes());
    row.extend_from_slice(key.as_bytes());
    row
}

pub(super) fn tag_prefix(tag: &str) -> Vec<u8> {
    // Length-prefixed so that tag "a" never prefix-matches rows of tag "ab".
    let mut row = Vec::with_capacity(4 + tag.len() + KEY_LEN);
    row.extend_from_slice(&(tag.len() as u32).to_be_bytes());
    row.extend_from_slice(tag.as_bytes());
    row
}

/// The variant key at the end of an index row whose own part is at least `key_at` bytes long.
pub(super) fn key_of_row(row: &[u8], key_at: usize) -> Option<VariantKey> {
    row.len()
        .checked_sub(KEY_LEN)
        .filter(|&at| at >= key_at)
        .and_then(|at| VariantKey::from_bytes(&row[at..]))
}

/// True if the `urls` row `row` is the row of entry `e` (rows can outlive or predate an entry).
pub(super) fn url_row_matches(row: &[u8], e: &Entry) -> bool {
    row.len() == e.url.len() + KEY_LEN && row.starts_with(e.url.as_bytes())
}

/// True if the `tags` row `row`, whose tag part is `at` bytes long, is a row of entry `e`.
pub(super) fn tag_row_matches(row: &[u8], at: usize, e: &Entry) -> bool {
    row.len() == at + KEY_LEN && e.tags.iter().any(|t| tag_prefix(t) == row[..at])
}

fn tag_row(tag: &str, key: &VariantKey) -> Vec<u8> {
    let mut row = tag_prefix(tag);
    row.extend_from_slice(key.as_bytes());
    row
}

/// When an entry stops being usable without the origin: the expiry index's sort key.
pub(super) fn expiry_ms(e: &Entry) -> u64 {
    time_to_ms(e.freshness.stale_until())
}

fn expiry_row(ms: u64, key: &VariantKey) -> Vec<u8> {
    let mut row = Vec::with_capacity(8 + KEY_LEN);
    row.extend_from_slice(&ms.to_be_bytes());
    row.extend_from_slice(key.as_bytes());
    row
}

fn be_u64(v: &[u8]) -> u64 {
    v.try_into().map_or(0, u64::from_be_bytes)
}

fn is_file(e: &Entry) -> bool {
    e.body.inline.is_none()
}

impl Tx<'_> {
    fn insert_rows(&self, key: &VariantKey, e: &Entry) -> TxResult<()> {
        self.u.insert(url_row(&e.url, key), EMPTY)?;
        for tag in &e.tags {
            self.t.insert(tag_row(tag, key), EMPTY)?;
        }
        self.x.insert(expiry_row(expiry_ms(e), key), EMPTY)?;
        Ok(())
    }

    fn remove_rows(&self, key: &VariantKey, e: &Entry) -> TxResult<()> {
        self.u.remove(url_row(&e.url, key))?;
        for tag in &e.tags {
            self.t.remove(tag_row(tag, key))?;
        }
        self.x.remove(expiry_row(expiry_ms(e), key))?;
        Ok(())
    }

    /// Puts `key` at `ms` in the access order (a new or replaced entry counts as just used).
    fn insert_access(&self, key: &VariantKey, ms: u64) -> TxResult<()> {
        self.remove_access(key)?;
        self.a.insert(&key.as_bytes()[..], &ms.to_be_bytes()[..])?;
        self.l.insert(expiry_row(ms, key), EMPTY)?;
        Ok(())
    }

    fn remove_access(&self, key: &VariantKey) -> TxResult<()> {
        if let Some(old) = self.a.remove(&key.as_bytes()[..])? {
            self.l.remove(expiry_row(be_u64(&old), key))?;
        }
        Ok(())
    }

    fn bump(&self, stat: &[u8], delta: i64) -> TxResult<()> {
        // Every write is a record in sled's log: leave unchanged counters alone.
        if delta == 0 {
            return Ok(());
        }
        let cur = self.m.get(stat)?.map_or(0, |v| be_u64(&v));
        let next = cur.saturating_add_signed(delta);
        self.m.insert(stat, &next.to_be_bytes()[..])?;
        Ok(())
    }

    /// Applies reference-count changes (hash, body length, delta), merged per hash so that a
    /// replacement with the same body is a no-op. Returns the hashes left with no reference:
    /// their files may be unlinked once this transaction is durable.
    fn apply_refs(&self, deltas: &[([u8; 32], u64, i64)]) -> TxResult<Vec<[u8; 32]>> {
        let mut merged: BTreeMap<[u8; 32], (u64, i64)> = BTreeMap::new();
        for (hash, len, d) in deltas {
            let slot = merged.entry(*hash).or_insert((*len, 0));
            slot.1 += d;
        }
        let mut freed = Vec::new();
        for (hash, (len, d)) in merged {
            if d == 0 {
                continue;
            }
            let cur = self.r.get(hash)?.map_or(0, |v| be_u64(&v));
            let next = cur.saturating_add_signed(d);
            if next == 0 {
                if cur > 0 {
                    self.r.remove(&hash[..])?;
                    self.bump(STAT_FILES, -1)?;
                    self.bump(STAT_FILE_BYTES, -(len as i64))?;
                    self.bump(STAT_INDEX_BYTES, -(REF_ROW_BYTES as i64))?;
                }
                freed.push(hash);
            } else {
                self.r.insert(&hash[..], &next.to_be_bytes()[..])?;
                if cur == 0 {
                    self.bump(STAT_FILES, 1)?;
                    self.bump(STAT_FILE_BYTES, len as i64)?;
                    self.bump(STAT_INDEX_BYTES, REF_ROW_BYTES as i64)?;
                }
            }
        }
        Ok(freed)
    }

    /// Moves the counters and the body reference from the share of the old record to that of
    /// the new one (either may be absent). Returns the hashes left with no reference.
    fn account(&self, old: Option<&Share>, new: Option<&Share>) -> TxResult<Vec<[u8; 32]>> {
        let diff = |f: fn(&Share) -> u64| new.map_or(0, f) as i64 - old.map_or(0, f) as i64;
        self.bump(
            STAT_ENTRIES,
            i64::from(new.is_some()) - i64::from(old.is_some()),
        )?;
        self.bump(STAT_RECORD_BYTES, diff(|s| s.record_bytes))?;
        self.bump(STAT_INDEX_BYTES, diff(|s| s.index_bytes))?;
        self.bump(STAT_BODY_BYTES, diff(|s| s.body_bytes))?;
        let mut deltas = Vec::with_capacity(2);
        if let Some((hash, len)) = old.and_then(|s| s.file) {
            deltas.push((hash, len, -1));
        }
        if let Some((hash, len)) = new.and_then(|s| s.file) {
            deltas.push((hash, len, 1));
        }
        self.apply_refs(&deltas)
    }
}

/// What a transaction found when it tried to change a record in place.
enum Found<T> {
    Gone,
    Undecodable(FormatError),
    Done(T),
}

impl Index {
    fn txn<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, StoreError> {
        (
            &self.entries,
            &self.urls,
            &self.tags,
            &self.expiry,
            &self.refs,
            &self.meta,
            &self.access,
            &self.lru,
        )
            .transaction(|(e, u, t, x, r, m, a, l)| {
                f(&Tx {
                    e,
                    u,
                    t,
                    x,
                    r,
                    m,
                    a,
                    l,
                })
            })
            .map_err(tx_err)
    }

    /// The recorded schema version, `None` for a store that has never recorded one (new).
    pub(super) fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        let v = self.meta.get(SCHEMA_KEY).map_err(db_err)?;
        Ok(v.map(|v| v.as_ref().try_into().map_or(0, u32::from_be_bytes)))
    }

    /// Records the schema version; durable once this returns.
    pub(super) fn set_schema_version(&self, version: u32) -> Result<(), StoreError> {
        self.meta
            .insert(SCHEMA_KEY, &version.to_be_bytes()[..])
            .map_err(db_err)?;
        self.db.flush().map_err(db_err)?;
        Ok(())
    }

    /// True if the entries tree holds no record (a cheap check: one iterator step).
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Runs one mutation of the record of `key` as a transaction, holding the recount lock so
    /// that a recount in progress folds the change in (see reconcile.rs).
    fn mutate<T>(
        &self,
        key: &VariantKey,
        f: impl Fn(&Tx<'_>) -> TxResult<(T, Change)>,
    ) -> Result<T, StoreError> {
        let mut recount = self.recount.lock().unwrap_or_else(|e| e.into_inner());
        let (out, change) = self.txn(f)?;
        if let Some(r) = recount.as_mut() {
            r.observe(key.as_bytes(), &change);
        }
        Ok(out)
    }

    /// The share of the record `bytes` of `key`, unindexing its rows if it decodes. One that no
    /// longer decodes keeps its rows until a scan heals them, and what it held in the counters
    /// and reference counts until the next recount (flagged here): nothing wrong is served.
    fn unindex(&self, tx: &Tx<'_>, key: &VariantKey, bytes: &[u8]) -> TxResult<Share> {
        match decode_entry(bytes) {
            Ok(old) => {
                tx.remove_rows(key, &old)?;
                Ok(share(bytes.len(), Some(&old)))
            }
            Err(_) => {
                self.drift.store(true, Ordering::SeqCst);
                Ok(share(bytes.len(), None))
            }
        }
    }

    /// Inserts or replaces the record of `key` (already encoded as `record`) with all its index
    /// rows, counters and body reference, releasing whatever the old record held.
    /// Returns the body hashes left unreferenced.
    pub(super) fn commit(
        &self,
        key: &VariantKey,
        record: &[u8],
        new: &Entry,
        access_stamp: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        let new_share = share(record.len(), Some(new));
        self.mutate(key, |tx| {
            let old = match tx.e.get(key.as_bytes())? {
                Some(bytes) => Some(self.unindex(tx, key, &bytes)?),
                None => None,
            };
            tx.insert_access(key, access_stamp)?;
            tx.insert_rows(key, new)?;
            let freed = tx.account(old.as_ref(), Some(&new_share))?;
            tx.e.insert(&key.as_bytes()[..], record)?;
            let change = Change {
                old,
                new: Some(new_share),
            };
            Ok((freed, change))
        })
    }

    /// Removes the record of `key`; with `only_if`, only while the record inside the transaction
    /// still passes it (so a reader that found a damaged body, or a sweep that found an entry
    /// dead, cannot remove a newer replacement; an undecodable record always goes). `None` if
    /// nothing was removed, else the body hashes left unreferenced.
    pub(super) fn remove(
        &self,
        key: &VariantKey,
        only_if: Option<&dyn Fn(&Entry) -> bool>,
    ) -> Result<Option<Vec<[u8; 32]>>, StoreError> {
        self.mutate(key, |tx| {
            let Some(bytes) = tx.e.get(key.as_bytes())? else {
                return Ok((None, Change::default()));
            };
            if let (Some(still), Ok(old)) = (only_if, decode_entry(&bytes))
                && !still(&old)
            {
                return Ok((None, Change::default()));
            }
            let old = self.unindex(tx, key, &bytes)?;
            tx.remove_access(key)?;
            tx.e.remove(&key.as_bytes()[..])?;
            let freed = tx.account(Some(&old), None)?;
            let change = Change {
                old: Some(old),
                new: None,
            };
            Ok((Some(freed), change))
        })
    }

    /// Rewrites the record of `key` through `change` (headers and freshness only; the body and its
    /// reference stay). `false` if the record is gone.
    pub(super) fn update(
        &self,
        key: &VariantKey,
        only_if_body: Option<&[u8; 32]>,
        change: &dyn Fn(&mut Entry),
    ) -> Result<bool, StoreError> {
        let found = self.mutate(key, |tx| {
            let Some(bytes) = tx.e.get(key.as_bytes())? else {
                return Ok((Found::Gone, Change::default()));
            };
            let old = match decode_entry(&bytes) {
                Ok(old) => old,
                Err(e) => return Ok((Found::Undecodable(e), Change::default())),
            };
            // Replaced by another body since the caller read it: the change was meant for that
            // older response, not for this one.
            if only_if_body.is_some_and(|h| *h != old.body.blake3) {
                return Ok((Found::Gone, Change::default()));
            }
            let mut new = old.clone();
            change(&mut new);
            new.body = old.body.clone();
            let record = match encode_entry(&new) {
                Ok(r) => r,
                Err(e) => return abort(StoreError::from(e)),
            };
            tx.remove_rows(key, &old)?;
            tx.insert_rows(key, &new)?;
            tx.e.insert(&key.as_bytes()[..], record.as_slice())?;
            let (old, new) = (
                share(bytes.len(), Some(&old)),
                share(record.len(), Some(&new)),
            );
            // Same body: no reference changes, nothing freed.
            tx.account(Some(&old), Some(&new))?;
            let change = Change {
                old: Some(old),
                new: Some(new),
            };
            Ok((Found::Done(()), change))
        })?;
        match found {
            Found::Done(()) => Ok(true),
            Found::Gone => Ok(false),
            Found::Undecodable(e) => {
                self.drop_undecodable(key, &e)?;
                Ok(false)
            }
        }
    }

    /// The entry stored under `key`; an undecodable record is dropped (logged) and reads as absent.
    pub(super) fn get(&self, key: &VariantKey) -> Result<Option<Entry>, StoreError> {
        let Some(bytes) = self.entries.get(key.as_bytes()).map_err(db_err)? else {
            return Ok(None);
        };
        match decode_entry(&bytes) {
            Ok(e) => Ok(Some(e)),
            Err(e) => {
                self.drop_undecodable(key, &e)?;
                Ok(None)
            }
        }
    }

    fn drop_undecodable(&self, key: &VariantKey, why: &FormatError) -> Result<(), StoreError> {
        tracing::warn!(key = %key.to_hex(), error = %why, "dropping undecodable store record");
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.mutate(key, |tx| {
            // Re-check inside the transaction: a writer may have replaced it meanwhile.
            match tx.e.get(key.as_bytes())? {
                Some(bytes) if decode_entry(&bytes).is_err() => {
                    let old = self.unindex(tx, key, &bytes)?;
                    tx.e.remove(&key.as_bytes()[..])?;
                    tx.remove_access(key)?;
                    tx.account(Some(&old), None)?;
                    let change = Change {
                        old: Some(old),
                        new: None,
                    };
                    Ok(((), change))
                }
                _ => Ok(((), Change::default())),
            }
        })
    }

    fn decode_rows<'a>(
        &'a self,
        iter: sled::Iter,
    ) -> impl Iterator<Item = Result<(VariantKey, Entry), StoreError>> + 'a {
        iter.filter_map(move |item| {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => return Some(Err(db_err(e))),
            };
            let Some(key) = VariantKey::from_bytes(&k) else {
                tracing::warn!(len = k.len(), "dropping store record with a malformed key");
                return self.entries.remove(&k).err().map(|e| Err(db_err(e)));
            };
            match decode_entry(&v) {
                Ok(e) => Some(Ok((key, e))),
                Err(why) => self.drop_undecodable(&key, &why).err().map(Err),
            }
        })
    }

    /// Every variant stored under one primary hash.
    pub(super) fn scan_primary<'a>(
        &'a self,
        primary: &[u8; 32],
    ) -> impl Iterator<Item = Result<(VariantKey, Entry), StoreError>> + use<'a> {
        self.decode_rows(self.entries.scan_prefix(primary))
    }

    /// Every entry, in key order.
    pub(super) fn scan_all(
        &self,
    ) -> impl Iterator<Item = Result<(VariantKey, Entry), StoreError>> + '_ {
        self.decode_rows(self.entries.iter())
    }

    /// Resolves index rows to entries, healing rows whose entry is gone or no longer matches.
    fn resolve_rows<'a>(
        &'a self,
        tree: &'a Tree,
        iter: sled::Iter,
        key_at: usize,
        matches: impl Fn(&[u8], &Entry) -> bool + 'a,
    ) -> impl Iterator<Item = Result<(VariantKey, Entry), StoreError>> + 'a {
        self.resolve_rows_with_row(tree, iter, key_at, matches)
            .map(|r| r.map(|(_, key, e)| (key, e)))
    }

    /// [`Index::resolve_rows`], with each row.
    fn resolve_rows_with_row<'a>(
        &'a self,
        tree: &'a Tree,
        iter: sled::Iter,
        key_at: usize,
        matches: impl Fn(&[u8], &Entry) -> bool + 'a,
    ) -> impl Iterator<Item = Result<(sled::IVec, VariantKey, Entry), StoreError>> + 'a {
        iter.filter_map(move |item| {
            let row = match item {
                Ok((row, _)) => row,
                Err(e) => return Some(Err(db_err(e))),
            };
            let Some(key) = key_of_row(&row, key_at) else {
                return tree.remove(&row).err().map(|e| Err(db_err(e)));
            };
            match self.get(&key) {
                Err(e) => Some(Err(e)),
                Ok(Some(e)) if matches(&row, &e) => Some(Ok((row, key, e))),
                Ok(_) => self.heal(tree, &row, &key, &matches).err().map(Err),
            }
        })
    }

    /// Deletes an index row whose entry is gone or disagrees, re-checked in a transaction so a
    /// concurrent commit that just wrote both is not undone.
    fn heal(
        &self,
        tree: &Tree,
        row: &[u8],
        key: &VariantKey,
        matches: &dyn Fn(&[u8], &Entry) -> bool,
    ) -> Result<(), StoreError> {
        (&self.entries, tree)
            .transaction(|(e, t)| {
                let valid = match e.get(key.as_bytes())? {
                    Some(bytes) => decode_entry(&bytes).is_ok_and(|e| matches(row, &e)),
                    None => false,
                };
                if !valid {
                    t.remove(row)?;
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)
    }

    /// Entries whose readable URL starts with `prefix` (a range scan of the `urls` tree).
    pub(super) fn scan_url_prefix<'a>(
        &'a self,
        prefix: &str,
    ) -> impl Iterator<Item = Result<(VariantKey, Entry), StoreError>> + use<'a> {
        let iter = self.urls.scan_prefix(prefix.as_bytes());
        self.resolve_rows(&self.urls, iter, 0, url_row_matches)
    }

    /// Entries carrying `tag`.
    pub(super) fn scan_tag<'a>(
        &'a self,
        tag: &str,
    ) -> impl Iterator<Item = Result<(VariantKey, Entry), StoreError>> + use<'a> {
        let prefix = tag_prefix(tag);
        let at = prefix.len();
        let iter = self.tags.scan_prefix(&prefix);
        self.resolve_rows(&self.tags, iter, at, move |row, e| {
            tag_row_matches(row, at, e)
        })
    }

    /// Up to `limit` keys whose stale_until is at or before `until_ms`, oldest first.
    pub(super) fn scan_expired(
        &self,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<VariantKey>, StoreError> {
        let rows = self.scan_expired_after(None, until_ms, limit)?;
        Ok(rows.into_iter().map(|(_, k)| k).collect())
    }

    /// Like [`Index::scan_expired`], starting after `after` (an expiry row returned by an
    /// earlier call), with each key's row, so that a sweep can resume where it stopped.
    pub(super) fn scan_expired_after(
        &self,
        after: Option<&[u8]>,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, VariantKey)>, StoreError> {
        let lo = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_vec()));
        let hi = until_ms.checked_add(1).map_or(Bound::Unbounded, |end| {
            Bound::Excluded(end.to_be_bytes().to_vec())
        });
        let iter = self.expiry.range::<Vec<u8>, _>((lo, hi));
        let rows = self.resolve_rows_with_row(&self.expiry, iter, 8, |row, e| {
            row.len() == 8 + KEY_LEN && be_u64(&row[..8]) == expiry_ms(e)
        });
        rows.take(limit)
            .map(|r| r.map(|(row, k, _)| (row.to_vec(), k)))
            .collect()
    }

    /// How many entries reference the body file `hash`.
    pub(super) fn refcount(&self, hash: &[u8; 32]) -> Result<u64, StoreError> {
        Ok(self
            .refs
            .get(hash)
            .map_err(db_err)?
            .map_or(0, |v| be_u64(&v)))
    }

    /// Moves each key that still exists to its new access time (never backwards). One
    /// transaction per batch: the access order is persisted lazily, off the hit path.
    pub(super) fn touch(&self, touches: &[(VariantKey, u64)]) -> Result<(), StoreError> {
        (&self.access, &self.lru)
            .transaction(|(a, l)| {
                for (key, ms) in touches {
                    let Some(old) = a.get(key.as_bytes())? else {
                        continue;
                    };
                    let old = be_u64(&old);
                    if *ms > old {
                        l.remove(expiry_row(old, key))?;
                        l.insert(expiry_row(*ms, key), EMPTY)?;
                        a.insert(&key.as_bytes()[..], &ms.to_be_bytes()[..])?;
                    }
                }
                Ok::<(), ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)
    }

    /// The newest access stamp recorded (0 for an empty store): where stamps resume after a restart.
    pub(super) fn newest_access_stamp(&self) -> Result<u64, StoreError> {
        Ok(self
            .lru
            .last()
            .map_err(db_err)?
            .map_or(0, |(row, _)| row.get(..8).map_or(0, be_u64)))
    }

    /// Up to `limit` (access stamp, key) rows, least recently used first.
    pub(super) fn least_recently_used(
        &self,
        limit: usize,
    ) -> Result<Vec<(u64, VariantKey)>, StoreError> {
        let mut rows = Vec::with_capacity(limit);
        for row in self.lru.iter().keys().take(limit) {
            let row = row.map_err(db_err)?;
            if let (Some(stamp), Some(key)) = (
                row.get(..8).map(be_u64),
                row.get(8..).and_then(VariantKey::from_bytes),
            ) {
                rows.push((stamp, key));
            } else {
                self.lru.remove(&row).map_err(db_err)?;
            }
        }
        Ok(rows)
    }

    /// Drops an access-order row whose entry is gone (left by an interrupted upgrade).
    pub(super) fn forget_access(&self, stamp: u64, key: &VariantKey) -> Result<(), StoreError> {
        (&self.access, &self.lru, &self.entries)
            .transaction(|(a, l, e)| {
                if e.get(key.as_bytes())?.is_none() {
                    l.remove(expiry_row(stamp, key))?;
                    if a.get(key.as_bytes())?.is_some_and(|v| be_u64(&v) == stamp) {
                        a.remove(&key.as_bytes()[..])?;
                    }
                }
                Ok::<(), ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)
    }

    /// Schema v1 → v2: gives every entry an access-order position (its stored time) and
    /// computes the record-bytes (and index-bytes) counters. Idempotent, so an interrupted run can repeat.
    pub(super) fn seed_access_order(&self) -> Result<(), StoreError> {
        let mut record_bytes = 0u64;
        let mut index = REF_ROW_BYTES * self.refs.len() as u64;
        for item in self.entries.iter() {
            let (k, v) = item.map_err(db_err)?;
            record_bytes += v.len() as u64;
            let (Some(key), Ok(entry)) = (VariantKey::from_bytes(&k), decode_entry(&v)) else {
                continue;
            };
            index += index_bytes(&entry);
            let ms = time_to_ms(entry.stored_at);
            // Both rows in one transaction: an interrupted upgrade re-runs this step, and an
            // entry must never keep an access row without its place in the order.
            (&self.access, &self.lru)
                .transaction(|(a, l)| {
                    if a.get(key.as_bytes())?.is_none() {
                        a.insert(&key.as_bytes()[..], &ms.to_be_bytes()[..])?;
                        l.insert(expiry_row(ms, &key), EMPTY)?;
                    }
                    Ok::<(), ConflictableTransactionError<StoreError>>(())
                })
                .map_err(tx_err)?;
        }
        self.meta
            .insert(STAT_RECORD_BYTES, &record_bytes.to_be_bytes()[..])
            .map_err(db_err)?;
        self.meta
            .insert(STAT_INDEX_BYTES, &index.to_be_bytes()[..])
            .map_err(db_err)?;
        self.flush()
    }

    /// The persistent counters.
    pub(super) fn stats(&self) -> Result<StoreStats, StoreError> {
        let t = self.counters()?;
        Ok(StoreStats {
            entries: t.entries,
            body_bytes: t.body_bytes,
            body_files: t.files,
            body_file_bytes: t.file_bytes,
            record_bytes: t.record_bytes,
            index_bytes: t.index_bytes,
            dropped_records: self.dropped.load(Ordering::Relaxed),
            ..StoreStats::default()
        })
    }

    fn counters(&self) -> Result<Totals, StoreError> {
        let get = |k: &[u8]| -> Result<u64, StoreError> {
            Ok(self.meta.get(k).map_err(db_err)?.map_or(0, |v| be_u64(&v)))
        };
        Ok(Totals {
            entries: get(STAT_ENTRIES)?,
            record_bytes: get(STAT_RECORD_BYTES)?,
            index_bytes: get(STAT_INDEX_BYTES)?,
            body_bytes: get(STAT_BODY_BYTES)?,
            files: get(STAT_FILES)?,
            file_bytes: get(STAT_FILE_BYTES)?,
        })
    }

    /// True if a record's share could not be subtracted since the last recount began.
    pub(super) fn drift_suspected(&self) -> bool {
        self.drift.load(Ordering::SeqCst)
    }

    /// Starts a recount unless one runs. Drift from here on is folded into this one.
    pub(super) fn recount_begin(&self) {
        let mut recount = self.recount.lock().unwrap_or_else(|e| e.into_inner());
        if recount.is_none() {
            self.drift.store(false, Ordering::SeqCst);
            *recount = Some(Recount::default());
        }
    }

    /// One batch of the recount begun by [`Index::recount_begin`]: up to `batch` records, or
    /// up to `batch` reference rows once every record is counted, or at last the counters.
    /// Each batch holds the recount lock (so writers wait for at most one batch).
    pub(super) fn recount_step(&self, batch: usize) -> Result<RecountStep, StoreError> {
        let batch = batch.max(1);
        let mut guard = self.recount.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = guard.as_mut() else {
            return Ok(RecountStep::Idle);
        };
        if !r.records_done {
            let lo = r.after.clone().map_or(Bound::Unbounded, Bound::Excluded);
            let mut seen = 0;
            let mut undecodable = Vec::new();
            for item in self
                .entries
                .range::<Vec<u8>, _>((lo, Bound::Unbounded))
                .take(batch)
            {
                let (k, v) = item.map_err(db_err)?;
                seen += 1;
                r.after = Some(k.to_vec());
                // A malformed key is no entry: the counters never held it.
                let Some(key) = VariantKey::from_bytes(&k) else {
                    continue;
                };
                r.scanned += 1;
                match decode_entry(&v) {
                    Ok(e) => r.add(&share(v.len(), Some(&e))),
                    Err(why) => {
                        r.add(&share(v.len(), None));
                        r.undecodable += 1;
                        undecodable.push((key, why));
                    }
                }
            }
            r.records_done = seen < batch;
            drop(guard);
            // Counted above as present: dropping them now goes through the recount like any
            // other removal behind the walk.
            for (key, why) in &undecodable {
                self.drop_undecodable(key, why)?;
            }
            return Ok(RecountStep::More { freed: Vec::new() });
        }
        let lo = r
            .refs_after
            .map_or(Bound::Unbounded, |h| Bound::Excluded(h.to_vec()));
        let mut rows = Vec::with_capacity(batch);
        for item in self
            .refs
            .range::<Vec<u8>, _>((lo, Bound::Unbounded))
            .take(batch)
        {
            let (k, v) = item.map_err(db_err)?;
            rows.push((k, be_u64(&v)));
        }
        let full = rows.len() == batch;
        let upto = match rows.last() {
            Some((k, _)) if full => Some(<[u8; 32]>::try_from(k.as_ref()).unwrap_or([0xff; 32])),
            _ => None,
        };
        let mut fix = sled::Batch::default();
        let mut freed = Vec::new();
        let mut seen_rows = std::collections::HashSet::new();
        for (k, have) in &rows {
            let Ok(hash) = <[u8; 32]>::try_from(k.as_ref()) else {
                // Not a hash: no entry can reference it.
                fix.remove(k.clone());
                r.refs_repaired += 1;
                continue;
            };
            seen_rows.insert(hash);
            let want = r.refcount(&hash);
            if want != *have {
                r.refs_repaired += 1;
                if want == 0 {
                    fix.remove(&hash[..]);
                    freed.push(hash);
                } else {
                    fix.insert(&hash[..], &want.to_be_bytes()[..]);
                }
            }
        }
        // Referenced by records but without a row: a later removal would free a file in use.
        for hash in r.hashes_between(r.refs_after, upto) {
            if !seen_rows.contains(&hash) {
                r.refs_repaired += 1;
                fix.insert(&hash[..], &r.refcount(&hash).to_be_bytes()[..]);
            }
        }
        self.refs.apply_batch(fix).map_err(db_err)?;
        r.refs_after = upto;
        if full {
            return Ok(RecountStep::More { freed });
        }
        let want = r.totals(REF_ROW_BYTES);
        let have = self.counters()?;
        let mut repaired = Vec::new();
        let mut fix = sled::Batch::default();
        for (name, stat, was, now) in [
            ("entries", STAT_ENTRIES, have.entries, want.entries),
            (
                "record_bytes",
                STAT_RECORD_BYTES,
                have.record_bytes,
                want.record_bytes,
            ),
            (
                "index_bytes",
                STAT_INDEX_BYTES,
                have.index_bytes,
                want.index_bytes,
            ),
            (
                "body_bytes",
                STAT_BODY_BYTES,
                have.body_bytes,
                want.body_bytes,
            ),
            ("body_files", STAT_FILES, have.files, want.files),
            (
                "body_file_bytes",
                STAT_FILE_BYTES,
                have.file_bytes,
                want.file_bytes,
            ),
        ] {
            if was != now {
                fix.insert(stat, &now.to_be_bytes()[..]);
                repaired.push(Repair {
                    counter: name,
                    was,
                    now,
                });
            }
        }
        self.meta.apply_batch(fix).map_err(db_err)?;
        let report = ReconcileReport {
            records: r.scanned,
            repaired,
            refs_repaired: r.refs_repaired,
            undecodable: r.undecodable,
        };
        *guard = None;
        self.drift.store(false, Ordering::SeqCst);
        Ok(RecountStep::Done { report, freed })
    }

    /// Writes a sled recovery snapshot once `every` bytes of log have been written since the
    /// last one (opening writes one too). Recovery after a crash replays the log from the newest
    /// snapshot, so this bounds how long a start after a crash takes: without it, sled 0.34
    /// replays everything written since the database was last opened (3.3 s after a million
    /// stored entries). Blocking; runs on the flusher thread while writers go on (see the
    /// vendored sled's `write_recovery_snapshot`). True if one was written.
    pub(super) fn snapshot_if_due(&self, every: u64) -> Result<bool, StoreError> {
        let written = self
            .db
            .stable_log_position()
            .saturating_sub(self.snapshot_at.load(Ordering::SeqCst));
        if written < i64::try_from(every).unwrap_or(i64::MAX) {
            return Ok(false);
        }
        self.write_snapshot()
    }

    /// Writes a sled recovery snapshot now. False if sled skipped it (a page was being
    /// allocated): the next call tries again. A failure counts as a snapshot for
    /// [`Index::snapshot_if_due`], so that a failing disk is retried after another interval of
    /// log rather than scanned and reported on every flush.
    pub(super) fn write_snapshot(&self) -> Result<bool, StoreError> {
        let position_before = self.db.stable_log_position();
        match self.db.write_recovery_snapshot() {
            Ok(Some(position)) => {
                self.snapshot_at.fetch_max(position, Ordering::SeqCst);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => {
                self.snapshot_at
                    .fetch_max(position_before, Ordering::SeqCst);
                Err(db_err(e))
            }
        }
    }

    /// Makes every write so far durable (fsync), blocking.
    pub(super) fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(drop).map_err(db_err)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Opens the raw index (no schema handling) for tests that forge on-disk states.
    pub(in crate::store) fn open_raw(path: &Path) -> Index {
        match try_open(path, 1 << 20) {
            Ok(i) => i,
            Err(Failure::Corrupt(why)) => panic!("corrupt: {why}"),
            Err(Failure::Other(e)) => panic!("{e}"),
        }
    }

    /// Writes raw bytes as the record of `key`, bypassing encoding and indexes.
    pub(in crate::store) fn put_raw(index: &Index, key: &VariantKey, bytes: &[u8]) {
        index.entries.insert(key.as_bytes(), bytes).unwrap();
    }

    /// Overwrites a persistent counter (`"entries"`, `"index_bytes"`, ... as in `stat.*`).
    pub(in crate::store) fn set_counter(index: &Index, name: &str, value: u64) {
        let key = match name {
            "entries" => STAT_ENTRIES,
            "record_bytes" => STAT_RECORD_BYTES,
            "index_bytes" => STAT_INDEX_BYTES,
            "body_bytes" => STAT_BODY_BYTES,
            "body_files" => STAT_FILES,
            "body_file_bytes" => STAT_FILE_BYTES,
            other => panic!("no counter {other}"),
        };
        index.meta.insert(key, &value.to_be_bytes()[..]).unwrap();
    }

    /// Overwrites the reference count of a body file.
    pub(in crate::store) fn set_refcount(index: &Index, hash: &[u8; 32], count: u64) {
        index
            .refs
            .insert(&hash[..], &count.to_be_bytes()[..])
            .unwrap();
    }

    #[test]
    fn tag_rows_do_not_prefix_match_longer_tags() {
        let k = VariantKey::from_bytes(&[1; 64]).unwrap();
        assert!(!tag_row("ab", &k).starts_with(&tag_prefix("a")));
        assert!(tag_row("a", &k).starts_with(&tag_prefix("a")));
    }
}
