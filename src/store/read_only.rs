//! Reads a stopped store without loading sled's page table, so that `larder dump --offline` needs the same memory for any number of entries.
//!
//! Opening a [`super::Store`] holds one page-table entry per sled page (about 0.4 KiB per
//! stored entry), and recovers, migrates and heals as it goes. This reader goes through the
//! vendored sled's `Config::open_read_only`, which keeps page locations in two anonymous scratch
//! files, and writes nothing: rows it cannot use are skipped with a warning, not removed. It
//! holds sled's lock while open, so a server cannot start on the store meanwhile.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sled::{ReadOnlyDb, ReadOnlyTree};

use super::format::decode_entry;
use super::index::{SCHEMA_KEY, db_err, key_of_row, tag_prefix, tag_row_matches, url_row_matches};
use super::migrate::CURRENT_SCHEMA;
use super::{Entry, StoreError};
use crate::key::VariantKey;

/// A stopped store, open for reading.
pub struct ReadOnlyStore {
    path: PathBuf,
    entries: Option<ReadOnlyTree>,
    urls: Option<ReadOnlyTree>,
    tags: Option<ReadOnlyTree>,
    _db: Arc<ReadOnlyDb>,
}

type Item = Result<(VariantKey, Entry), StoreError>;

impl ReadOnlyStore {
    /// Opens the store in data directory `dir`; `None` if there is none there yet. Fails with
    /// [`StoreError::Locked`] if a server holds it, and refuses a store of a newer schema. An
    /// older schema reads as it is: the upgrades so far only added rows that a dump does not
    /// read.
    pub fn open(dir: &Path) -> Result<Option<ReadOnlyStore>, StoreError> {
        let path = dir.join("db");
        // Scratch files next to the store: on its disk, where /tmp may be memory (tmpfs).
        let scratch = || tempfile::tempfile_in(dir).or_else(|_| tempfile::tempfile());
        let opened = catch_panic(|| sled::Config::new().path(&path).open_read_only(scratch));
        let db = match opened {
            Ok(Some(db)) => db,
            Ok(None) => return Ok(None),
            Err(e) => return Err(read_err(&path, e)),
        };
        let store = ReadOnlyStore {
            path: path.clone(),
            entries: db.tree(b"entries"),
            urls: db.tree(b"urls"),
            tags: db.tree(b"tags"),
            _db: db.clone(),
        };
        let meta = db.tree(b"meta");
        let version = match &meta {
            Some(meta) => catch_panic(|| meta.get(SCHEMA_KEY)).map_err(|e| read_err(&path, e))?,
            None => None,
        };
        match version.map(|v| v.as_ref().try_into().map_or(0, u32::from_be_bytes)) {
            Some(found) if found > CURRENT_SCHEMA => Err(StoreError::NewerSchema {
                path,
                found,
                supported: CURRENT_SCHEMA,
            }),
            Some(0) => Err(StoreError::UnsupportedSchema { path, found: 0 }),
            Some(_) => Ok(Some(store)),
            // As `migrate::prepare` decides: no version and no record at all is a new store.
            None if store.holds_no_record().map_err(|e| read_err(&path, e))? => Ok(Some(store)),
            None => Err(StoreError::UnsupportedSchema { path, found: 0 }),
        }
    }

