//! Range-read benchmark: the time to serve the last 64 KiB of a stored body through
//! `Store::open_body_range` (open + read), for bodies of several sizes, to show it does not
//! grow with the object once the file has been verified (the first read hashes it whole).
//!
//! Run:  cargo bench --bench range                 (64 MiB and 1 GiB, 200 reads each)
//!       cargo bench --bench range -- 16,256 50    (sizes in MiB, reads per size)
//! The store goes in a temp dir under $LARDER_BENCH_DIR (default: the system temp dir).

use std::time::{Duration, Instant, UNIX_EPOCH};

use futures_util::StreamExt;
use larder::key::{PrimaryKey, VariantKey};
use larder::policy::{Freshness, HeaderList};
use larder::store::{BodyInfo, Entry, Store, StoreOptions};

const TAIL: u64 = 64 * 1024;

fn entry(url: &str) -> Entry {
    let t = UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    Entry {
        url: url.to_string(),
        status: 200,
        headers: [("content-type", "application/octet-stream")]
            .into_iter()
            .collect::<HeaderList>(),
        vary: Vec::new(),
        freshness: Freshness {
            request_time: t,
            response_time: t,
            corrected_initial_age: Duration::ZERO,
            lifetime: Duration::from_secs(300),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
            no_cache: false,
        },
        tags: Vec::new(),
        stored_at: t,
        body: BodyInfo::default(),
    }
}

/// Writes a `mib` MiB body through the store's writer, 1 MiB at a time.
async fn put(store: &Store, mib: u64) -> (VariantKey, Entry) {
    let p = PrimaryKey::new("http", "bench.test", &format!("/object/{mib}"));
    let k = VariantKey::new(&p, &[]);
    let mut w = store.begin_write(k, entry(p.url()));
    let mut chunk: Vec<u8> = (0..1 << 20).map(|j: u32| (j % 251) as u8).collect();
    for i in 0..mib {
        chunk[..8].copy_from_slice(&(i ^ (mib << 32)).to_le_bytes());
        w.write(&chunk).await.unwrap();
    }
    let e = w.commit(Some(mib << 20)).await.unwrap();
    (k, e)
}

async fn read_tail(store: &Store, k: &VariantKey, e: &Entry) -> Duration {
    let started = Instant::now();
    let mut s = store
        .open_body_range(k, e, e.body.len - TAIL, TAIL)
        .await
        .unwrap();
    let mut n = 0;
    while let Some(c) = s.next().await {
        n += c.unwrap().len() as u64;
    }
    assert_eq!(n, TAIL);
    started.elapsed()
}

fn main() {
    // `cargo bench` passes `--bench`; skip flags.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let sizes: Vec<u64> = args
        .first()
        .map_or("64,1024", String::as_str)
        .split(',')
        .map(|s| s.trim().parse().expect("sizes in MiB, comma-separated"))
        .collect();
    let reps: usize = args
        .get(1)
        .map_or(200, |s| s.parse().expect("reads per size"));
    let base = std::env::var_os("LARDER_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        println!("last 64 KiB via Store::open_body_range (open + read), {reps} reads per size");
        println!(
            "{:>9} {:>10} {:>14} {:>10} {:>10} {:>10}",
            "size", "write", "first(verify)", "median", "p90", "max"
        );
        for mib in sizes {
            let t = Instant::now();
            let (k, e) = put(&store, mib).await;
            let write = t.elapsed();
            let first = read_tail(&store, &k, &e).await;
            let mut times = Vec::with_capacity(reps);
            for _ in 0..reps {
                times.push(read_tail(&store, &k, &e).await);
            }
            times.sort();
            let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
            println!(
                "{:>6}MiB {:>9.2}s {:>13.1}ms {:>8.1}µs {:>8.1}µs {:>8.1}µs",
                mib,
                write.as_secs_f64(),
                first.as_secs_f64() * 1e3,
                at(0.5).as_secs_f64() * 1e6,
                at(0.9).as_secs_f64() * 1e6,
                times.last().unwrap().as_secs_f64() * 1e6,
            );
            store.remove(&k).unwrap();
            store.flush().await.unwrap();
        }
    });
}
