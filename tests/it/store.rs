//! The persistent store through its public API: round trips, variants, shared bodies, integrity,
//! truncation, reopen, the committed v1 fixture, corruption, purges, and a kill -9 crash loop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use larder::key::{PrimaryKey, VariantKey};
use larder::policy::{Freshness, HeaderList};
use larder::store::{BodyInfo, Entry, Store, StoreError, StoreOptions};

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn entry(url: &str, tags: &[&str]) -> Entry {
    Entry {
        url: url.to_string(),
        status: 200,
        headers: [("content-type", "text/plain"), ("etag", "\"v1\"")]
            .into_iter()
            .collect(),
        vary: Vec::new(),
        freshness: Freshness {
            request_time: at(1_000_000),
            response_time: at(1_000_001),
            corrected_initial_age: Duration::from_secs(1),
            lifetime: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(10),
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
            no_cache: false,
        },
        tags: tags.iter().map(|t| t.to_string()).collect(),
        stored_at: at(1_000_001),
        body: BodyInfo::default(),
    }
}

fn vary(name: &str, value: Option<&str>) -> Vec<(String, Option<String>)> {
    vec![(name.to_string(), value.map(str::to_string))]
}

/// A body of `len` bytes that differs by `seed`.
fn body(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const FILE_BODY: usize = 100 * 1024;

/// Stores `body` (in 7 KiB chunks, so spills happen mid-chunk) and returns the committed entry.
async fn put(store: &Store, key: VariantKey, e: Entry, body: &[u8]) -> Entry {
    let mut w = store.begin_write(key, e);
    for chunk in body.chunks(7 * 1024) {
        w.write(chunk).await.unwrap();
    }
    w.commit(Some(body.len() as u64)).await.unwrap()
}

fn key(url: &str) -> (PrimaryKey, VariantKey) {
    let p = PrimaryKey::from_url(url).unwrap();
    let k = VariantKey::new(&p, &[]);
    (p, k)
}

/// Content files under bodies/ (not temp files).
fn body_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for item in std::fs::read_dir(d).unwrap() {
            let path = item.unwrap().path();
            if path.is_dir() {
                if path.file_name().unwrap() != "tmp" {
                    walk(&path, out);
                }
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join("bodies"), &mut out);
    out
}

fn temp_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("bodies").join("tmp"))
        .unwrap()
        .count()
}

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).unwrap()
}

#[tokio::test]
async fn round_trip_inline_and_file_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (_, small_key) = key("http://x/small");
    let (_, big_key) = key("http://x/big");
    let small = body(100, 1);
    let big = body(FILE_BODY, 2);

    let e_small = put(&store, small_key, entry("http://x/small", &["a"]), &small).await;
    let e_big = put(&store, big_key, entry("http://x/big", &["b"]), &big).await;

    assert_eq!(e_small.body.inline.as_deref(), Some(&small[..]));
    assert_eq!(e_small.body.len, 100);
    assert_eq!(e_big.body.inline, None);
    assert_eq!(e_big.body.blake3, *blake3::hash(&big).as_bytes());
    assert_eq!(store.get(&small_key).unwrap().as_ref(), Some(&e_small));
    assert_eq!(store.get(&big_key).unwrap().as_ref(), Some(&e_big));
    assert_eq!(
        store.read_body_to_vec(&small_key, &e_small).await.unwrap(),
        small
    );
    assert_eq!(store.read_body_to_vec(&big_key, &e_big).await.unwrap(), big);
    // Metadata survives as given (times are whole seconds here, so nothing is rounded).
    let mut want = entry("http://x/big", &["b"]);
    want.body = e_big.body.clone();
    assert_eq!(e_big, want);
    // The big body is a content-addressed file; the small one is not a file at all.
    let hex = blake3::hash(&big).to_hex();
    assert_eq!(
        body_files(dir.path()),
        vec![
            dir.path()
                .join("bodies")
                .join(&hex[..2])
                .join(&hex[2..4])
                .join(hex.as_str())
        ]
    );
    assert_eq!(temp_files(dir.path()), 0);
    let stats = store.stats();
    assert_eq!(
        (stats.entries, stats.body_bytes),
        (2, 100 + FILE_BODY as u64)
    );
    assert_eq!(
        (stats.body_files, stats.body_file_bytes),
        (1, FILE_BODY as u64)
    );
}

