//! `larder dump` memory: fills a store, runs the real binary over it, and reports its peak RSS at two sizes (it must not grow with the entry count).
//!
//! `cargo bench --bench dump_memory` (optional arg: the larger entry count, default 100000).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use larder::key::{PrimaryKey, VariantKey};
use larder::policy::{Freshness, HeaderList};
use larder::store::{BodyInfo, Entry, Store, StoreOptions};

fn main() {
    let large: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut filled = 0;
    println!("entries  fill_s  dump_s  lines  peak_rss_mib  open_only_rss_mib");
    for target in [large / 10, large] {
        let started = Instant::now();
        runtime.block_on(fill(dir.path(), filled, target));
        let fill_s = started.elapsed().as_secs_f64();
        filled = target;
        let (lines, peak_kib, dump_s) = dump(dir.path(), None);
        // The same with --limit 1: what opening the store costs, before any iteration.
        let (_, open_kib, _) = dump(dir.path(), Some(1));
        println!(
            "{target:>7}  {fill_s:>6.1}  {dump_s:>6.2}  {lines:>5}  {:>12.1}  {:>17.1}",
            peak_kib as f64 / 1024.0,
            open_kib as f64 / 1024.0
        );
        assert_eq!(lines, target, "dump must print every entry");
    }
}

async fn fill(dir: &std::path::Path, from: usize, to: usize) {
    let store = Store::open(dir, StoreOptions::default()).unwrap();
    let now = SystemTime::now();
    for i in from..to {
        let primary = PrimaryKey::new("http", "bench.example", &format!("/page/{i}?q=1"));
        let key = VariantKey::new(&primary, &[]);
        let mut headers = HeaderList::new();
        headers.push("content-type", "text/html");
        headers.push("etag", format!("\"{i}\""));
        headers.push("cache-control", "max-age=3600");
        let entry = Entry {
            url: primary.url().to_string(),
            status: 200,
            headers,
            vary: Vec::new(),
            freshness: Freshness {
                request_time: now,
                response_time: now,
                corrected_initial_age: Duration::ZERO,
                lifetime: Duration::from_secs(3600),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                must_revalidate: false,
                no_cache: false,
            },
            tags: vec![format!("t{}", i % 100)],
            stored_at: now,
            body: BodyInfo::default(),
        };
        let mut writer = store.begin_write(key, entry);
        writer.write(&[b'x'; 200]).await.unwrap();
        writer.commit(Some(200)).await.unwrap();
    }
    store.flush().await.unwrap();
}

/// Runs `larder dump` on the store; returns (lines printed, peak RSS in KiB, seconds).
fn dump(dir: &std::path::Path, limit: Option<u64>) -> (usize, u64, f64) {
    let started = Instant::now();
    let mut command = Command::new(env!("CARGO_BIN_EXE_larder"));
    command.args(["dump", "--offline", "--data-dir"]).arg(dir);
    if let Some(n) = limit {
        command.args(["--limit", &n.to_string()]);
    }
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut stdout = child.stdout.take().unwrap();
    // Count lines on a thread while this one samples the child's high-water mark (VmHWM),
    // which the kernel keeps, so the last sample before exit is the peak.
    let counter = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut lines = 0;
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => return lines,
                Ok(n) => lines += buf[..n].iter().filter(|b| **b == b'\n').count(),
            }
        }
    });
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        if let Ok(status) = std::fs::read_to_string(&status_path)
            && let Some(kib) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        {
            peak = kib;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (
        counter.join().unwrap(),
        peak,
        started.elapsed().as_secs_f64(),
    )
}
