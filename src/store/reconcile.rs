//! The bookkeeping of an online recount of the store's counters and body reference counts: what each record contributes, and how mutations during the pass are folded in so that its result is exact.
//!
//! The counters in `meta` and the reference counts in `bodyrefs` change in the same
//! transactions as the records, so they can only drift through a record that stopped decoding
//! (its old share cannot be subtracted), a bug, or damage. A recount walks the records in key
//! order in small batches while the store keeps serving and writing. Every mutation reports
//! its [`Change`]; if the pass has already counted that key, the change is applied to the
//! running totals too, so that when the walk ends the totals are what a stopped-world scan
//! would give. (The index serializes mutations and recount batches with one lock, see
//! `index.rs`.)

use std::collections::BTreeMap;

/// What one record contributes to the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Share {
    pub(super) record_bytes: u64,
    pub(super) index_bytes: u64,
    pub(super) body_bytes: u64,
    /// The body file it references: (blake3, length).
    pub(super) file: Option<([u8; 32], u64)>,
}

/// One mutation of one key: the record's share before and after (`None` = no record).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Change {
    pub(super) old: Option<Share>,
    pub(super) new: Option<Share>,
}

/// The counters a store should have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Totals {
    pub(super) entries: u64,
    pub(super) record_bytes: u64,
    pub(super) index_bytes: u64,
    pub(super) body_bytes: u64,
    pub(super) files: u64,
    pub(super) file_bytes: u64,
}

/// A recount in progress.
#[derive(Debug, Default)]
pub(super) struct Recount {
    /// The last record key counted; `None` before the first batch.
    pub(super) after: Option<Vec<u8>>,
    /// Every record has been counted; the reference rows are being checked.
    pub(super) records_done: bool,
    /// The last reference row checked against the recount (reference phase).
    pub(super) refs_after: Option<[u8; 32]>,
    entries: u64,
    record_bytes: u64,
    index_bytes: u64,
    body_bytes: u64,
    /// blake3 → (records referencing it, body length). Memory: about 60 bytes per distinct
    /// body file, at most `max_size / inline_max` of them, and only while the pass runs.
    refs: BTreeMap<[u8; 32], (u64, u64)>,
    /// Records counted.
    pub(super) scanned: u64,
    /// Reference rows set right.
    pub(super) refs_repaired: u64,
    /// Undecodable records met (and dropped).
    pub(super) undecodable: u64,
}

/// What one recount batch did.
#[derive(Debug)]
pub(super) enum RecountStep {
    /// No recount is running.
    Idle,
    /// More batches to go; `freed` lost their last (stale) reference: unlink after a flush.
    More { freed: Vec<[u8; 32]> },
    /// The counters are set right.
    Done {
        report: ReconcileReport,
        freed: Vec<[u8; 32]>,
    },
}

/// What a finished recount found and set right.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Records counted.
    pub records: u64,
    /// Counters that were wrong, with the value found and the value set.
    pub repaired: Vec<Repair>,
    /// Body reference counts set right (a count too high keeps a file forever; too low frees a
    /// file still in use).
    pub refs_repaired: u64,
    /// Records that no longer decoded, dropped.
    pub undecodable: u64,
}

/// One counter a recount set right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repair {
    /// The counter, as in [`super::StoreStats`].
    pub counter: &'static str,
    /// What it said.
    pub was: u64,
    /// What the records say.
    pub now: u64,
}

impl Recount {
    /// True if the record under `key` has been counted already.
    fn covers(&self, key: &[u8]) -> bool {
        self.records_done || self.after.as_deref().is_some_and(|after| key <= after)
    }

    /// Counts one record met by the walk.
    pub(super) fn add(&mut self, s: &Share) {
        self.entries += 1;
        self.record_bytes += s.record_bytes;
        self.index_bytes += s.index_bytes;
        self.body_bytes += s.body_bytes;
        if let Some((hash, len)) = s.file {
            self.refs.entry(hash).or_insert((0, len)).0 += 1;
        }
    }