#[tokio::test]
async fn file_bodies_stream_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (_, k) = key("http://x/big");
    let big = body(300 * 1024, 3);
    let e = put(&store, k, entry("http://x/big", &[]), &big).await;
    let chunks: Vec<_> = store.open_body(&k, &e).await.unwrap().collect().await;
    assert!(chunks.len() >= 5, "{} chunks", chunks.len());
    let joined: Vec<u8> = chunks
        .into_iter()
        .flat_map(|c| c.unwrap().to_vec())
        .collect();
    assert_eq!(joined, big);
}

#[tokio::test]
async fn variants_of_one_url_coexist() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let p = PrimaryKey::new("http", "x", "/page");
    let mut keys = Vec::new();
    for (i, v) in [Some("gzip"), Some("br"), None].into_iter().enumerate() {
        let vary = vary("accept-encoding", v);
        let k = VariantKey::new(&p, &vary);
        let mut e = entry(p.url(), &[]);
        e.vary = vary;
        put(&store, k, e, &body(10 + i, i as u8)).await;
        keys.push(k);
    }
    // Another URL whose key shares nothing.
    let (_, other) = key("http://x/page2");
    put(&store, other, entry("http://x/page2", &[]), b"other").await;

    let mut found = store.variants(&p).unwrap();
    assert_eq!(found.len(), 3);
    found.sort_by_key(|(_, e)| e.body.len);
    for (i, (k, e)) in found.iter().enumerate() {
        assert_eq!(*k, keys[i]);
        assert_eq!(*k, VariantKey::new(&p, &e.vary));
        assert_eq!(
            store.read_body_to_vec(k, e).await.unwrap(),
            body(10 + i, i as u8)
        );
    }
}

#[tokio::test]
async fn identical_bodies_share_one_file_until_the_last_entry_goes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let shared = body(FILE_BODY, 4);
    let (_, k1) = key("http://x/1");
    let (_, k2) = key("http://x/2");
    put(&store, k1, entry("http://x/1", &[]), &shared).await;
    let e2 = put(&store, k2, entry("http://x/2", &[]), &shared).await;
    assert_eq!(body_files(dir.path()).len(), 1);
    assert_eq!(store.stats().body_files, 1);
    assert_eq!(store.stats().body_file_bytes, FILE_BODY as u64);

    assert!(store.remove(&k1).unwrap());
    store.flush().await.unwrap();
    assert_eq!(body_files(dir.path()).len(), 1, "still referenced by k2");
    assert_eq!(store.read_body_to_vec(&k2, &e2).await.unwrap(), shared);

    assert!(store.remove(&k2).unwrap());
    assert!(!store.remove(&k2).unwrap());
    store.flush().await.unwrap();
    assert!(body_files(dir.path()).is_empty());
    let stats = store.stats();
    assert_eq!(
        (stats.entries, stats.body_files, stats.body_bytes),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn replacing_an_entry_releases_its_old_body() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (_, k) = key("http://x/r");
    put(&store, k, entry("http://x/r", &[]), &body(FILE_BODY, 5)).await;
    let e = put(&store, k, entry("http://x/r", &[]), &body(FILE_BODY, 6)).await;
    // Same content again: must keep its file.
    let e = {
        let again = put(&store, k, entry("http://x/r", &[]), &body(FILE_BODY, 6)).await;
        assert_eq!(again, e);
        again
    };
    store.flush().await.unwrap();
    assert_eq!(body_files(dir.path()).len(), 1);
    assert_eq!(
        store.read_body_to_vec(&k, &e).await.unwrap(),
        body(FILE_BODY, 6)
    );
    let stats = store.stats();
    assert_eq!(
        (stats.entries, stats.body_files, stats.body_bytes),
        (1, 1, FILE_BODY as u64)
    );
}