    /// Like [`super::Store::entries`]: every entry, those under a URL prefix (in URL order), or
    /// those carrying a tag (filtered by the prefix if both are given).
    pub fn entries<'s>(
        &'s self,
        url_prefix: Option<&str>,
        tag: Option<&str>,
    ) -> Box<dyn Iterator<Item = Item> + 's> {
        let prefix = url_prefix.map(str::to_owned);
        match (tag, prefix) {
            (Some(tag), prefix) => {
                let tag_part = tag_prefix(tag);
                let at = tag_part.len();
                let rows = self.rows(self.tags.as_ref(), &tag_part);
                Box::new(
                    self.resolve(rows, at, move |row, e| tag_row_matches(row, at, e))
                        .filter(move |item| match (item, &prefix) {
                            (Ok((_, e)), Some(p)) => e.url.starts_with(p.as_str()),
                            _ => true,
                        }),
                )
            }
            (None, Some(prefix)) => {
                let rows = self.rows(self.urls.as_ref(), prefix.as_bytes());
                Box::new(self.resolve(rows, 0, url_row_matches))
            }
            (None, None) => Box::new(self.all()),
        }
    }

    /// True if the entries tree holds no record, decodable or not.
    fn holds_no_record(&self) -> sled::Result<bool> {
        match &self.entries {
            None => Ok(true),
            Some(tree) => catch_panic(|| tree.iter().next().transpose().map(|r| r.is_none())),
        }
    }

    /// Every entry, in key order.
    fn all(&self) -> impl Iterator<Item = Item> + '_ {
        self.rows(self.entries.as_ref(), &[]).filter_map(|item| {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e)),
            };
            let Some(key) = VariantKey::from_bytes(&k) else {
                tracing::warn!(len = k.len(), "skipping store record with a malformed key");
                return None;
            };
            decoded(&key, &v).map(|e| Ok((key, e)))
        })
    }

    /// The entries that index rows point at, where the entry agrees with its row.
    fn resolve<'s>(
        &'s self,
        rows: impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + 's,
        key_at: usize,
        matches: impl Fn(&[u8], &Entry) -> bool + 's,
    ) -> impl Iterator<Item = Item> + 's {
        rows.filter_map(move |item| {
            let row = match item {
                Ok((row, _)) => row,
                Err(e) => return Some(Err(e)),
            };
            let key = key_of_row(&row, key_at)?;
            match self.get(&key) {
                Err(e) => Some(Err(e)),
                Ok(Some(e)) if matches(&row, &e) => Some(Ok((key, e))),
                Ok(_) => None,
            }
        })
    }

    fn get(&self, key: &VariantKey) -> Result<Option<Entry>, StoreError> {
        let Some(entries) = &self.entries else {
            return Ok(None);
        };
        let bytes =
            catch_panic(|| entries.get(key.as_bytes())).map_err(|e| read_err(&self.path, e))?;
        Ok(bytes.and_then(|b| decoded(key, &b)))
    }
}

impl ReadOnlyStore {
    /// The pairs of `tree` whose key starts with `prefix`; none if the tree does not exist.
    fn rows<'t>(
        &'t self,
        tree: Option<&'t ReadOnlyTree>,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + 't {
        let mut iter = tree.map(|t| t.scan_prefix(prefix));
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let rows = iter.as_mut()?;
            let next = catch_panic(|| rows.next().transpose()).transpose()?;
            failed = next.is_err();
            Some(next.map_err(|e| read_err(&self.path, e)))
        })
    }
}

fn decoded(key: &VariantKey, bytes: &[u8]) -> Option<Entry> {
    decode_entry(bytes)
        .inspect_err(|why| {
            tracing::warn!(key = %key.to_hex(), error = %why, "skipping undecodable store record");
        })
        .ok()
}

/// Runs a sled read, turning a panic (sled asserts on some damaged pages) into an error.
fn catch_panic<T>(read: impl FnOnce() -> sled::Result<T>) -> sled::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|_| {
        Err(sled::Error::ReportableBug(
            "sled panicked while reading the store".into(),
        ))
    })
}

fn read_err(path: &Path, e: sled::Error) -> StoreError {
    // What `Store::open` treats as corruption (index.rs `classify`) is said as such.
    let why = match &e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            return StoreError::Locked(path.to_path_buf());
        }
        sled::Error::Corruption { at: Some(at), .. } => {
            format!("sled found corrupted data at {at}")
        }
        sled::Error::Corruption { .. } => "sled found corrupted data".into(),
        sled::Error::ReportableBug(why) | sled::Error::Unsupported(why) => why.clone(),
        _ => return db_err(e),
    };
    StoreError::Damaged {
        path: path.to_path_buf(),
        why,
    }
}
