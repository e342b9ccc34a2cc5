//! Store benchmarks: put and get (with the full body read) of 1 KiB and 256 KiB bodies, the
//! inline-vs-file trade-off at 16/32/64 KiB, and (behind LARDER_BENCH_WARM=N) a warm start:
//! fill N small entries, close, then time reopen + the first successful get.
//!
//! Quick run:  cargo bench --bench store
//! Warm start: LARDER_BENCH_WARM=1000000 cargo bench --bench store -- warm

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

use criterion::{BenchmarkId, Criterion, Throughput};
use larder::key::{PrimaryKey, VariantKey};
use larder::policy::{Freshness, HeaderList};
use larder::store::{BodyInfo, Entry, Store, StoreOptions};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn entry(url: &str) -> Entry {
    let t = UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    Entry {
        url: url.to_string(),
        status: 200,
        headers: [
            ("content-type", "text/html; charset=utf-8"),
            ("etag", "\"5f3a-1b2c3d\""),
            ("cache-control", "public, max-age=300"),
            ("date", "Sun, 15 Jun 2025 12:00:00 GMT"),
        ]
        .into_iter()
        .collect::<HeaderList>(),
        vary: vec![("accept-encoding".into(), Some("gzip".into()))],
        freshness: Freshness {
            request_time: t,
            response_time: t,
            corrected_initial_age: Duration::ZERO,
            lifetime: Duration::from_secs(300),
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
            no_cache: false,
        },
        tags: vec!["bench".into()],
        stored_at: t,
        body: BodyInfo::default(),
    }
}

fn key(i: u64) -> (String, VariantKey) {
    let p = PrimaryKey::new("http", "bench.test", &format!("/item/{i}"));
    let k = VariantKey::new(&p, &[("accept-encoding".into(), Some("gzip".into()))]);
    (p.url().to_string(), k)
}

/// A body whose first bytes carry `i`, so consecutive puts are distinct contents.
fn body(len: usize, i: u64) -> Vec<u8> {
    let mut b: Vec<u8> = (0..len).map(|j| (j % 251) as u8).collect();
    let n = len.min(8);
    b[..n].copy_from_slice(&i.to_le_bytes()[..n]);
    b
}

async fn put(store: &Store, i: u64, body: &[u8]) {
    let (url, k) = key(i);
    let mut w = store.begin_write(k, entry(&url));
    for chunk in body.chunks(64 * 1024) {
        w.write(chunk).await.unwrap();
    }
    w.commit(Some(body.len() as u64)).await.unwrap();
}

async fn get(store: &Store, i: u64) -> usize {
    let (_, k) = key(i);
    let e = store.get(&k).unwrap().expect("entry present");
    store.read_body_to_vec(&k, &e).await.unwrap().len()
}

fn open(dir: &Path, inline_max: usize) -> Store {
    Store::open(
        dir,
        StoreOptions {
            inline_max,
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

/// Live keys per benchmark: puts cycle over them, so the store stays a bounded size.
const KEYS: u64 = 256;

fn put_get(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("store");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for size in [1024usize, 256 * 1024] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), StoreOptions::default().inline_max);
        group.throughput(Throughput::Bytes(size as u64));
        let mut i = 0u64;
        group.bench_with_input(BenchmarkId::new("put", size), &size, |b, &size| {
            b.iter(|| {
                i += 1;
                rt.block_on(put(&store, i % KEYS, &body(size, i)));
            })
        });
        for j in 0..KEYS {
            rt.block_on(put(&store, j, &body(size, j)));
        }
        let mut j = 0u64;
        group.bench_with_input(BenchmarkId::new("get", size), &size, |b, _| {
            b.iter(|| {
                j += 1;
                black_box(rt.block_on(get(&store, j % KEYS)))
            })
        });
    }
    group.finish();
}