#[tokio::test]
async fn a_flipped_byte_in_a_body_file_ends_the_stream_in_err_and_drops_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (_, k) = key("http://x/flip");
    let big = body(200 * 1024, 7);
    let e = put(&store, k, entry("http://x/flip", &[]), &big).await;
    let file = &body_files(dir.path())[0];
    let mut bytes = std::fs::read(file).unwrap();
    bytes[150 * 1024] ^= 0x01;
    std::fs::write(file, &bytes).unwrap();

    let items: Vec<_> = store.open_body(&k, &e).await.unwrap().collect().await;
    let (last, rest) = items.split_last().unwrap();
    let err = last.as_ref().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    let delivered: usize = rest.iter().map(|c| c.as_ref().unwrap().len()).sum();
    assert!(
        delivered < big.len(),
        "a damaged body must never be delivered whole"
    );
    assert_eq!(store.get(&k).unwrap(), None);
    assert_eq!(store.stats().damaged_bodies, 1);
    store.flush().await.unwrap();
    assert!(body_files(dir.path()).is_empty());
}

#[tokio::test]
async fn a_short_or_missing_body_file_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (_, short_key) = key("http://x/short");
    let e = put(
        &store,
        short_key,
        entry("http://x/short", &[]),
        &body(FILE_BODY, 8),
    )
    .await;
    let file = body_files(dir.path())[0].clone();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 1]).unwrap();
    let err = store.read_body_to_vec(&short_key, &e).await.unwrap_err();
    assert!(matches!(err, StoreError::BodyCorrupt { .. }), "{err}");
    assert_eq!(store.get(&short_key).unwrap(), None);

    let (_, gone_key) = key("http://x/gone");
    let e = put(
        &store,
        gone_key,
        entry("http://x/gone", &[]),
        &body(FILE_BODY, 9),
    )
    .await;
    for f in body_files(dir.path()) {
        std::fs::remove_file(f).unwrap();
    }
    let err = store.open_body(&gone_key, &e).await.err().unwrap();
    assert!(matches!(err, StoreError::BodyMissing(_)), "{err}");
    assert_eq!(store.get(&gone_key).unwrap(), None);
    assert_eq!(store.stats().entries, 0);
}

#[tokio::test]
async fn a_truncated_body_leaves_no_entry_and_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (_, k) = key("http://x/t");
    let half = body(50 * 1024, 10);

    // Commit with fewer bytes than announced.
    let mut w = store.begin_write(k, entry("http://x/t", &[]));
    w.write(&half).await.unwrap();
    assert_eq!(temp_files(dir.path()), 1, "spilled to a temp file");
    let err = w.commit(Some(100 * 1024)).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Truncated {
                expected: 102400,
                got: 51200
            }
        ),
        "{err}"
    );
    assert_eq!(store.get(&k).unwrap(), None);
    assert_eq!(temp_files(dir.path()), 0);
    assert!(body_files(dir.path()).is_empty());

    // More bytes than announced is not complete either.
    let mut w = store.begin_write(k, entry("http://x/t", &[]));
    w.write(&half).await.unwrap();
    assert!(matches!(
        w.commit(Some(10)).await,
        Err(StoreError::Truncated { .. })
    ));

    // A writer dropped mid-body (client went away, origin reset).
    let mut w = store.begin_write(k, entry("http://x/t", &[]));
    w.write(&half).await.unwrap();
    drop(w);
    assert_eq!(store.get(&k).unwrap(), None);
    assert_eq!(temp_files(dir.path()), 0);
    assert!(body_files(dir.path()).is_empty());
    assert_eq!(store.stats().entries, 0);
}

#[tokio::test]
async fn reopening_returns_every_committed_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut committed = Vec::new();
    {
        let store = open(dir.path());
        for i in 0..20u8 {
            let url = format!("http://x/item/{i}");
            let (_, k) = key(&url);
            let b = body(if i % 2 == 0 { 500 } else { 40 * 1024 }, i);
            let e = put(&store, k, entry(&url, &["all"]), &b).await;
            committed.push((k, e, b));
        }
        // Dropped without flush(): closing must make it durable.
    }
    let store = open(dir.path());
    for (k, e, b) in &committed {
        assert_eq!(store.get(k).unwrap().as_ref(), Some(e));
        assert_eq!(&store.read_body_to_vec(k, e).await.unwrap(), b);
    }
    assert_eq!(store.stats().entries, 20);
    assert_eq!(store.entries(None, Some("all")).count(), 20);
}

