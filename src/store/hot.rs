//! The in-memory hot tier: decoded records of recently used URLs and verified copies of recently served bodies, so a hit costs no sled read, no decode, no disk read and no re-hash.
//!
//! Two byte-bounded maps, each evicted by CLOCK (second chance), so a hit only takes a read
//! lock and sets a flag:
//! - records, by primary hash: every stored variant of a URL, as [`Store::lookup`] returns them.
//!   They must never outlive a change to the index, so every mutation of an entry invalidates its
//!   URL, and a lookup that read the index before a concurrent mutation is not kept (see
//!   [`Hot::records_version`]).
//! - bodies, by blake3: content-addressed, so a copy never goes stale; only bytes that matched
//!   their hash are kept, which is what lets a hit skip the check.
//!
//! [`Store::lookup`]: super::Store::lookup

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::Bytes;

use super::Entry;
use crate::key::VariantKey;

/// Every stored variant of one URL, shared by the hits that read it.
pub type Variants = Arc<[Variant]>;

/// One stored variant as the hot tier holds it, with a slot where the serving layer keeps what
/// it derives from the entry (e.g. its response head, ready to send). The slot lives and dies
/// with this copy of the record, so it can never outlast a change to the entry.
pub struct Variant {
    pub key: VariantKey,
    pub entry: Entry,
    prepared: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl Variant {
    pub(super) fn new(key: VariantKey, entry: Entry) -> Variant {
        Variant {
            key,
            entry,
            prepared: OnceLock::new(),
        }
    }

    /// What `make` derives from the entry, made once per copy of the record and then shared.
    /// `None` only if the slot already holds a value of another type.
    pub fn prepared<T: Any + Send + Sync>(&self, make: impl FnOnce(&Entry) -> T) -> Option<&T> {
        self.prepared
            .get_or_init(|| Box::new(make(&self.entry)))
            .downcast_ref()
    }
}

/// Per-item bookkeeping charged against the budget besides the item's own bytes.
const ITEM_OVERHEAD: usize = 128;

pub(super) struct Hot {
    records: Clock<[u8; 32], Variants>,
    bodies: Clock<[u8; 32], Bytes>,
    /// Bodies up to this size are kept in memory whole.
    body_max: u64,
    /// Bumped by every invalidation; a lookup keeps what it read only if no invalidation
    /// happened since it started reading.
    version: AtomicU64,
    /// Bodies whose copy a read is making (see [`Filling`]).
    filling: Mutex<HashMap<[u8; 32], u64>>,
}

/// A read of a body file that keeps a copy for the hot tier. At most one per body at a time,
/// so a burst of cold requests for one URL buffers one copy, not one each, and copies of at
/// most a quarter of the body budget at once; the mark goes when the read ends, whether or not
/// it verified.
pub(super) struct Filling {
    shared: Arc<super::Shared>,
    blake3: [u8; 32],
}

impl Filling {
    pub(super) fn begin(
        shared: &Arc<super::Shared>,
        len: u64,
        blake3: [u8; 32],
    ) -> Option<Filling> {
        let hot = &shared.hot;
        if !hot.takes_body(len) || hot.bodies.get(&blake3).is_some() {
            return None;
        }
        let mut filling = hot.filling.lock().unwrap_or_else(|e| e.into_inner());
        // The copies being made count against nothing else: bound them (slow readers of many
        // distinct bodies would otherwise hold one each).
        let held: u64 = filling.values().sum();
        if filling.contains_key(&blake3) || held + len > hot.bodies.budget as u64 / 4 {
            return None;
        }
        filling.insert(blake3, len);
        Some(Filling {
            shared: shared.clone(),
            blake3,
        })
    }

    /// The copy verified: keep it.
    pub(super) fn done(self, verified: Bytes) {
        self.shared.hot.keep_body(self.blake3, verified);
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        let hot = &self.shared.hot;
        hot.filling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.blake3);
    }
}

