//! Bounded disk use: eviction under max_size keeps the hot set, expiry sweeping, orphan collection, oversized objects, and disk errors that cost the cache but never the response.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

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
    // Released body files are unlinked after the next store flush (500 ms).
    actix_web::rt::time::sleep(Duration::from_millis(1200)).await;
    let settled = disk_use(proxy.dir.path());
    assert!(peak <= MAX + SLACK, "data dir peaked at {peak} bytes");
    assert!(
        settled <= MAX,
        "data dir holds {settled} bytes once settled"
    );
    let s = stats(&proxy).await;
    let usage = s["record_bytes"].as_u64().unwrap() + s["body_file_bytes"].as_u64().unwrap();
    assert!(usage <= MAX, "store usage {usage} over max_size");
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