    fn sub(&mut self, s: &Share) {
        self.entries = self.entries.saturating_sub(1);
        self.record_bytes = self.record_bytes.saturating_sub(s.record_bytes);
        self.index_bytes = self.index_bytes.saturating_sub(s.index_bytes);
        self.body_bytes = self.body_bytes.saturating_sub(s.body_bytes);
        if let Some((hash, _)) = s.file
            && let Some(slot) = self.refs.get_mut(&hash)
        {
            slot.0 = slot.0.saturating_sub(1);
            if slot.0 == 0 {
                self.refs.remove(&hash);
            }
        }
    }

    /// Folds in a committed mutation of `key`, if the walk has passed that key (otherwise the
    /// walk will meet the new state itself).
    pub(super) fn observe(&mut self, key: &[u8], change: &Change) {
        if !self.covers(key) {
            return;
        }
        if let Some(old) = &change.old {
            self.sub(old);
        }
        if let Some(new) = &change.new {
            self.add(new);
        }
    }

    /// How many records reference `hash`, by the recount.
    pub(super) fn refcount(&self, hash: &[u8; 32]) -> u64 {
        self.refs.get(hash).map_or(0, |r| r.0)
    }

    /// The hashes the recount knows after `after` up to and including `upto` (`None` = to the end).
    pub(super) fn hashes_between(
        &self,
        after: Option<[u8; 32]>,
        upto: Option<[u8; 32]>,
    ) -> Vec<[u8; 32]> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let lo = after.map_or(Unbounded, Excluded);
        let hi = upto.map_or(Unbounded, Included);
        self.refs.range((lo, hi)).map(|(h, _)| *h).collect()
    }

    /// The counters as they should be; each distinct body file adds `ref_row_bytes` of index.
    pub(super) fn totals(&self, ref_row_bytes: u64) -> Totals {
        let files = self.refs.len() as u64;
        Totals {
            entries: self.entries,
            record_bytes: self.record_bytes,
            index_bytes: self.index_bytes + files * ref_row_bytes,
            body_bytes: self.body_bytes,
            files,
            file_bytes: self.refs.values().map(|(_, len)| len).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(n: u64, file: Option<u8>) -> Share {
        Share {
            record_bytes: n,
            index_bytes: 2 * n,
            body_bytes: 3 * n,
            file: file.map(|f| ([f; 32], 1000)),
        }
    }

    #[test]
    fn changes_count_only_behind_the_walk() {
        let mut r = Recount::default();
        r.add(&share(10, Some(1)));
        r.after = Some(vec![5]);
        // Ahead of the walk: ignored, the walk will read it.
        r.observe(
            &[9],
            &Change {
                old: None,
                new: Some(share(7, None)),
            },
        );
        assert_eq!(r.totals(0).entries, 1);
        // Behind it: replaced, sharing the same body file.
        r.observe(
            &[5],
            &Change {
                old: Some(share(10, Some(1))),
                new: Some(share(4, Some(1))),
            },
        );
        r.observe(
            &[1],
            &Change {
                old: None,
                new: Some(share(1, Some(2))),
            },
        );
        let t = r.totals(40);
        assert_eq!(
            t,
            Totals {
                entries: 2,
                record_bytes: 5,
                index_bytes: 10 + 2 * 40,
                body_bytes: 15,
                files: 2,
                file_bytes: 2000,
            }
        );
        assert_eq!(r.refcount(&[1; 32]), 1);
        // Removing the last reference forgets the file.
        r.observe(
            &[1],
            &Change {
                old: Some(share(1, Some(2))),
                new: None,
            },
        );
        assert_eq!(r.refcount(&[2; 32]), 0);
        assert_eq!(r.hashes_between(None, None), vec![[1; 32]]);
        assert_eq!(
            r.hashes_between(Some([1; 32]), None),
            Vec::<[u8; 32]>::new()
        );
        r.records_done = true;
        r.observe(
            &[200],
            &Change {
                old: None,
                new: Some(share(1, None)),
            },
        );
        assert_eq!(r.totals(0).entries, 2);
    }
}
