//! Unit tests of the store facade that need its internals (raw records, counters).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::index::tests::put_raw;
use super::*;
use crate::key::{PrimaryKey, VariantKey};

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn entry(url: &str) -> Entry {
    Entry {
        url: url.to_string(),
        status: 200,
        headers: HeaderList::new(),
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

fn vary(v: &str) -> Vec<(String, Option<String>)> {
    vec![("accept".into(), Some(v.into()))]
}

#[tokio::test]
async fn an_undecodable_record_is_dropped_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let p = PrimaryKey::new("http", "x", "/");
    let good = VariantKey::new(&p, &vary("a"));
    let bad = VariantKey::new(&p, &vary("b"));
    let mut w = store.begin_write(good, entry(p.url()));
    w.write(b"hello").await.unwrap();
    w.commit(None).await.unwrap();
    put_raw(&store.shared().index, &bad, &[1, 0xff, 0xff]);

    let found = store.variants(&p).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, good);
    assert_eq!(store.get(&bad).unwrap(), None);
    assert_eq!(store.stats().dropped_records, 1);
    // An unknown version byte is dropped the same way, through get().
    put_raw(&store.shared().index, &bad, &[99, 0]);
    assert_eq!(store.get(&bad).unwrap(), None);
    assert_eq!(store.variants(&p).unwrap().len(), 1);
}

#[tokio::test]
async fn a_damaged_inline_body_is_refused_before_any_byte() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let p = PrimaryKey::new("http", "x", "/");
    let key = VariantKey::new(&p, &[]);
    let mut w = store.begin_write(key, entry(p.url()));
    w.write(b"hello").await.unwrap();
    let mut stored = w.commit(Some(5)).await.unwrap();
    // Same length and hash, different bytes: as if the record's body bytes rotted.
    stored.body.inline = Some(bytes::Bytes::from_static(b"jello"));
    put_raw(
        &store.shared().index,
        &key,
        &format::encode_entry(&stored).unwrap(),
    );

    let got = store.get(&key).unwrap().unwrap();
    let err = store.open_body(&key, &got).await.err().unwrap();
    assert!(matches!(err, StoreError::BodyCorrupt { .. }), "{err}");
    assert_eq!(store.get(&key).unwrap(), None);
    assert_eq!(store.stats().damaged_bodies, 1);
}

#[tokio::test]
async fn inline_max_is_the_last_inline_size() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        inline_max: 10,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), opts).unwrap();
    for (n, inline) in [(10, true), (11, false)] {
        let p = PrimaryKey::new("http", "x", &format!("/{n}"));
        let key = VariantKey::new(&p, &[]);
        let mut w = store.begin_write(key, entry(p.url()));
        // In two chunks, so the spill happens mid-body.
        w.write(&[b'a'; 6]).await.unwrap();
        w.write(&vec![b'b'; n - 6]).await.unwrap();
        let e = w.commit(Some(n as u64)).await.unwrap();
        assert_eq!(e.body.inline.is_some(), inline, "{n} bytes");
        let mut want = vec![b'a'; 6];
        want.extend(vec![b'b'; n - 6]);
        assert_eq!(store.read_body_to_vec(&key, &e).await.unwrap(), want);
    }
}

#[test]
fn options_out_of_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        inline_max: MAX_INLINE_MAX + 1,
        ..StoreOptions::default()
    };
    assert!(matches!(
        Store::open(dir.path(), opts),
        Err(StoreError::InvalidOptions(_))
    ));
}

fn is_send<T: Send>(_: &T) {}

#[tokio::test]
async fn handles_and_futures_can_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn stream<
        T: futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static,
    >() {
    }
    send_sync::<Store>();
    stream::<BodyStream>();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let p = PrimaryKey::new("http", "x", "/");
    let key = VariantKey::new(&p, &[]);
    let mut w = store.begin_write(key, entry(p.url()));
    is_send(&w);
    let write = w.write(b"x");
    is_send(&write);
    write.await.unwrap();
    let commit = w.commit(None);
    is_send(&commit);
    let e = commit.await.unwrap();
    let open = store.open_body(&key, &e);
    is_send(&open);
    let flush = store.flush();
    is_send(&flush);
    open.await.unwrap();
    flush.await.unwrap();
}

async fn collect_range(
    store: &Store,
    k: &VariantKey,
    e: &Entry,
    start: u64,
    len: u64,
) -> Result<Vec<u8>, StoreError> {
    let mut s = store.open_body_range(k, e, start, len).await?;
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.map_err(|e| StoreError::Io {
            path: PathBuf::new(),
            source: e,
        })?);
    }
    Ok(out)
}

