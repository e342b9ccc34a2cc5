//! The store's error type: what can go wrong opening, reading and writing the cache on disk.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use super::format::FormatError;

/// Everything a store operation can fail with. None of these is a panic: damaged data on disk
/// surfaces here (or is dropped and logged) and the cache carries on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database (sled) failed.
    #[error("store database error: {0}")]
    Db(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// A file-system operation failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the store (sled allows one process per directory).
    #[error(
        "the store at {0} is locked by another process; is a larder server already running on this data directory?"
    )]
    Locked(PathBuf),
    /// The store was written by a newer larder.
    #[error(
        "the store at {path} has schema version {found}, but this larder supports up to version {supported}; \
         run a newer larder, or move the directory aside to start with an empty cache"
    )]
    NewerSchema {
        /// The store directory.
        path: PathBuf,
        /// The version recorded in the store.
        found: u32,
        /// The newest version this code knows.
        supported: u32,
    },
    /// The store records a schema version that no larder ever wrote (or no upgrade path exists).
    #[error("the store at {path} has schema version {found}, which this larder cannot upgrade")]
    UnsupportedSchema {
        /// The store directory.
        path: PathBuf,
        /// The version recorded in the store.
        found: u32,
    },
    /// The body file of an entry is gone; the entry has been removed.
    #[error("body file {0} is missing; the entry was removed")]
    BodyMissing(PathBuf),
    /// A stored body does not match its blake3 hash (or its length); the entry has been removed.
    #[error("the stored body of {url} is damaged; the entry was removed")]
    BodyCorrupt {
        /// The entry's URL.
        url: String,
    },
    /// The body ended before the expected number of bytes (or ran past it).
    #[error("body truncated: expected {expected} bytes, got {got}")]
    Truncated {
        /// The announced length.
        expected: u64,
        /// The bytes written.
        got: u64,
    },
    /// A purge happened after this write began, so the response it carries may be what was purged.
    #[error("a purge happened while this response was being fetched; it was not stored")]
    Superseded,
    /// The store is full and the entries eviction would have to drop are used more often than
    /// this one (TinyLFU admission, see `store/admission.rs`); it was not stored.
    #[error("the cache is full of entries used more often; this response was not stored")]
    NotAdmitted,
    /// The entry could not be encoded (e.g. headers too large for a record).
    #[error("entry cannot be stored: {0}")]
    Format(#[from] FormatError),
    /// The options passed to `Store::open` are out of range.
    #[error("invalid store options: {0}")]
    InvalidOptions(String),
    /// A read-only open found the database damaged ([`super::ReadOnlyStore`]; `Store::open`
    /// moves such a database aside instead).
    #[error(
        "the store database at {path} is damaged ({why}); this read changed nothing, and `larder serve` moves a damaged database aside and starts with an empty cache"
    )]
    Damaged {
        /// The database directory.
        path: PathBuf,
        /// What sled reported.
        why: String,
    },
}

impl StoreError {
    /// True for a fault of the disk or the database (full, read-only, I/O error) rather than
    /// an expected refusal: what an operator must hear about, and what repeats until fixed.
    pub fn is_disk_fault(&self) -> bool {
        matches!(self, StoreError::Io { .. } | StoreError::Db(_))
    }

    /// An I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { path, source }
    }
}

/// Lets a repeated error through to the log at most once per period: a full disk fails every
/// store write, and one line a minute says so without flooding the log.
pub struct LogLimit {
    every_secs: u64,
    /// When a line was last let through, in seconds + 1 (0 = never).
    last: AtomicU64,
}

impl LogLimit {
    /// At most one line per `every_secs` seconds.
    pub const fn new(every_secs: u64) -> LogLimit {
        LogLimit {
            every_secs,
            last: AtomicU64::new(0),
        }
    }

    /// True if a line may be logged at `now_secs` (seconds on any clock that does not go back).
    /// Of concurrent callers, one wins.
    pub fn allow(&self, now_secs: u64) -> bool {
        let stamp = now_secs.saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || stamp >= last.saturating_add(self.every_secs))
            && self
                .last
                .compare_exchange(last, stamp, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_error_is_logged_at_most_once_a_minute() {
        let limit = LogLimit::new(60);
        assert!(limit.allow(0), "the first one is logged");
        assert!(!limit.allow(0));
        assert!(!limit.allow(30));
        assert!(!limit.allow(59));
        assert!(limit.allow(60), "a minute later");
        assert!(!limit.allow(61));
        assert!(!limit.allow(119));
        assert!(limit.allow(500), "after a quiet spell, at once");
        // Every second for ten minutes after that: 560, 620, ..., 1040.
        let logged: Vec<u64> = (501..1100).filter(|&t| limit.allow(t)).collect();
        assert_eq!(logged, (1..=9).map(|m| 500 + 60 * m).collect::<Vec<_>>());
    }
}