impl Hot {
    /// A tier of about `budget` bytes: a quarter for records, the rest for bodies of at most
    /// an eighth of the body share each. `0` turns it off.
    pub(super) fn new(budget: u64) -> Hot {
        let records = usize::try_from(budget / 4).unwrap_or(usize::MAX);
        let bodies = usize::try_from(budget - budget / 4).unwrap_or(usize::MAX);
        Hot {
            records: Clock::new(records),
            bodies: Clock::new(bodies),
            body_max: (budget - budget / 4) / 8,
            version: AtomicU64::new(0),
            filling: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn records(&self, primary: &[u8; 32]) -> Option<Variants> {
        self.records.get(primary)
    }

    /// Read before reading the index for [`Hot::keep_records`].
    pub(super) fn records_version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Keeps what a lookup read, unless an entry changed since `version` was read: the index
    /// may then have changed after the lookup read it, and the copy could be stale.
    pub(super) fn keep_records(&self, primary: [u8; 32], variants: Variants, version: u64) {
        // A URL with nothing stored is about to be fetched (and its commit would drop the copy
        // anyway): keeping it would only take the write lock on every miss.
        if variants.is_empty() {
            return;
        }
        let size = variants
            .iter()
            .map(|v| record_size(&v.entry))
            .sum::<usize>();
        self.records.insert_if(primary, variants, size, || {
            self.version.load(Ordering::SeqCst) == version
        });
    }

    /// Forgets the records of the URL whose variant `key` is. Call after the index changed.
    pub(super) fn invalidate(&self, key: &VariantKey) {
        self.records.remove_with(key.primary_hash(), || {
            self.version.fetch_add(1, Ordering::SeqCst);
        });
    }

    /// Forgets every record (after a purge that may touch many URLs).
    pub(super) fn invalidate_all(&self) {
        self.records.clear_with(|| {
            self.version.fetch_add(1, Ordering::SeqCst);
        });
    }

    /// A verified copy of the body with this hash, if one is held.
    pub(super) fn body(&self, blake3: &[u8; 32]) -> Option<Bytes> {
        self.bodies.get(blake3)
    }

    /// True if a body of `len` bytes is small enough to be kept whole.
    pub(super) fn takes_body(&self, len: u64) -> bool {
        len <= self.body_max && self.bodies.budget > 0
    }

    /// Keeps a copy of a body. The caller has checked it against `blake3`.
    pub(super) fn keep_body(&self, blake3: [u8; 32], verified: Bytes) {
        if self.takes_body(verified.len() as u64) {
            let size = verified.len();
            self.bodies.insert_if(blake3, verified, size, || true);
        }
    }
}

fn record_size(e: &Entry) -> usize {
    let headers: usize = e.headers.iter().map(|(n, v)| n.len() + v.len() + 16).sum();
    let vary: usize = e
        .vary
        .iter()
        .map(|(n, v)| n.len() + v.as_ref().map_or(0, String::len) + 16)
        .sum();
    let tags: usize = e.tags.iter().map(|t| t.len() + 16).sum();
    let inline = e.body.inline.as_ref().map_or(0, Bytes::len);
    e.url.len() + headers + vary + tags + inline + 256
}

/// A byte-bounded map evicted by CLOCK: a hit sets the item's flag under a read lock; eviction
/// walks the insertion ring and gives flagged items a second round.
struct Clock<K, V> {
    budget: usize,
    state: RwLock<HashMap<K, Slot<V>>>,
    /// Insertion order for the eviction hand, and the bytes held. Locked after `state`.
    ring: Mutex<Ring<K>>,
}

struct Slot<V> {
    value: V,
    size: usize,
    used: AtomicBool,
}

struct Ring<K> {
    order: VecDeque<K>,
    bytes: usize,
}

impl<K: Copy + Eq + Hash, V: Clone> Clock<K, V> {
    fn new(budget: usize) -> Self {
        Clock {
            budget,
            state: RwLock::new(HashMap::new()),
            ring: Mutex::new(Ring {
                order: VecDeque::new(),
                bytes: 0,
            }),
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        if self.budget == 0 {
            return None;
        }
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let slot = state.get(key)?;
        if !slot.used.load(Ordering::Relaxed) {
            slot.used.store(true, Ordering::Relaxed);
        }
        Some(slot.value.clone())
    }

    /// Inserts (or replaces) `key` if `still_valid()` holds under the write lock, then evicts
    /// down to the budget.
    fn insert_if(&self, key: K, value: V, size: usize, still_valid: impl FnOnce() -> bool) {
        let size = size + ITEM_OVERHEAD;
        if size > self.budget {
            return;
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if !still_valid() {
            return;
        }
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let slot = Slot {
            value,
            size,
            used: AtomicBool::new(false),
        };
        match state.insert(key, slot) {
            Some(old) => ring.bytes -= old.size,
            None => ring.order.push_back(key),
        }
        ring.bytes += size;
        // Every pass over the ring either evicts or clears a flag, so this ends.
        while ring.bytes > self.budget {
            let Some(candidate) = ring.order.pop_front() else {
                break;
            };
            match state.get(&candidate) {
                Some(slot) if slot.used.swap(false, Ordering::Relaxed) => {
                    ring.order.push_back(candidate);
                }
                Some(_) => {
                    if let Some(gone) = state.remove(&candidate) {
                        ring.bytes -= gone.size;
                    }
                }
                // Removed by an invalidation: its ring place was left behind.
                None => {}
            }
        }
    }

    /// Removes `key`, running `then` under the write lock (so a concurrent `insert_if` sees it).
    fn remove_with(&self, key: &K, then: impl FnOnce()) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if let Some(gone) = state.remove(key) {
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            ring.bytes -= gone.size;
            // The ring keeps the key's place until the hand reaches it; bound those leftovers.
            if ring.order.len() > 2 * state.len() + 1024 {
                ring.order.retain(|k| state.contains_key(k));
            }
        }
        then();
    }

    fn clear_with(&self, then: impl FnOnce()) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.clear();
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.order.clear();
        ring.bytes = 0;
        then();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_stays_within_budget_and_spares_used_items() {
        let clock: Clock<u32, u32> = Clock::new(10 * (100 + ITEM_OVERHEAD));
        for k in 0..10 {
            clock.insert_if(k, k, 100, || true);
        }
        // Item 0 is used: the next insert evicts 1 (the oldest unused), not 0.
        assert_eq!(clock.get(&0), Some(0));
        clock.insert_if(10, 10, 100, || true);
        assert_eq!(clock.get(&0), Some(0));
        assert_eq!(clock.get(&1), None);
        let ring = clock.ring.lock().unwrap();
        assert!(ring.bytes <= clock.budget);
    }

    #[test]
    fn an_item_larger_than_the_budget_is_not_kept() {
        let clock: Clock<u32, u32> = Clock::new(1000);
        clock.insert_if(1, 1, 5000, || true);
        assert_eq!(clock.get(&1), None);
    }

    #[test]
    fn an_insert_that_lost_a_race_with_an_invalidation_is_dropped() {
        let hot = Hot::new(1 << 20);
        let before = hot.records_version();
        let key = VariantKey::from_bytes(&[7; 64]).unwrap();
        let one = || -> Variants {
            let e = through_the_store::entry("http://x/", "1");
            Arc::from(vec![Variant::new(key, e)])
        };
        hot.invalidate(&key);
        hot.keep_records([7; 32], one(), before);
        assert!(hot.records(&[7; 32]).is_none());
        // Nothing stored for a URL is not worth keeping.
        hot.keep_records([7; 32], Arc::from(Vec::new()), hot.records_version());
        assert!(hot.records(&[7; 32]).is_none());
        hot.keep_records([7; 32], one(), hot.records_version());
        assert!(hot.records(&[7; 32]).is_some());
        hot.invalidate(&key);
        assert!(hot.records(&[7; 32]).is_none());
    }

    mod through_the_store {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};

        use futures_util::StreamExt;

        use crate::key::{PrimaryKey, VariantKey};
        use crate::policy::{Freshness, HeaderList};
        use crate::store::{BodyInfo, Entry, Store, StoreOptions};

        fn at(secs: u64) -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(secs)
        }

        pub(super) fn entry(url: &str, marker: &str) -> Entry {
            let mut headers = HeaderList::new();
            headers.push("x-version", marker);
            Entry {
                url: url.to_string(),
                status: 200,
                headers,
                vary: Vec::new(),
                freshness: Freshness {
                    request_time: at(1000),
                    response_time: at(1000),
                    corrected_initial_age: Duration::ZERO,
                    lifetime: Duration::from_secs(60),
                    stale_while_revalidate: Duration::ZERO,
                    stale_if_error: Duration::ZERO,
                    must_revalidate: false,
                    no_cache: false,
                },
                tags: vec!["t".into()],
                stored_at: at(1000),
                body: BodyInfo::default(),
            }
        }

        fn hot_store(dir: &std::path::Path) -> Store {
            let opts = StoreOptions {
                hot_cache: 8 << 20,
                ..StoreOptions::default()
            };
            Store::open(dir, opts).unwrap()
        }

        async fn put(store: &Store, key: VariantKey, e: Entry, body: &[u8]) {
            let mut w = store.begin_write(key, e);
            w.write(body).await.unwrap();
            w.commit(None).await.unwrap();
        }

        fn version_of(store: &Store, p: &PrimaryKey) -> Option<String> {
            let found = store.lookup(p).unwrap();
            found
                .first()
                .and_then(|v| v.entry.headers.get_str("x-version").map(str::to_string))
        }

        async fn read(store: &Store, key: &VariantKey, e: &Entry) -> Vec<u8> {
            let mut out = Vec::new();
            let mut body = store.open_body(key, e).await.unwrap();
            while let Some(chunk) = body.next().await {
                out.extend_from_slice(&chunk.unwrap());
            }
            out
        }

        // A URL purge (what every successful POST does) forgets that URL's records only: the
        // other URLs' hits keep coming from memory.
        #[tokio::test]
        async fn a_url_purge_leaves_other_urls_records_in_memory() {
            let dir = tempfile::tempdir().unwrap();
            let store = hot_store(dir.path());
            let (a, b) = (
                PrimaryKey::new("http", "x", "/a"),
                PrimaryKey::new("http", "x", "/b"),
            );
            for p in [&a, &b] {
                let mut w = store.begin_write(VariantKey::new(p, &[]), entry(p.url(), "1"));
                w.write(b"body").await.unwrap();
                w.commit(None).await.unwrap();
                store.lookup(p).unwrap();
            }
            let hot = &store.shared().hot;
            assert!(hot.records(a.hash()).is_some() && hot.records(b.hash()).is_some());
            store.purge_url(&a, true, at(1010)).unwrap();
            assert!(
                hot.records(a.hash()).is_none(),
                "a soft purge keeps a stale record"
            );
            store.lookup(&a).unwrap();
            store.purge_url(&b, false, at(2000)).unwrap();
            assert!(hot.records(b.hash()).is_none());
            assert!(
                hot.records(a.hash()).is_some(),
                "another URL's record was dropped"
            );
            store
                .purge_url(&PrimaryKey::new("http", "x", "/none"), true, at(2000))
                .unwrap();
            assert!(hot.records(a.hash()).is_some());
            store.purge_prefix("http://x/", false, at(2000)).unwrap();
            assert!(hot.records(a.hash()).is_none());
        }

        #[tokio::test]
        async fn every_change_to_an_entry_is_seen_by_the_next_lookup() {
            let dir = tempfile::tempdir().unwrap();
            let store = hot_store(dir.path());
            let p = PrimaryKey::new("http", "x", "/a");
            let key = VariantKey::new(&p, &[]);
            put(&store, key, entry(p.url(), "1"), b"one").await;
            assert_eq!(version_of(&store, &p).as_deref(), Some("1"));
            // Held now: the second lookup shares the first one's copy.
            assert!(std::sync::Arc::ptr_eq(
                &store.lookup(&p).unwrap(),
                &store.lookup(&p).unwrap()
            ));

            put(&store, key, entry(p.url(), "2"), b"two").await;
            assert_eq!(version_of(&store, &p).as_deref(), Some("2"), "a commit");

            let body = store.get(&key).unwrap().unwrap().body.blake3;
            let mut headers = HeaderList::new();
            headers.push("x-version", "3");
            let fresh = entry(p.url(), "3").freshness;
            let generation = store.purge_generation();
            assert!(
                store
                    .update_meta(&key, &body, headers, fresh, generation)
                    .unwrap()
            );
            assert_eq!(version_of(&store, &p).as_deref(), Some("3"), "a 304 merge");

            store.purge_url(&p, true, at(1010)).unwrap();
            let soft = store.lookup(&p).unwrap();
            assert_eq!(
                soft[0].entry.freshness.fresh_until(),
                store.get(&key).unwrap().unwrap().freshness.fresh_until(),
                "a soft purge"
            );
            store.purge_tag("t", false, at(2000)).unwrap();
            assert!(store.lookup(&p).unwrap().is_empty(), "a purge by tag");

            put(&store, key, entry(p.url(), "4"), b"four").await;
            assert_eq!(version_of(&store, &p).as_deref(), Some("4"));
            store.remove(&key).unwrap();
            assert!(store.lookup(&p).unwrap().is_empty(), "a removal");
        }

        #[tokio::test]
        async fn a_hot_body_is_served_from_memory_and_a_cold_one_is_still_checked() {
            let dir = tempfile::tempdir().unwrap();
            let store = hot_store(dir.path());
            let p = PrimaryKey::new("http", "x", "/big");
            let key = VariantKey::new(&p, &[]);
            let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            put(&store, key, entry(p.url(), "1"), &body).await;
            let e = store.get(&key).unwrap().unwrap();
            assert!(e.body.inline.is_none(), "a file body");
            assert_eq!(read(&store, &key, &e).await, body);

            // Damage the file: the verified copy in memory is what is served, byte for byte.
            let path = store.shared().bodies.path_of(&e.body.blake3);
            let mut damaged = std::fs::read(&path).unwrap();
            damaged[100] ^= 0xff;
            std::fs::write(&path, &damaged).unwrap();
            assert_eq!(read(&store, &key, &e).await, body);
            let mut range = store.open_body_range(&key, &e, 90, 20).await.unwrap();
            assert_eq!(&range.next().await.unwrap().unwrap()[..], &body[90..110]);

            // Without the tier, the same damage is caught and the entry dropped.
            drop((range, store));
            let cold = Store::open(dir.path(), StoreOptions::default()).unwrap();
            assert!(
                cold.open_body(&key, &e).await.is_err() || {
                    let mut s = cold.open_body(&key, &e).await.unwrap();
                    let mut failed = false;
                    while let Some(c) = s.next().await {
                        failed |= c.is_err();
                    }
                    failed
                }
            );
            assert!(cold.get(&key).unwrap().is_none());
        }
    }

    mod filling {
        use futures_util::StreamExt;

        use super::through_the_store::entry;
        use crate::key::{PrimaryKey, VariantKey};
        use crate::store::{Store, StoreOptions};

        async fn drain(s: crate::store::BodyStream) -> (Vec<u8>, bool) {
            let mut s = s;
            let (mut out, mut failed) = (Vec::new(), false);
            while let Some(c) = s.next().await {
                match c {
                    Ok(c) => out.extend_from_slice(&c),
                    Err(_) => failed = true,
                }
            }
            (out, failed)
        }

        #[tokio::test]
        async fn one_cold_read_keeps_the_copy_and_only_a_verified_one() {
            let dir = tempfile::tempdir().unwrap();
            let opts = StoreOptions {
                hot_cache: 8 << 20,
                ..StoreOptions::default()
            };
            let store = Store::open(dir.path(), opts).unwrap();
            let p = PrimaryKey::new("http", "x", "/f");
            let key = VariantKey::new(&p, &[]);
            let body: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
            let mut w = store.begin_write(key, entry(p.url(), "1"));
            w.write(&body).await.unwrap();
            let e = w.commit(None).await.unwrap();
            let hash = e.body.blake3;

            // Two cold readers at once: both stream the file, one of them makes the copy.
            let (a, b) = (
                store.open_body(&key, &e).await.unwrap(),
                store.open_body(&key, &e).await.unwrap(),
            );
            assert_eq!(store.shared().hot.filling.lock().unwrap().len(), 1);
            assert!(
                store.shared().hot.body(&hash).is_none(),
                "nothing kept before the end"
            );
            assert_eq!(drain(a).await, (body.clone(), false));
            assert_eq!(drain(b).await, (body.clone(), false));
            assert_eq!(store.shared().hot.body(&hash).as_deref(), Some(&body[..]));
            assert!(store.shared().hot.filling.lock().unwrap().is_empty());

            // A reader that goes away early leaves no mark: the next cold read makes the copy.
            let p3 = PrimaryKey::new("http", "x", "/h");
            let key3 = VariantKey::new(&p3, &[]);
            let third: Vec<u8> = body.iter().map(|b| b.wrapping_add(2)).collect();
            let mut w = store.begin_write(key3, entry(p3.url(), "1"));
            w.write(&third).await.unwrap();
            let e3 = w.commit(None).await.unwrap();
            let mut s = store.open_body(&key3, &e3).await.unwrap();
            assert!(s.next().await.unwrap().is_ok());
            drop(s);
            assert!(store.shared().hot.filling.lock().unwrap().is_empty());
            assert_eq!(
                drain(store.open_body(&key3, &e3).await.unwrap()).await,
                (third.clone(), false)
            );
            assert_eq!(
                store.shared().hot.body(&e3.body.blake3).as_deref(),
                Some(&third[..])
            );

            // A damaged file: the read fails at its end and keeps nothing.
            let p2 = PrimaryKey::new("http", "x", "/g");
            let key2 = VariantKey::new(&p2, &[]);
            let other: Vec<u8> = body.iter().map(|b| b.wrapping_add(1)).collect();
            let mut w = store.begin_write(key2, entry(p2.url(), "1"));
            w.write(&other).await.unwrap();
            let e2 = w.commit(None).await.unwrap();
            let path = store.shared().bodies.path_of(&e2.body.blake3);
            let mut damaged = std::fs::read(&path).unwrap();
            damaged[7] ^= 1;
            std::fs::write(&path, &damaged).unwrap();
            let (_, failed) = drain(store.open_body(&key2, &e2).await.unwrap()).await;
            assert!(failed, "the damage is reported");
            assert!(store.shared().hot.body(&e2.body.blake3).is_none());
            assert!(store.get(&key2).unwrap().is_none(), "the entry is dropped");
        }
    }

    #[test]
    fn a_zero_budget_holds_nothing() {
        let hot = Hot::new(0);
        hot.keep_body([1; 32], Bytes::from_static(b"x"));
        assert!(hot.body(&[1; 32]).is_none());
        assert!(!hot.takes_body(1));
    }
}