#[tokio::test]
async fn open_body_range_slices_inline_and_file_bodies_and_rejects_bad_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    for (i, len) in [1000usize, 300_000].into_iter().enumerate() {
        let p = PrimaryKey::new("http", "x", &format!("/{i}"));
        let k = VariantKey::new(&p, &[]);
        let body: Vec<u8> = (0..len).map(|j| (j * 13 % 251) as u8).collect();
        let mut w = store.begin_write(k, entry(p.url()));
        w.write(&body).await.unwrap();
        let e = w.commit(None).await.unwrap();
        assert_eq!(e.body.inline.is_some(), len < 16 * 1024);
        for (start, n) in [
            (0, 1),
            (10, 100),
            (len as u64 - 70_000.min(len as u64 - 1), 5),
        ] {
            let got = collect_range(&store, &k, &e, start, n).await.unwrap();
            assert_eq!(
                got,
                body[start as usize..(start + n) as usize],
                "{len}: {start}+{n}"
            );
        }
        // Twice: the second read takes the verified-file path.
        let tail = collect_range(&store, &k, &e, len as u64 - 10, 10)
            .await
            .unwrap();
        assert_eq!(tail, body[len - 10..]);
        assert!(matches!(
            store.open_body_range(&k, &e, len as u64 - 1, 2).await,
            Err(StoreError::InvalidOptions(_))
        ));
        assert!(store.open_body_range(&k, &e, u64::MAX, 2).await.is_err());
    }
}

#[tokio::test]
async fn open_body_range_rehashes_a_file_changed_after_verification() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let p = PrimaryKey::new("http", "x", "/f");
    let k = VariantKey::new(&p, &[]);
    let body = vec![7u8; 200_000];
    let mut w = store.begin_write(k, entry(p.url()));
    w.write(&body).await.unwrap();
    let e = w.commit(None).await.unwrap();
    assert_eq!(
        collect_range(&store, &k, &e, 0, 10).await.unwrap(),
        vec![7u8; 10]
    );
    // Damage far from the range asked: only a whole-file check can see it.
    let path = store.shared().bodies.path_of(&e.body.blake3);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[150_000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        store.open_body_range(&k, &e, 0, 10).await,
        Err(StoreError::BodyCorrupt { .. })
    ));
    assert_eq!(store.get(&k).unwrap(), None, "the damaged entry is dropped");
    assert_eq!(store.stats().damaged_bodies, 1);
}

#[tokio::test]
async fn a_committed_body_file_counts_as_verified_for_range_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let p = PrimaryKey::new("http", "x", "/v");
    let k = VariantKey::new(&p, &[]);
    let mut w = store.begin_write(k, entry(p.url()));
    w.write(&vec![3u8; 200_000]).await.unwrap();
    let e = w.commit(None).await.unwrap();
    // The writer hashed it: the first range read seeks without hashing the file again.
    let path = store.shared().bodies.path_of(&e.body.blake3);
    let stamp = bodies::FileStamp::of(&std::fs::metadata(&path).unwrap());
    assert!(store.shared().verified.is_verified(&e.body.blake3, &stamp));
    assert_eq!(
        collect_range(&store, &k, &e, 199_990, 10).await.unwrap(),
        vec![3u8; 10]
    );
}

// ---- reconcile: counters and body references recounted from the records ----

use super::index::tests::{set_counter, set_refcount};

async fn put_body(store: &Store, url: &str, body: &[u8]) -> (VariantKey, Entry) {
    let p = PrimaryKey::from_url(url).unwrap();
    let key = VariantKey::new(&p, &[]);
    let mut w = store.begin_write(key, entry(p.url()));
    w.write(body).await.unwrap();
    (key, w.commit(Some(body.len() as u64)).await.unwrap())
}

fn file_body(seed: u8) -> Vec<u8> {
    (0..40_000u32)
        .map(|i| (i as u8).wrapping_add(seed))
        .collect()
}

fn body_files(dir: &Path) -> usize {
    fn walk(d: &Path) -> usize {
        std::fs::read_dir(d).map_or(0, |items| {
            items
                .flatten()
                .map(|i| {
                    let p = i.path();
                    match (p.is_dir(), p.file_name().is_some_and(|n| n == "tmp")) {
                        (true, true) => 0,
                        (true, false) => walk(&p),
                        (false, _) => 1,
                    }
                })
                .sum()
        })
    }
    walk(&dir.join("bodies"))
}