#[test]
fn a_second_open_of_the_same_dir_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    let err = Store::open(dir.path(), StoreOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Locked(_)), "{err}");
    assert!(
        err.to_string().contains("locked by another process"),
        "{err}"
    );
}

#[tokio::test]
async fn a_corrupt_database_is_moved_aside_and_the_store_opens_empty() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let (_, k) = key("http://x/c");
        put(&store, k, entry("http://x/c", &[]), b"cached").await;
    }
    // sled reports Corruption for a config file it cannot parse.
    std::fs::write(
        dir.path().join("db").join("conf"),
        b"not a sled config\n\0\0\0\0",
    )
    .unwrap();

    let store = Store::open_at(dir.path(), StoreOptions::default(), at(1_700_000_000)).unwrap();
    let aside = dir.path().join("db.corrupt-1700000000");
    assert_eq!(store.quarantined(), Some(aside.as_path()));
    assert!(
        aside.join("conf").exists(),
        "the damaged database is kept for inspection"
    );
    let (_, k) = key("http://x/c");
    assert_eq!(store.get(&k).unwrap(), None);
    assert_eq!(store.stats().entries, 0);
    // And it works.
    put(&store, k, entry("http://x/c", &[]), b"again").await;
    assert!(store.get(&k).unwrap().is_some());
}

/// Entries under /a/1, /a/2 (tag "a"), /ab (tag "ab"), /b/1 (tags "b", "a"), two variants of /v.
async fn purge_fixture(store: &Store) {
    for (url, tags) in [
        ("http://x/a/1", &["a"][..]),
        ("http://x/a/2", &["a"][..]),
        ("http://x/ab", &["ab"][..]),
        ("http://x/b/1", &["b", "a"][..]),
    ] {
        let (_, k) = key(url);
        put(store, k, entry(url, tags), url.as_bytes()).await;
    }
    let p = PrimaryKey::new("http", "x", "/v");
    for v in ["1", "2"] {
        let vary = vary("accept", Some(v));
        let mut e = entry(p.url(), &[]);
        e.vary = vary.clone();
        put(store, VariantKey::new(&p, &vary), e, &body(FILE_BODY, 11)).await;
    }
}

