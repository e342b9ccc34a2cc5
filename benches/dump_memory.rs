//! `larder dump` memory: fills a store, runs the real binary over it (offline, and through a running server's admin API), reports peak RSS at two sizes, and fails if either exceeds a fixed bound or the offline dump grows with the store.
//!
//! `cargo bench --bench dump_memory` (optional arg: the larger entry count, default 100000).

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
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
    let data = dir.path().join("data");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut filled = 0;
    let mut offline_peaks = Vec::new();
    println!(
        "path     entries  fill_s  dump_s   lines  dump_peak_rss_mib  open_only_rss_mib  server_rss_mib(before -> peak)"
    );
    for target in [large / 10, large] {
        let started = Instant::now();
        runtime.block_on(fill(&data, filled, target));
        let fill_s = started.elapsed().as_secs_f64();
        filled = target;

        let offline = |limit| {
            dump(
                &["--offline", "--data-dir", data.to_str().unwrap()],
                limit,
                None,
            )
        };
        let (lines, peak_kib, dump_s, _) = offline(None);
        // The same with --limit 1: what opening the store costs, before any iteration.
        let (_, open_kib, _, _) = offline(Some(1));
        println!(
            "offline  {target:>7}  {fill_s:>6.1}  {dump_s:>6.2}  {lines:>6}  {:>17.1}  {:>17.1}  -",
            mib(peak_kib),
            mib(open_kib)
        );
        assert_eq!(lines, target, "dump must print every entry");
        // The offline reader keeps sled's page table in scratch files: its memory must not
        // grow with the store.
        assert!(
            mib(peak_kib) <= OFFLINE_DUMP_MIB,
            "offline dump of {target} entries: {:.1} MiB peak (bound {OFFLINE_DUMP_MIB} MiB)",
            mib(peak_kib)
        );
        if let Some(smaller) = offline_peaks.last() {
            assert!(
                mib(peak_kib) - mib(*smaller) <= OFFLINE_GROWTH_MIB,
                "offline dump peak grew from {:.1} to {:.1} MiB with 10x the entries (bound +{OFFLINE_GROWTH_MIB} MiB)",
                mib(*smaller),
                mib(peak_kib)
            );
        }
        offline_peaks.push(peak_kib);

        // Through the admin API: the server holds the store, dump streams /entries.
        let config = dir.path().join("larder.toml");
        let admin_port = free_port();
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[origin]\nurl = \"http://127.0.0.1:9\"\n\
                 [storage]\npath = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n",
                data.display()
            ),
        )
        .unwrap();
        let mut server = Command::new(env!("CARGO_BIN_EXE_larder"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", admin_port)).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let server_before = rss_kib(server.id(), "VmRSS:").unwrap_or(0);
        let args = ["--config", config.to_str().unwrap()];
        let (lines, peak_kib, dump_s, server_peak) = dump(&args, None, Some(server.id()));
        let (_, open_kib, _, _) = dump(&args, Some(1), None);
        println!(
            "admin    {target:>7}  {fill_s:>6.1}  {dump_s:>6.2}  {lines:>6}  {:>17.1}  {:>17.1}  {:.1} -> {:.1}",
            mib(peak_kib),
            mib(open_kib),
            mib(server_before),
            mib(server_peak)
        );
        stop(&mut server);
        assert_eq!(
            lines, target,
            "dump via the admin API must print every entry"
        );
        assert!(
            mib(peak_kib) <= ADMIN_DUMP_MIB,
            "dump through the admin API of {target} entries: {:.1} MiB peak (bound {ADMIN_DUMP_MIB} MiB)",
            mib(peak_kib)
        );
    }
    println!(
        "PASS: the offline dump stays under {OFFLINE_DUMP_MIB} MiB and grows at most {OFFLINE_GROWTH_MIB} MiB with 10x the entries, the admin-API dump stays under {ADMIN_DUMP_MIB} MiB"
    );
}

/// Bound on an offline dump's peak RSS at any size (measured 2026-12-01 with the read-only
/// reader: 6.7 MiB at 10k entries, 6.6 at 100k, 6.9 at 1M; 15.9 / 43.0 MiB at 10k / 100k when
/// it opened sled).
const OFFLINE_DUMP_MIB: f64 = 16.0;

/// Bound on how much the offline dump's peak may grow from one size to the next, 10x the
/// entries (measured: +0.3 MiB from 100k to 1M).
const OFFLINE_GROWTH_MIB: f64 = 2.0;

/// Bound on a dump's peak RSS when it streams from a running server (measured: 6.8-6.9 MiB).
const ADMIN_DUMP_MIB: f64 = 16.0;

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stop(server: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = server.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `/proc/<pid>/status` field in KiB (VmHWM: peak resident set; VmRSS: current).
fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn fill(dir: &Path, from: usize, to: usize) {
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

/// Runs `larder dump` with `args`; returns (lines printed, the dump's peak RSS in KiB, seconds,
/// and the highest RSS of `server` seen meanwhile, in KiB).
fn dump(args: &[&str], limit: Option<u64>, server: Option<u32>) -> (usize, u64, f64, u64) {
    let started = Instant::now();
    let mut command = Command::new(env!("CARGO_BIN_EXE_larder"));
    command.arg("dump").args(args);
    if let Some(n) = limit {
        command.args(["--limit", &n.to_string()]);
    }
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
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
    let (mut peak, mut server_peak) = (0, 0);
    while child.try_wait().unwrap().is_none() {
        if let Some(kib) = rss_kib(child.id(), "VmHWM:") {
            peak = kib;
        }
        if let Some(kib) = server.and_then(|pid| rss_kib(pid, "VmRSS:")) {
            server_peak = server_peak.max(kib);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (
        counter.join().unwrap(),
        peak,
        started.elapsed().as_secs_f64(),
        server_peak,
    )
}