/// The counters, computed from scratch from the entries the store lists.
fn recount_by_hand(store: &Store) -> [u64; 6] {
    let mut c = [0u64; 6];
    let mut files = std::collections::HashMap::new();
    for item in store.entries(None, None) {
        let (_, e) = item.unwrap();
        c[0] += 1;
        c[1] += format::encode_entry(&e).unwrap().len() as u64;
        c[2] += index::index_bytes(&e);
        c[3] += e.body.len;
        if e.body.inline.is_none() {
            files.insert(e.body.blake3, e.body.len);
        }
    }
    c[2] += files.len() as u64 * index::REF_ROW_BYTES;
    c[4] = files.len() as u64;
    c[5] = files.values().sum();
    c
}

/// What a store holding exactly these (inline) bodies and files counts, from a fresh store.
async fn reference_stats(bodies: &[(&str, Vec<u8>)]) -> StoreStats {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    for (url, body) in bodies {
        put_body(&store, url, body).await;
    }
    store.stats()
}

fn counters(s: &StoreStats) -> [u64; 6] {
    [
        s.entries,
        s.record_bytes,
        s.index_bytes,
        s.body_bytes,
        s.body_files,
        s.body_file_bytes,
    ]
}

// A record that no longer decodes cannot say which body file it held: replacing it leaks the
// reference and the counters until a reconcile recounts them, which also frees the file.
#[tokio::test]
async fn reconcile_repairs_what_a_replaced_undecodable_record_leaked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let (key, _) = put_body(&store, "http://x/leak", &file_body(1)).await;
    let (_, kept) = put_body(&store, "http://x/kept", &file_body(2)).await;
    assert!(!store.reconcile_wanted());
    put_raw(&store.shared().index, &key, &[1, 0xff, 0xff]);
    put_body(&store, "http://x/leak", b"small now").await;
    assert!(store.reconcile_wanted(), "the leak is noticed");
    let before = store.stats();
    let want = reference_stats(&[
        ("http://x/leak", b"small now".to_vec()),
        ("http://x/kept", file_body(2)),
    ])
    .await;
    assert_eq!(before.body_files, 2, "the old file is still counted");
    assert_ne!(counters(&before), counters(&want));

    let report = store.reconcile(2, &|| true).unwrap().unwrap();
    assert_eq!(report.records, 2);
    assert_eq!(report.refs_repaired, 1);
    let fixed: Vec<&str> = report.repaired.iter().map(|r| r.counter).collect();
    assert!(
        fixed.contains(&"body_files") && fixed.contains(&"index_bytes"),
        "{report:?}"
    );
    assert_eq!(counters(&store.stats()), counters(&want));
    assert!(!store.reconcile_wanted());
    // The leaked file goes after the next flush; the other stays and reads.
    assert_eq!(body_files(dir.path()), 2);
    store.flush().await.unwrap();
    assert_eq!(body_files(dir.path()), 1);
    let p = PrimaryKey::from_url("http://x/kept").unwrap();
    let k = VariantKey::new(&p, &[]);
    assert_eq!(
        store.read_body_to_vec(&k, &kept).await.unwrap(),
        file_body(2)
    );
    // A second pass finds nothing to fix.
    let again = store.reconcile(2, &|| true).unwrap().unwrap();
    assert!(
        again.repaired.is_empty() && again.refs_repaired == 0,
        "{again:?}"
    );
}

// Dropping an undecodable record (on read) leaves its body reference behind the same way.
#[tokio::test]
async fn reconcile_repairs_what_a_dropped_undecodable_record_leaked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let (key, _) = put_body(&store, "http://x/d", &file_body(3)).await;
    put_raw(&store.shared().index, &key, &[99]);
    assert_eq!(store.get(&key).unwrap(), None);
    assert_eq!(store.stats().entries, 0);
    assert_eq!(store.stats().body_files, 1, "leaked until a reconcile");
    assert!(store.reconcile_wanted());
    store.reconcile(16, &|| true).unwrap().unwrap();
    let s = store.stats();
    assert_eq!(counters(&s), [0; 6]);
    assert_eq!(s.usage_bytes, 0);
    store.flush().await.unwrap();
    assert_eq!(body_files(dir.path()), 0);
}