fn urls(store: &Store) -> Vec<String> {
    let mut out: Vec<String> = store
        .entries(None, None)
        .map(|r| r.unwrap().1.url)
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn purge_by_url_prefix_tag_and_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = at(2_000_000);
    purge_fixture(&store).await;
    assert_eq!(store.stats().entries, 6);

    assert_eq!(
        store
            .purge_url(&PrimaryKey::from_url("http://x/v").unwrap(), false, now)
            .unwrap(),
        2
    );
    assert_eq!(
        urls(&store),
        [
            "http://x/a/1",
            "http://x/a/2",
            "http://x/ab",
            "http://x/b/1"
        ]
    );

    assert_eq!(store.purge_prefix("http://x/a/", false, now).unwrap(), 2);
    assert_eq!(urls(&store), ["http://x/ab", "http://x/b/1"]);

    assert_eq!(store.purge_tag("a", false, now).unwrap(), 1);
    assert_eq!(urls(&store), ["http://x/ab"]);
    assert_eq!(store.purge_tag("a", false, now).unwrap(), 0);

    assert_eq!(store.purge_all(false, now).unwrap(), 1);
    assert!(urls(&store).is_empty());
    store.flush().await.unwrap();
    assert!(body_files(dir.path()).is_empty());
    let stats = store.stats();
    assert_eq!(
        (stats.entries, stats.body_bytes, stats.body_files),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn soft_purge_keeps_entries_but_makes_them_stale() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    purge_fixture(&store).await;
    // Inside the 60 s lifetime: everything is fresh.
    let now = at(1_000_010);
    assert!(store.expired(now, 100).unwrap().is_empty());

    assert_eq!(store.purge_tag("a", true, now).unwrap(), 3);
    assert_eq!(store.stats().entries, 6);
    for (k, e) in store.entries(None, None).map(Result::unwrap) {
        let tagged = e.tags.iter().any(|t| t == "a");
        assert_eq!(!e.freshness.is_fresh(now), tagged, "{}", e.url);
        // The body is untouched.
        assert_eq!(
            store.read_body_to_vec(&k, &e).await.unwrap().len() as u64,
            e.body.len
        );
    }
    // Stale from now, still inside stale-while-revalidate: expired once that window passes.
    assert_eq!(
        store
            .expired(now + Duration::from_secs(10), 100)
            .unwrap()
            .len(),
        3
    );
    assert_eq!(store.purge_prefix("http://x/v", true, now).unwrap(), 2);
    assert_eq!(store.purge_all(true, now).unwrap(), 6);
    assert_eq!(
        store
            .expired(now + Duration::from_secs(10), 100)
            .unwrap()
            .len(),
        6
    );
    assert!(
        store
            .entries(None, None)
            .all(|r| !r.unwrap().1.freshness.is_fresh(now))
    );
}

#[tokio::test]
async fn a_purge_during_a_write_supersedes_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (p, k) = key("http://x/w");
    let mut w = store.begin_write(k, entry("http://x/w", &[]));
    w.write(&body(FILE_BODY, 12)).await.unwrap();
    store.purge_url(&p, false, at(0)).unwrap();
    let err = w.commit(Some(FILE_BODY as u64)).await.unwrap_err();
    assert!(matches!(err, StoreError::Superseded), "{err}");
    assert_eq!(store.get(&k).unwrap(), None);
    assert_eq!(temp_files(dir.path()), 0);
    assert!(body_files(dir.path()).is_empty());
    // A write begun after the purge is stored.
    put(&store, k, entry("http://x/w", &[]), b"new").await;
    assert!(store.get(&k).unwrap().is_some());
}

#[tokio::test]
async fn the_tag_index_stays_consistent_after_removals_and_replacements() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    purge_fixture(&store).await;
    let tagged = |tag: &str| -> Vec<String> {
        let mut v: Vec<String> = store
            .entries(None, Some(tag))
            .map(|r| r.unwrap().1.url)
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        tagged("a"),
        ["http://x/a/1", "http://x/a/2", "http://x/b/1"]
    );
    assert_eq!(tagged("ab"), ["http://x/ab"]);

    assert!(store.remove(&key("http://x/a/1").1).unwrap());
    assert_eq!(tagged("a"), ["http://x/a/2", "http://x/b/1"]);
    // Replaced with other tags: no longer listed under the old one.
    let (_, k) = key("http://x/b/1");
    put(&store, k, entry("http://x/b/1", &["c"]), b"replaced").await;
    assert_eq!(tagged("a"), ["http://x/a/2"]);
    assert_eq!(tagged("c"), ["http://x/b/1"]);
    assert_eq!(tagged("b"), Vec::<String>::new());
    // Tag and prefix filters combine.
    let both: Vec<_> = store.entries(Some("http://x/a/"), Some("a")).collect();
    assert_eq!(both.len(), 1);
    assert_eq!(store.entries(Some("http://x/zzz"), Some("a")).count(), 0);
    assert_eq!(store.purge_tag("a", false, at(0)).unwrap(), 1);
    assert!(tagged("a").is_empty());
}

