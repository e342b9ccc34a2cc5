//! Bounded disk use: eviction under max_size keeps the hot set, expiry sweeping, orphan collection, oversized objects, and disk errors that cost the cache but never the response.

use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use larder::key::{PrimaryKey, VariantKey};
use larder::policy::{Freshness, HeaderList};
use larder::store::{BodyInfo, Entry, Store, StoreOptions};

use crate::support::*;

/// Bytes of every file under `dir` (what `du` would count, without block rounding).
fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(items) = std::fs::read_dir(&d) else {
            continue;
        };
        for item in items.flatten() {
            let Ok(meta) = item.metadata() else { continue };
            if meta.is_dir() {
                stack.push(item.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

fn body_for(path: &str, size: usize) -> Bytes {
    let seed = path
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    Bytes::from(
        (0..size as u32)
            .map(|i| (i.wrapping_mul(seed) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
}

async fn stats(proxy: &TestProxy) -> serde_json::Value {
    let r = get(&format!("http://{}/stats", proxy.admin_addr), &[]).await;
    serde_json::from_slice(&r.body).unwrap()
}

const MAX: u64 = 10 << 20;
/// On top of max_size (which bounds records + body files): the object being written, body
/// files released but not yet unlinked (they go after the next store flush, ≤ 500 ms), and
/// sled's log. Measured here: peak 10.8 MB for a 10.49 MB bound.
const SLACK: u64 = 2 << 20;
/// Once settled (nothing being written, released files unlinked) only sled's log comes on top
/// of usage: a few segments of 512 KiB, measured 0.25 to 1.5 MB here (40 records, more on a
/// loaded machine); usage itself ends anywhere between the low-water mark and max_size.
const SETTLED_SLACK: u64 = 2 << 20;

// With max_size = 10 MiB and 30 MiB of distinct cacheable responses, the data dir stays within
// max_size plus sled's slack, the recently used entry survives, and the oldest cold ones go.
#[actix_web::test]
async fn eviction_keeps_disk_use_under_max_size_and_keeps_the_hot_set() {
    let origin = TestOrigin::start().await;
    const SIZE: usize = 256 << 10;
    for i in 0..120 {
        let path = format!("/obj/{i}");
        origin.fixed(
            &path,
            Reply::ok(body_for(&path, SIZE)).header("cache-control", "max-age=3600"),
        );
    }
    origin.fixed(
        "/hot",
        Reply::ok(body_for("/hot", SIZE)).header("cache-control", "max-age=3600"),
    );
    let proxy = TestProxy::start_with(&origin, "[storage]\nmax_size = \"10MiB\"\n").await;

    get(&proxy.url("/hot"), &[]).await;
    let mut peak = 0;
    for i in 0..120 {
        let got = get(&proxy.url(&format!("/obj/{i}")), &[]).await;
        assert_eq!(got.body.len(), SIZE);
        // The hot object is used all along.
        if i % 10 == 0 {
            let hot = get(&proxy.url("/hot"), &[]).await;
            assert!(hot.body == body_for("/hot", SIZE));
        }
        peak = peak.max(disk_use(proxy.dir.path()));
    }
    // Released body files are unlinked after the next store flush (every 500 ms; later on a
    // loaded machine).
    // And the last commits' eviction may still be under way.
    let usage_now = || async { stats(&proxy).await["usage_bytes"].as_u64().unwrap() };
    let mut settled = disk_use(proxy.dir.path());
    for _ in 0..50 {
        let usage = usage_now().await;
        if usage <= MAX && settled <= usage + SETTLED_SLACK {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        settled = disk_use(proxy.dir.path());
    }
    assert!(peak <= MAX + SLACK, "data dir peaked at {peak} bytes");
    assert!(
        settled <= MAX + SETTLED_SLACK,
        "data dir holds {settled} bytes once settled"
    );
    let s = stats(&proxy).await;
    let field = |name: &str| s[name].as_u64().unwrap();
    let usage = field("usage_bytes");
    assert_eq!(
        usage,
        field("record_bytes")
            + field("index_bytes")
            + field("body_file_bytes")
            + field("quarantined_bytes"),
        "{s}"
    );
    assert!(usage <= MAX, "store usage {usage} over max_size");
    // The data dir holds what usage counts, plus at most sled's log slack.
    assert!(
        settled >= usage && settled <= usage + SETTLED_SLACK,
        "data dir {settled} B (sled {} B, bodies {} B) vs {s}",
        disk_use(&proxy.dir.path().join("db")),
        disk_use(&proxy.dir.path().join("bodies"))
    );
    assert!(s["evictions"].as_u64().unwrap() >= 80, "{s}");
    eprintln!("eviction: peak data dir {peak} B, settled {settled} B, usage {usage} B, stats {s}");

    let hot = get(&proxy.url("/hot"), &[]).await;
    assert!(
        hot.cache_status().starts_with("larder; hit"),
        "hot entry evicted: {}",
        hot.cache_status()
    );
    let recent = get(&proxy.url("/obj/119"), &[]).await;
    assert!(
        recent.cache_status().starts_with("larder; hit"),
        "{}",
        recent.cache_status()
    );
    let cold = get(&proxy.url("/obj/0"), &[]).await;
    assert!(
        cold.cache_status().contains("fwd=miss"),
        "cold entry kept: {}",
        cold.cache_status()
    );
    assert!(cold.body == body_for("/obj/0", SIZE));
}

// Entries past every stale window disappear after the sweep interval; those with validators
// stay for keep_revalidatable so they can still be revalidated.
#[actix_web::test]
async fn expired_entries_are_swept() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/short",
        Reply::ok("short").header("cache-control", "max-age=5"),
    );
    origin.fixed(
        "/etagged",
        Reply::ok("etagged")
            .header("cache-control", "max-age=5")
            .header("etag", "\"e\""),
    );
    origin.fixed(
        "/long",
        Reply::ok("long").header("cache-control", "max-age=3600"),
    );
    let proxy = TestProxy::start_with(
        &origin,
        "[storage]\nsweep_interval = \"100ms\"\nkeep_revalidatable = \"1h\"\n",
    )
    .await;
    for p in ["/short", "/etagged", "/long"] {
        get(&proxy.url(p), &[]).await;
    }
    assert_eq!(stats(&proxy).await["entries"], 3);
    proxy.advance(Duration::from_secs(60));
    let mut entries = 3;
    for _ in 0..50 {
        entries = stats(&proxy).await["entries"].as_u64().unwrap();
        if entries == 2 {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        entries, 2,
        "the dead entry without validators was not swept"
    );
    // Past the keep time the revalidatable one goes too.
    proxy.advance(Duration::from_secs(2 * 3600));
    for _ in 0..50 {
        entries = stats(&proxy).await["entries"].as_u64().unwrap();
        if entries == 0 {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(entries, 0);
}

// A body file no entry references (a crash between rename and commit) is removed after start.
#[actix_web::test]
async fn orphan_body_files_are_removed_after_start() {
    let origin = TestOrigin::start().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let orphan_dir = dir.path().join("bodies").join("ab").join("cd");
    std::fs::create_dir_all(&orphan_dir).unwrap();
    let orphan = orphan_dir.join(format!("abcd{}", "0".repeat(60)));
    std::fs::write(&orphan, vec![1u8; 50_000]).unwrap();
    let _proxy = TestProxy::start_in(&origin, "", dir.clone()).await;
    for _ in 0..100 {
        if !orphan.exists() {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!orphan.exists(), "orphan body file survived");
}

// Objects above [storage] max_object_size stream through uncached.
#[actix_web::test]
async fn objects_over_max_object_size_pass_through() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/huge",
        Reply::ok(body_for("/huge", 300_000)).header("cache-control", "max-age=600"),
    );
    let proxy = TestProxy::start_with(&origin, "[storage]\nmax_object_size = \"200KiB\"\n").await;
    for _ in 0..2 {
        let r = get(&proxy.url("/huge"), &[]).await;
        assert!(r.body == body_for("/huge", 300_000));
        assert!(
            r.cache_status().contains("detail=too-large"),
            "{}",
            r.cache_status()
        );
    }
    assert_eq!(origin.hits("/huge"), 2);
}

// A disk that refuses writes costs the cache entry, never the response: the client gets its
// 200, the error is counted, and the server keeps serving.
#[actix_web::test]
async fn store_write_errors_still_serve_the_client() {
    let origin = TestOrigin::start().await;
    let body = body_for("/disk", 100_000);
    origin.fixed(
        "/disk",
        Reply::ok(body.clone()).header("cache-control", "max-age=600"),
    );
    origin.fixed(
        "/small",
        Reply::ok("small").header("cache-control", "max-age=600"),
    );
    let proxy = TestProxy::start(&origin).await;
    // Root ignores permission bits, so break the temp dir itself: body files cannot be created.
    let tmp = proxy.dir.path().join("bodies").join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();

    for _ in 0..2 {
        let r = get(&proxy.url("/disk"), &[]).await;
        assert_eq!(r.status, 200);
        assert!(r.body == body, "client got damaged bytes");
    }
    assert_eq!(origin.hits("/disk"), 2, "nothing could have been stored");
    // Small bodies live in the index and are still cached; the process is up.
    get(&proxy.url("/small"), &[]).await;
    assert!(
        get(&proxy.url("/small"), &[])
            .await
            .cache_status()
            .starts_with("larder; hit")
    );
    let metrics = get(&format!("http://{}/metrics", proxy.admin_addr), &[])
        .await
        .text();
    let errors: u64 = metrics
        .lines()
        .find(|l| l.starts_with("larder_store_write_errors_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(errors >= 2, "{metrics}");
}

fn small_entry(url: &str) -> Entry {
    let now = SystemTime::now();
    let mut headers = HeaderList::new();
    headers.push("content-type", "text/plain");
    headers.push("cache-control", "max-age=86400");
    Entry {
        url: url.to_string(),
        status: 200,
        headers,
        vary: Vec::new(),
        freshness: Freshness {
            request_time: now,
            response_time: now,
            corrected_initial_age: Duration::ZERO,
            lifetime: Duration::from_secs(86_400),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
            no_cache: false,
        },
        tags: vec!["small".into()],
        stored_at: now,
        body: BodyInfo::default(),
    }
}

/// A data dir of only small entries (inline in sled) is bounded too: usage counts each entry's
/// record, keys and index rows with sled's per-row cost. What comes on top is sled's log: old
/// versions of the leaves it rewrote, kept until it cleans their segment (512 KiB each), and a
/// floor of a few segments. Measured here (1 MiB bound, 3000 entries of 200 B, about 8 times
/// the bound): the data dir peaks at about 3 MiB. In a longer run (20 MB bound, 100 000
/// entries) sled held 2 to 3 times the bound. Stated slack for a cache of only small entries:
/// 2 × max_size + 1 MiB on top of max_size. Counting record values alone (before) let a 2 MB
/// bound reach 20 times that.
#[actix_web::test]
async fn small_entries_stay_within_max_size() {
    const SMALL_MAX: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            max_size: Some(SMALL_MAX),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let mut peak = 0;
    for i in 0..3000u32 {
        let p = PrimaryKey::new("http", "small.example", &format!("/item/{i}"));
        let mut w = store.begin_write(VariantKey::new(&p, &[]), small_entry(p.url()));
        w.write(&[b's'; 200]).await.unwrap();
        w.commit(Some(200)).await.unwrap();
        if i % 200 == 0 {
            peak = peak.max(disk_use(dir.path()));
        }
    }
    store.flush().await.unwrap();
    actix_web::rt::time::sleep(Duration::from_millis(700)).await;
    let settled = disk_use(dir.path());
    peak = peak.max(settled);
    let s = store.stats();
    eprintln!(
        "small entries: {} live of 3000, usage {} B (records {}, index {}), data dir peak {peak} B, settled {settled} B",
        s.entries, s.usage_bytes, s.record_bytes, s.index_bytes
    );
    assert!(s.usage_bytes <= SMALL_MAX, "{s:?}");
    assert!(s.evictions > 2000, "the bound was exercised: {s:?}");
    assert!(
        s.index_bytes > s.record_bytes,
        "index rows outweigh 200 B records: {s:?}"
    );
    assert!(
        peak <= 3 * SMALL_MAX + (1 << 20),
        "data dir peaked at {peak} B for a {SMALL_MAX} B bound"
    );
    assert!(settled >= s.usage_bytes / 2, "usage is not an overestimate");
    // `larder dump --format table` ends with the totals of what it listed.
    drop(store);
    let dir_arg = dir.path().display().to_string();
    let (code, out, err) = run_binary(&[
        "dump",
        "--data-dir",
        &dir_arg,
        "--format",
        "table",
        "--offline",
    ]);
    assert_eq!(code, 0, "{err}");
    let want = format!("TOTAL {} entries, {} bytes", s.entries, s.body_bytes);
    assert_eq!(out.lines().last(), Some(want.as_str()));
    assert_eq!(out.lines().count() as u64, s.entries + 2);
}

// TinyLFU admission (store/admission.rs): an object used several times stays cached through a
// scan of one-hit URLs three times max_size; under plain LRU the scan would flush it.
#[actix_web::test]
async fn a_scan_of_one_hit_urls_does_not_evict_the_hot_set() {
    let origin = TestOrigin::start().await;
    const SIZE: usize = 40 << 10;
    origin.route_prefix("/", |req, _| {
        Reply::ok(body_for(&req.path, SIZE)).header("cache-control", "max-age=3600")
    });
    let proxy = TestProxy::start_with(&origin, "[storage]\nmax_size = \"1MiB\"\n").await;
    let hot: Vec<String> = (0..4).map(|i| format!("/hot/{i}")).collect();
    for _ in 0..4 {
        for path in &hot {
            get(&proxy.url(path), &[]).await;
        }
    }
    for i in 0..75 {
        let path = format!("/scan/{i}");
        let got = get(&proxy.url(&path), &[]).await;
        assert!(got.status == 200 && got.body == body_for(&path, SIZE));
    }
    let s = stats(&proxy).await;
    assert!(
        s["evictions"].as_u64().unwrap() + s["rejected"].as_u64().unwrap() >= 50,
        "the scan did not fill the cache: {s}"
    );
    assert!(s["usage_bytes"].as_u64().unwrap() <= 1 << 20, "{s}");
    for path in &hot {
        let r = get(&proxy.url(path), &[("cache-control", "only-if-cached")]).await;
        assert_eq!(r.status, 200, "{path} was evicted by the scan: {s}");
        assert!(r.body == body_for(path, SIZE));
    }
    for path in &hot {
        assert_eq!(origin.hits(path), 1, "{path} fetched again");
    }
    eprintln!("hot set after a scan: {s}");
}

/// Unmounts (lazily) on drop, so a failing test does not leave its tmpfs behind.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

// A really full disk (ENOSPC from a 4 MiB tmpfs under a max_size far above it) costs cache
// entries, never responses: every client gets its 200 with the right bytes, the failures are
// counted, and the server keeps serving. Needs root to mount the tmpfs; without it the test
// says so and passes (the store-dir-is-a-file test above still runs).
#[actix_web::test]
async fn a_full_disk_still_serves_every_client() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .status();
    if !mount.is_ok_and(|s| s.success()) {
        eprintln!(
            "a_full_disk_still_serves_every_client: skipped, cannot mount a tmpfs (not root)"
        );
        return;
    }
    let _mounted = Mounted(dir.path().to_path_buf());
    let origin = TestOrigin::start().await;
    const SIZE: usize = 300 << 10;
    origin.route_prefix("/full/", |req, _| {
        Reply::ok(body_for(&req.path, SIZE)).header("cache-control", "max-age=3600")
    });
    origin.route_prefix("/tiny/", |req, _| {
        Reply::ok(body_for(&req.path, 2000)).header("cache-control", "max-age=3600")
    });
    let proxy = TestProxy::start_in(
        &origin,
        "[storage]\nmax_size = \"1GiB\"\nmax_object_size = \"1MiB\"\n",
        dir.clone(),
    )
    .await;
    // 30 × 300 KiB: more than twice what the file system holds.
    for i in 0..30 {
        let path = format!("/full/{i}");
        let r = get(&proxy.url(&path), &[]).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.body == body_for(&path, SIZE), "{path}: wrong bytes");
    }
    let write_errors = || async {
        let metrics = get(&format!("http://{}/metrics", proxy.admin_addr), &[])
            .await
            .text();
        metrics
            .lines()
            .find(|l| l.starts_with("larder_store_write_errors_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    let file_errors = write_errors().await;
    assert!(file_errors > 0, "the disk never filled");
    // Small bodies go inline into sled's log, which is on the same full disk.
    for i in 0..300 {
        let path = format!("/tiny/{i}");
        let r = get(&proxy.url(&path), &[]).await;
        assert!(r.status == 200 && r.body == body_for(&path, 2000), "{path}");
    }
    // Still serving: what was stored before the disk filled is a hit, the rest pass through.
    let first = get(&proxy.url("/full/0"), &[]).await;
    assert_eq!(first.status, 200);
    assert!(first.body == body_for("/full/0", SIZE));
    let again = get(&proxy.url("/full/29"), &[]).await;
    assert!(again.status == 200 && again.body == body_for("/full/29", SIZE));
    let s = stats(&proxy).await;
    let errors = write_errors().await;
    assert!(
        errors > file_errors,
        "sled's own writes failed too, and were survived"
    );
    eprintln!(
        "full disk: {file_errors} write errors with body files, {errors} after small bodies, first entry {}, stats {s}",
        first.cache_status()
    );
    proxy.stop().await;
}

// The counters are reconciled in the background after start: drift forged on disk (a wrong
// entry count, and a record that no longer decodes, whose body file reference leaked) is set
// right with no request waiting for it, and the leaked body file is deleted.
#[actix_web::test]
async fn drifted_counters_are_reconciled_after_start() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let key_of = |path: &str| VariantKey::new(&PrimaryKey::new("http", "cache.example", path), &[]);
    let leaked = body_for("/leak", 100_000);
    {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        for (path, body) in [("/keep", &b"kept"[..]), ("/leak", &leaked[..])] {
            let p = PrimaryKey::new("http", "cache.example", path);
            let mut w = store.begin_write(key_of(path), small_entry(p.url()));
            w.write(body).await.unwrap();
            w.commit(None).await.unwrap();
        }
    }
    {
        // The layout is in migrations/0001-initial.md.
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert("stat.entries", &1000u64.to_be_bytes()[..])
            .unwrap();
        let entries = db.open_tree("entries").unwrap();
        entries
            .insert(key_of("/leak").as_bytes(), &[9u8, 9, 9][..])
            .unwrap();
        db.flush().unwrap();
    }
    let hex = blake3::hash(&leaked).to_hex();
    let file = dir
        .path()
        .join("bodies")
        .join(&hex[..2])
        .join(&hex[2..4])
        .join(hex.as_str());
    assert!(file.exists());
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::start_in(&origin, "", dir.clone()).await;
    let mut s = stats(&proxy).await;
    for _ in 0..100 {
        if s["entries"] == 1 && s["body_files"] == 0 && !file.exists() {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        s = stats(&proxy).await;
    }
    assert_eq!(s["entries"], 1, "{s}");
    assert_eq!(s["body_files"], 0, "{s}");
    assert_eq!(s["body_file_bytes"], 0, "{s}");
    assert!(!file.exists(), "the leaked body file is still there");
    let kept = get(
        &proxy.url("/keep"),
        &[
            ("host", "cache.example"),
            ("cache-control", "only-if-cached"),
        ],
    )
    .await;
    assert_eq!(kept.text(), "kept");
}