// The reconcile walks the records in batches while writes go on; whatever they do, behind or
// ahead of the walk, the counters it leaves are those of a stopped-world recount, even when
// they started out wrong. Open does none of this work: drifted counters stay drifted until the
// pass runs (open is O(1)).
#[tokio::test]
async fn reconcile_is_exact_while_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let url = |i: usize| format!("http://x/r/{i:03}");
    let body_of = |i: usize| -> Vec<u8> {
        if i.is_multiple_of(3) {
            file_body((i % 4) as u8) // four shared files
        } else {
            format!("inline {i}").into_bytes()
        }
    };
    let mut keys = Vec::new();
    for i in 0..60 {
        keys.push(put_body(&store, &url(i), &body_of(i)).await);
    }
    drop(store);
    {
        let index = super::index::tests::open_raw(&dir.path().join("db"));
        set_counter(&index, "entries", 12_345);
        set_counter(&index, "body_file_bytes", 1);
        // One file claims a reference too many, another one too few.
        set_refcount(&index, &blake3::hash(&file_body(0)).into(), 99);
        set_refcount(&index, &blake3::hash(&file_body(1)).into(), 1);
        index.flush().unwrap();
    }
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(store.stats().entries, 12_345, "open does not scan");
    // Records that stop decoding before the pass (damage does not happen to a record the pass
    // already read: records change only through writes, which it sees).
    let rotten = [5, 17, 29, 41, 53];
    for i in rotten {
        put_raw(&store.shared().index, &keys[i].0, &[1, 2, 3]);
    }

    store.reconcile_begin();
    let mut step = 0;
    let mut extra = 60;
    let report = loop {
        if let Some(report) = store.reconcile_step(5).unwrap() {
            break report;
        }
        step += 1;
        // Mutations spread over the key space, so some land behind the walk, some ahead.
        match step % 5 {
            0 => {
                put_body(&store, &url(extra), &body_of(extra)).await;
                extra += 1;
            }
            1 => {
                let (k, _) = &keys[step * 7 % 60];
                store.remove(k).unwrap();
            }
            2 => {
                let i = step * 11 % 60;
                put_body(&store, &url(i), &file_body(9)).await;
            }
            3 => {
                let (k, e) = &keys[step * 13 % 60];
                let generation = store.purge_generation();
                let mut headers = HeaderList::new();
                headers.push("etag", format!("\"{step}\""));
                let _ = store.update_meta(k, &e.body.blake3, headers, e.freshness, generation);
            }
            _ => {
                let (k, _) = &keys[rotten[step / 5 % rotten.len()]];
                let _ = store.get(k);
            }
        }
    };
    assert!(step > 10, "the pass took several batches ({step})");
    assert!(report.refs_repaired >= 2, "{report:?}");
    // The truth, by a stopped-world count over what the store now holds.
    let after = store.stats();
    assert_eq!(counters(&after), recount_by_hand(&store));
    let again = store.reconcile(1000, &|| true).unwrap().unwrap();
    assert!(
        again.repaired.is_empty() && again.refs_repaired == 0,
        "{again:?}"
    );
    // Every file still referenced is on disk; the surplus ones go with the next flush.
    store.flush().await.unwrap();
    assert_eq!(body_files(dir.path()) as u64, after.body_files);
}

#[tokio::test]
async fn a_reconcile_stops_when_asked_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    for i in 0..20 {
        put_body(&store, &format!("http://x/s/{i}"), b"x").await;
    }
    set_counter(&store.shared().index, "entries", 3);
    let calls = std::sync::atomic::AtomicU64::new(0);
    let stop_after_two = || calls.fetch_add(1, Ordering::SeqCst) < 2;
    assert_eq!(store.reconcile(4, &stop_after_two).unwrap(), None);
    assert_eq!(store.stats().entries, 3, "not finished yet");
    let report = store.reconcile(4, &|| true).unwrap().unwrap();
    assert_eq!(report.records, 20, "resumed, each record counted once");
    assert_eq!(store.stats().entries, 20);
}

// ---- admission: a scan of one-hit URLs does not flush the hot set ----