#[tokio::test]
async fn update_meta_replaces_headers_and_freshness_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (_, k) = key("http://x/u");
    let e = put(&store, k, entry("http://x/u", &["t"]), &body(FILE_BODY, 13)).await;
    let mut headers = HeaderList::new();
    headers.push("etag", "\"v2\"");
    let mut fresh = e.freshness;
    fresh.response_time = at(5_000_000);
    fresh.lifetime = Duration::from_secs(3600);
    let generation = store.purge_generation();
    assert!(
        store
            .update_meta(&k, &e.body.blake3, headers.clone(), fresh, generation)
            .unwrap()
    );
    let got = store.get(&k).unwrap().unwrap();
    assert_eq!(got.headers, headers);
    assert_eq!(got.freshness, fresh);
    assert_eq!(
        (got.body.clone(), got.tags.clone()),
        (e.body.clone(), e.tags.clone())
    );
    assert_eq!(
        store.read_body_to_vec(&k, &got).await.unwrap(),
        body(FILE_BODY, 13)
    );
    // The expiry index follows the new freshness.
    assert!(store.expired(at(1_000_100), 10).unwrap().is_empty());
    assert_eq!(store.expired(at(5_004_000), 10).unwrap(), vec![k]);
    let (_, missing) = key("http://x/missing");
    assert!(
        !store
            .update_meta(
                &missing,
                &e.body.blake3,
                HeaderList::new(),
                fresh,
                generation
            )
            .unwrap()
    );
    // A revalidation that began before a purge does not refreshen what the purge touched.
    store
        .purge_url(&key("http://x/u").0, true, at(5_000_100))
        .unwrap();
    let stale = store.get(&k).unwrap().unwrap();
    assert!(matches!(
        store.update_meta(&k, &e.body.blake3, headers.clone(), fresh, generation),
        Err(StoreError::Superseded)
    ));
    assert_eq!(store.get(&k).unwrap().unwrap().freshness, stale.freshness);
    // A 304 for the old body does not relabel a newer body stored under the same key.
    let newer = put(&store, k, entry("http://x/u", &["t"]), b"a different body").await;
    let generation = store.purge_generation();
    assert!(
        !store
            .update_meta(&k, &e.body.blake3, headers.clone(), fresh, generation)
            .unwrap()
    );
    assert_eq!(store.get(&k).unwrap().unwrap().headers, newer.headers);
}

#[tokio::test]
async fn expired_lists_oldest_first_up_to_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut keys = Vec::new();
    for i in 0..5u64 {
        let url = format!("http://x/e{i}");
        let (_, k) = key(&url);
        let mut e = entry(&url, &[]);
        // Later i expires earlier, so key order and expiry order differ.
        e.freshness.lifetime = Duration::from_secs(100 - i * 10);
        put(&store, k, e, b"x").await;
        keys.push(k);
    }
    keys.reverse();
    let all = store.expired(at(2_000_000), 100).unwrap();
    assert_eq!(all, keys);
    assert_eq!(store.expired(at(2_000_000), 2).unwrap(), keys[..2]);
    // Only e4 (lifetime 60 s, +10 s stale-while-revalidate, from age 1 at t=1_000_001) is past.
    assert_eq!(store.expired(at(1_000_070), 100).unwrap(), keys[..1]);
}

#[tokio::test]
async fn counters_persist_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let store = open(dir.path());
        purge_fixture(&store).await;
        store.remove(&key("http://x/ab").1).unwrap();
        store.stats()
    };
    let store = open(dir.path());
    assert_eq!(store.stats(), before);
    assert_eq!(before.entries, 5);
    assert_eq!(before.body_files, 1);
}

#[tokio::test]
async fn orphan_body_files_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (_, k) = key("http://x/kept");
    put(&store, k, entry("http://x/kept", &[]), &body(FILE_BODY, 14)).await;
    // As if a crash lost a record after its file was installed.
    let kept = body_files(dir.path())[0].clone();
    let ff = "ff".repeat(32);
    let orphan = dir.path().join("bodies/ff/ff").join(&ff);
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"orphan").unwrap();
    // And a file that is not at its content address at all.
    let misplaced = kept.with_file_name(&ff);
    std::fs::write(&misplaced, b"misplaced").unwrap();
    assert_eq!(store.sweep_orphan_bodies().unwrap(), 2);
    assert!(!orphan.exists());
    assert!(!misplaced.exists());
    assert!(kept.exists());
}

// ---- the committed v1 fixture ----

const FIXTURE_TIME: u64 = 1_750_000_000;

/// One fixture entry: url, vary values, tags, body.
type FixtureEntry = (
    &'static str,
    Vec<(String, Option<String>)>,
    Vec<&'static str>,
    Vec<u8>,
);