/// The same sizes stored inline (inline_max = size) and as files (inline_max = size - 1).
fn inline_threshold(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("threshold");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(2));
    for size in [16 * 1024usize, 32 * 1024, 64 * 1024] {
        for (how, inline_max) in [("inline", size), ("file", size - 1)] {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path(), inline_max);
            let mut i = 0u64;
            group.bench_with_input(
                BenchmarkId::new(format!("put-{how}"), size),
                &size,
                |b, &size| {
                    b.iter(|| {
                        i += 1;
                        rt.block_on(put(&store, i % KEYS, &body(size, i)));
                    })
                },
            );
            for j in 0..KEYS {
                rt.block_on(put(&store, j, &body(size, j)));
            }
            let mut j = 0u64;
            group.bench_with_input(
                BenchmarkId::new(format!("get-{how}"), size),
                &size,
                |b, _| {
                    b.iter(|| {
                        j += 1;
                        black_box(rt.block_on(get(&store, j % KEYS)))
                    })
                },
            );
            rt.block_on(store.flush()).unwrap();
            eprintln!(
                "threshold {how} {size}: sled dir {} KiB, bodies dir {} KiB for {KEYS} entries",
                du(&dir.path().join("db")) / 1024,
                du(&dir.path().join("bodies")) / 1024
            );
        }
    }
    group.finish();
}

/// Bytes used by the files under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(items) = std::fs::read_dir(dir) {
        for item in items.flatten() {
            let path = item.path();
            if path.is_dir() {
                total += du(&path);
            } else if let Ok(m) = item.metadata() {
                total += m.len();
            }
        }
    }
    total
}

/// Fill `n` small entries, close, then time reopen + the first successful get (the promise:
/// a hit within a second of start with a million entries).
fn warm_start(n: u64) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let small = body(200, 0);
    let fill = Instant::now();
    {
        let store = open(dir.path(), StoreOptions::default().inline_max);
        for i in 0..n {
            rt.block_on(put(&store, i, &small));
            if i % 100_000 == 99_999 {
                eprintln!("warm: {} entries in {:.1?}", i + 1, fill.elapsed());
            }
        }
        rt.block_on(store.flush()).unwrap();
        eprintln!("warm: filled {n} entries in {:.1?}", fill.elapsed());
        let close = Instant::now();
        drop(store);
        eprintln!("warm: close (flush + snapshot) {:.1?}", close.elapsed());
    }
    eprintln!(
        "warm: {n} entries took {:.1?} with close; sled dir {} MiB",
        fill.elapsed(),
        du(&dir.path().join("db")) >> 20
    );
    // A key from the middle of the key space, so it is not the hot end of any tree.
    let probe = n / 2;
    let start = Instant::now();
    let store = open(dir.path(), StoreOptions::default().inline_max);
    let opened = start.elapsed();
    let len = rt.block_on(get(&store, probe));
    let first_get = start.elapsed();
    assert_eq!(len, small.len());
    let stats_at = Instant::now();
    let entries = store.stats().entries;
    eprintln!(
        "warm: reopen {opened:.1?}, reopen + first get {first_get:.1?} (stats {entries} entries in {:.1?})",
        stats_at.elapsed(),
    );
    println!(
        "warm_start_reopen_plus_first_get_ms {}",
        first_get.as_secs_f64() * 1000.0
    );
    let ok = first_get < Duration::from_secs(1);
    println!(
        "{}: {n} entries: reopen + first get {:.0} ms {} 1000 ms",
        if ok { "PASS" } else { "FAIL" },
        first_get.as_secs_f64() * 1000.0,
        if ok { "<" } else { ">=" }
    );
    drop(store);
    // Again (the close above wrote another snapshot).
    let start = Instant::now();
    let store = open(dir.path(), StoreOptions::default().inline_max);
    let len = rt.block_on(get(&store, probe + 1));
    eprintln!("warm: second reopen + first get {:.1?}", start.elapsed());
    assert_eq!(len, small.len());
}

fn main() {
    if let Some(n) = std::env::var("LARDER_BENCH_WARM")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        warm_start(n);
    }
    let mut c = Criterion::default().configure_from_args();
    put_get(&mut c);
    inline_threshold(&mut c);
    c.final_summary();
}