/// Stores `n` one-hit entries of `len` bytes after one lookup each, as the proxy does on a miss.
async fn scan(store: &Store, prefix: &str, n: usize, len: usize) -> (u64, u64) {
    let (mut stored, mut refused) = (0, 0);
    for i in 0..n {
        let url = format!("http://x/{prefix}/{i}");
        let p = PrimaryKey::from_url(&url).unwrap();
        store.variants(&p).unwrap();
        let mut w = store.begin_write(VariantKey::new(&p, &[]), entry(p.url()));
        w.write(&vec![i as u8; len]).await.unwrap();
        match w.commit(None).await {
            Ok(_) => stored += 1,
            Err(StoreError::NotAdmitted) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    (stored, refused)
}

async fn hot_set_after_scan(hot_lookups: usize) -> (usize, StoreStats) {
    let dir = tempfile::tempdir().unwrap();
    let max = 400_000;
    let opts = StoreOptions {
        max_size: Some(max),
        // Evict inside the commit: no thread timing in this test.
        flush_every_ms: None,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), opts).unwrap();
    // Cold entries first (least recently used), then the hot set, then a scan of one-hit URLs
    // three times max_size.
    scan(&store, "cold", 10, 20_000).await;
    let hot: Vec<String> = (0..8).map(|i| format!("http://x/hot/{i}")).collect();
    for (i, url) in hot.iter().enumerate() {
        store.variants(&PrimaryKey::from_url(url).unwrap()).unwrap();
        put_body(&store, url, &vec![i as u8; 15_000]).await;
    }
    for _ in 0..hot_lookups {
        for url in &hot {
            store.variants(&PrimaryKey::from_url(url).unwrap()).unwrap();
        }
    }
    let (stored, _) = scan(&store, "scan", 60, 20_000).await;
    assert!(stored > 0, "new entries still get in");
    assert!(store.usage() <= max, "usage {} over {max}", store.usage());
    let alive = hot
        .iter()
        .filter(|url| {
            let p = PrimaryKey::from_url(url).unwrap();
            store.get(&VariantKey::new(&p, &[])).unwrap().is_some()
        })
        .count();
    (alive, store.stats())
}

#[tokio::test]
async fn a_hot_set_survives_a_scan_larger_than_max_size() {
    let (alive, stats) = hot_set_after_scan(4).await;
    assert_eq!(
        alive, 8,
        "hot entries were evicted by one-hit traffic: {stats:?}"
    );
    // The cold entries were evicted for the scan, and once the hot set was next in line the
    // scan was refused instead.
    assert!(stats.evictions >= 10, "{stats:?}");
    assert!(stats.rejected > 0, "{stats:?}");
    // The same store and scan when the hot set was used no more than the scan: recency alone
    // (LRU) decides, and the hot set goes.
    let (alive, _) = hot_set_after_scan(0).await;
    assert_eq!(alive, 0);
}

// A purge of one URL refuses that URL's writes begun before it (every variant), and only
// those: other URLs' fetches in flight still land. Past MAX_URL_FENCES the oldest fences fold
// into one for everything older, which still refuses what they refused.
#[tokio::test]
async fn a_url_purge_fences_that_urls_writes_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let (a, b) = (
        PrimaryKey::new("http", "f", "/a"),
        PrimaryKey::new("http", "f", "/b"),
    );
    let before = store.purge_generation();
    store.purge_url(&a, false, at(1000)).unwrap();
    for v in ["x", "y"] {
        let key = VariantKey::new(&a, &vary(v));
        let mut w = store.begin_write_since(key, entry(a.url()), before);
        w.write(b"old").await.unwrap();
        assert!(matches!(w.commit(None).await, Err(StoreError::Superseded)));
    }
    let key_b = VariantKey::new(&b, &[]);
    let mut w = store.begin_write_since(key_b, entry(b.url()), before);
    w.write(b"other").await.unwrap();
    w.commit(None).await.unwrap();
    let after = store.purge_generation();
    let mut w = store.begin_write_since(VariantKey::new(&a, &[]), entry(a.url()), after);
    w.write(b"new").await.unwrap();
    w.commit(None).await.unwrap();

    // Many fences later the one for /a is folded, not forgotten.
    for i in 0..=MAX_URL_FENCES {
        store
            .purge_url(
                &PrimaryKey::new("http", "f", &format!("/n{i}")),
                false,
                at(1000),
            )
            .unwrap();
    }
    assert!(store.shared().purge_lock.read().unwrap().by_url.len() <= MAX_URL_FENCES);
    let mut w = store.begin_write_since(VariantKey::new(&a, &vary("z")), entry(a.url()), before);
    w.write(b"old").await.unwrap();
    assert!(matches!(w.commit(None).await, Err(StoreError::Superseded)));
    let recent = store.purge_generation();
    let mut w = store.begin_write_since(key_b, entry(b.url()), recent);
    w.write(b"fine").await.unwrap();
    w.commit(None).await.unwrap();
}