fn fixture_entries() -> Vec<FixtureEntry> {
    vec![
        (
            "http://fixture.test/inline?q=1",
            vec![],
            vec!["fixture", "inline"],
            b"inline body v1".to_vec(),
        ),
        (
            "http://fixture.test/file",
            vary("accept-encoding", Some("gzip")),
            vec!["fixture"],
            body(1000, 42),
        ),
        (
            "http://fixture.test/file",
            vary("accept-encoding", None),
            vec![],
            body(1000, 42),
        ),
    ]
}

fn fixture_entry(url: &str, vary: &[(String, Option<String>)], tags: &[&str]) -> Entry {
    let mut e = entry(url, tags);
    e.vary = vary.to_vec();
    e.stored_at = at(FIXTURE_TIME);
    e.freshness.request_time = at(FIXTURE_TIME);
    e.freshness.response_time = at(FIXTURE_TIME) + Duration::from_millis(250);
    e.headers.push("x-raw", vec![0xff, 0x00]);
    e
}

/// Writes the v1 fixture store into $LARDER_FIXTURE_OUT (run by hand when a schema version ships:
/// `LARDER_FIXTURE_OUT=tests/fixtures/store-v1 cargo test --test it write_v1_fixture -- --ignored`).
/// Since schema v2 this writes the *current* version: it made the committed v1 fixture with v1
/// code, and would make a v2 fixture now (name it store-v2 when a v3 needs one).
#[tokio::test]
#[ignore]
async fn write_v1_fixture() {
    let Some(out) = std::env::var_os("LARDER_FIXTURE_OUT") else {
        return;
    };
    let out = PathBuf::from(out);
    assert!(!out.exists(), "{} exists; remove it first", out.display());
    // A small inline limit keeps the fixture's one body file small.
    let opts = StoreOptions {
        inline_max: 64,
        ..StoreOptions::default()
    };
    let store = Store::open(&out, opts).unwrap();
    for (url, vary, tags, b) in fixture_entries() {
        let p = PrimaryKey::from_url(url).unwrap();
        put(
            &store,
            VariantKey::new(&p, &vary),
            fixture_entry(url, &vary, &tags),
            &b,
        )
        .await;
    }
    store.flush().await.unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for item in std::fs::read_dir(from).unwrap() {
        let item = item.unwrap();
        let dest = to.join(item.file_name());
        if item.file_type().unwrap().is_dir() {
            copy_dir(&item.path(), &dest);
        } else {
            std::fs::copy(item.path(), dest).unwrap();
        }
    }
}

#[tokio::test]
async fn the_v1_fixture_opens_and_every_entry_reads() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture, dir.path());
    let store = open(dir.path());
    let expected = fixture_entries();
    let expected_len = expected.len() as u64;
    assert_eq!(store.stats().entries, expected_len);
    assert_eq!(
        store.stats().body_files,
        1,
        "the two file bodies are shared"
    );
    for (url, vary, tags, b) in expected {
        let p = PrimaryKey::from_url(url).unwrap();
        let k = VariantKey::new(&p, &vary);
        let got = store
            .get(&k)
            .unwrap()
            .unwrap_or_else(|| panic!("{url} {vary:?} missing"));
        let mut want = fixture_entry(url, &vary, &tags);
        want.body = got.body.clone();
        assert_eq!(got, want);
        assert_eq!(got.body.len, b.len() as u64);
        assert_eq!(got.body.inline.is_some(), b.len() <= 64);
        assert_eq!(store.read_body_to_vec(&k, &got).await.unwrap(), b);
    }
    assert_eq!(store.entries(None, Some("fixture")).count(), 2);
    assert_eq!(
        store
            .variants(&PrimaryKey::from_url("http://fixture.test/file").unwrap())
            .unwrap()
            .len(),
        2
    );
    // The v1 → v2 upgrade seeded the access order and the size counter: eviction reaches
    // every old entry, and usage covers their records.
    assert!(store.stats().record_bytes > 0);
    assert_eq!(store.evict_to(0).unwrap(), expected_len);
    assert_eq!(store.stats().entries, 0);
    assert_eq!(store.usage(), 0);
}

// ---- crash: kill -9 a writer, reopen, verify ----

const CRASH_DIR_ENV: &str = "LARDER_CRASH_CHILD_DIR";

/// A tiny xorshift generator: tests need varied sizes and delays, not a dependency.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng(nanos ^ (u64::from(std::process::id()) << 32) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The writer the crash test kills: stores, replaces, removes and purges in a loop until killed.
/// Each entry records the seed of its body in a header, so the parent can check content too.
#[tokio::test]
#[ignore]
async fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
        return;
    };
    let store = Store::open(
        Path::new(&dir),
        StoreOptions {
            flush_every_ms: Some(20),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let mut rng = Rng::seeded();
    for i in 0u64.. {
        let url = format!("http://crash.test/{}", rng.below(40));
        let (p, k) = key(&url);
        match i % 25 {
            7 => {
                store.remove(&k).unwrap();
            }
            19 => {
                store
                    .purge_prefix("http://crash.test/1", rng.below(2) == 0, at(0))
                    .unwrap();
            }
            _ => {
                // A few shared seeds so that bodies are deduplicated and released.
                let seed = rng.below(12) as u8;
                let len = [10, 5_000, 20_000, 70_000, 200_000][rng.below(5) as usize];
                let mut e = entry(p.url(), &["crash"]);
                e.headers.push("x-seed", seed.to_string());
                e.headers.push("x-len", len.to_string());
                let mut w = store.begin_write(k, e);
                w.write(&body(len, seed)).await.unwrap();
                match w.commit(Some(len as u64)).await {
                    Ok(_) | Err(StoreError::Superseded) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
}

#[tokio::test]
async fn entries_survive_kill_9_with_verified_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::seeded();
    let mut seen = 0;
    for round in 0..10 {
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "store::crash_child",
                "--test-threads=1",
            ])
            .env(CRASH_DIR_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(250 + rng.below(500)));
        assert!(
            child.try_wait().unwrap().is_none(),
            "round {round}: the writer died on its own"
        );
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();

        let store = open(dir.path());
        if let Some(aside) = store.quarantined() {
            eprintln!(
                "round {round}: sled reported corruption; moved to {}",
                aside.display()
            );
        }
        assert_eq!(temp_files(dir.path()), 0, "temp files are cleared at open");
        let mut count = 0;
        for item in store.entries(None, None) {
            let (k, e) = item.unwrap();
            let seed: u8 = e.headers.get_str("x-seed").unwrap().parse().unwrap();
            let len: usize = e.headers.get_str("x-len").unwrap().parse().unwrap();
            let got = store.read_body_to_vec(&k, &e).await.unwrap_or_else(|err| {
                panic!(
                    "round {round}: {} does not verify after kill -9: {err}",
                    e.url
                )
            });
            assert_eq!(got, body(len, seed), "round {round}: {}", e.url);
            count += 1;
        }
        assert_eq!(
            store.stats().entries,
            count,
            "round {round}: counters agree with the records"
        );
        eprintln!("round {round}: {count} entries verified");
        seen += count;
    }
    assert!(seen > 0, "the writer never got an entry to disk");
}

// The access order survives a restart: an entry used before a graceful close is still the
// most recently used after reopening, so eviction takes the others first.
#[tokio::test]
async fn access_order_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<VariantKey> = (0..3).map(|i| key(&format!("http://x/o{i}")).1).collect();
    {
        let store = open(dir.path());
        for (i, k) in keys.iter().enumerate() {
            let url = format!("http://x/o{i}");
            put(&store, *k, entry(&url, &[]), b"body").await;
        }
        // o0 was stored first but used last.
        store.touch(&keys[0], at(2_000_000));
    }
    let store = open(dir.path());
    let usage = store.usage();
    // Evict down to about one entry: the two least recently used go, o0 stays.
    store.evict_to(usage / 3).unwrap();
    assert!(
        store.get(&keys[0]).unwrap().is_some(),
        "the recently used entry was evicted"
    );
    assert!(store.get(&keys[1]).unwrap().is_none());
    assert!(store.get(&keys[2]).unwrap().is_none());
}
