//! The built binary across restarts: a stored entry is still a hit after a graceful stop and after SIGKILL, and rounds of SIGKILL under load with eviction never serve wrong bytes or lose flushed entries.

use crate::support::*;

/// The key includes Host; each process gets a new port, so clients name the site explicitly.
const HOST: &[(&str, &str)] = &[("host", "cache.example")];

fn serve_args<'a>(origin: &'a str, dir: &'a str) -> Vec<&'a str> {
    vec![
        "--origin",
        origin,
        "--data-dir",
        dir,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]
}

// Never a cold cache: after a graceful stop the new process serves the entry without the origin.
#[actix_web::test]
async fn entry_survives_restart_of_the_binary() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/p",
        Reply::ok("persisted").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let (url, path) = (origin.url(), dir.path().display().to_string());

    let first = LarderProcess::spawn(&serve_args(&url, &path));
    assert_eq!(get(&first.url("/p"), HOST).await.text(), "persisted");
    let status = first.terminate();
    assert!(status.success(), "graceful stop exits 0, got {status:?}");

    let second = LarderProcess::spawn(&serve_args(&url, &path));
    let r = get(&second.url("/p"), HOST).await;
    assert_eq!(r.text(), "persisted");
    assert!(
        r.cache_status().starts_with("larder; hit"),
        "{}",
        r.cache_status()
    );
    assert_eq!(origin.hits("/p"), 1);
}

// After kill -9 the store opens again and entries committed (and flushed) before are hits.
#[actix_web::test]
async fn entry_survives_sigkill() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/k",
        Reply::ok("survivor").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let (url, path) = (origin.url(), dir.path().display().to_string());

    let first = LarderProcess::spawn(&serve_args(&url, &path));
    assert_eq!(get(&first.url("/k"), HOST).await.text(), "survivor");
    // sled flushes every 500 ms in the background; wait past one flush before the crash.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    first.kill();

    let second = LarderProcess::spawn(&serve_args(&url, &path));
    let r = get(&second.url("/k"), HOST).await;
    assert_eq!(r.text(), "survivor");
    assert!(
        r.cache_status().starts_with("larder; hit"),
        "{}",
        r.cache_status()
    );
    assert_eq!(origin.hits("/k"), 1);
}

fn crash_body(n: u64) -> bytes::Bytes {
    // Sizes cross the inline limit (16 KiB) so both kinds of storage are killed mid-write.
    let len = [900usize, 5_000, 40_000, 100_000][(n % 4) as usize];
    bytes::Bytes::from(
        (0..len as u64)
            .map(|i| ((i * 7 + n * 13) % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// Makes everything the server stored so far durable: a purge answers only after the store's
/// flush (and a purge of a URL never stored changes nothing). Returns when it answered.
async fn flush_barrier(server: &LarderProcess) -> std::time::Instant {
    let r = try_send(
        "POST",
        &format!("http://{}/purge", server.admin_addr),
        &[("content-type", "application/json")],
        bytes::Bytes::from_static(br#"{"url": "http://cache.example/never-stored"}"#),
    )
    .await
    .expect("the admin API answers");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    std::time::Instant::now()
}

// Crash safety under eviction: rounds of {start the binary with a 2 MiB max_size, write load,
// SIGKILL at a random moment, restart, read back every request of the round (the one in flight
// at the kill included) and every entry present before}. No read-back may be wrong or partial:
// only-if-cached gets the exact body or 504. And nothing committed and flushed may be lost
// (flushed: completed before a flush barrier at a random moment of the load, or a hit in the
// read-back server, which stops gracefully): the load writes each URL once, so eviction is
// plain LRU there (admission and sparing see equal counts) and what survives must be the most
// recently used entries; a missing flushed entry while an older one survived is lost, not
// evicted. 20 rounds (LARDER_CRASH_ROUNDS=N for
// more); the seed is printed (LARDER_CRASH_SEED=S repeats a run).
#[actix_web::test]
async fn sigkill_under_load_never_serves_wrong_content() {
    use std::time::{Duration, Instant};
    let rounds: u64 = std::env::var("LARDER_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed = std::env::var("LARDER_CRASH_SEED")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64 | 1
        });
    eprintln!("crash: seed {seed:#x} (LARDER_CRASH_SEED={seed:x} repeats this run)");
    let mut rng = Rng(seed);
    let origin = TestOrigin::start().await;
    origin.route_prefix("/crash/", |req, _| {
        let n: u64 = req.path.rsplit('/').next().unwrap().parse().unwrap();
        Reply::ok(crash_body(n)).header("cache-control", "max-age=36000")
    });
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("larder.toml");
    std::fs::write(
        &config,
        format!(
            "[origin]\nurl = \"{}\"\n[storage]\npath = \"{}\"\nmax_size = \"2MiB\"\n",
            origin.url(),
            data.display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let args = [
        "--config",
        config.as_str(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let only_if_cached = [
        ("host", "cache.example"),
        ("cache-control", "only-if-cached"),
    ];
    // Entries believed present: when they were last used (committed or hit), and whether that
    // use is durable for sure (a hit in a server that then stopped gracefully).
    let mut present: Vec<(u64, Instant, bool)> = Vec::new();
    let mut next = 0u64;
    let (mut written, mut checked, mut wrong, mut lost, mut evicted, mut kept) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut reported_lost = 0;
    let started = Instant::now();
    for round in 0..rounds {
        let server = LarderProcess::spawn(&args);
        let run_for = Duration::from_millis(300 + rng.next() % 1500);
        let barrier_after = Duration::from_millis(rng.next() % run_for.as_millis() as u64);
        let mut barrier: Option<Instant> = None;
        let round_start = next;
        let load_started = Instant::now();
        while load_started.elapsed() < run_for {
            if barrier.is_none() && load_started.elapsed() >= barrier_after {
                barrier = Some(flush_barrier(&server).await);
            }
            let n = next;
            next += 1;
            let got = try_send(
                "GET",
                &server.url(&format!("/crash/{n}")),
                HOST,
                bytes::Bytes::new(),
            )
            .await;
            if got.is_ok_and(|g| g.status == 200 && g.body == crash_body(n)) {
                present.push((n, Instant::now(), false));
                written += 1;
            }
        }
        // Kill while the next request is in flight (or just before it reaches the server).
        let in_flight = {
            let u = server.url(&format!("/crash/{next}"));
            actix_web::rt::spawn(
                async move { try_send("GET", &u, HOST, bytes::Bytes::new()).await },
            )
        };
        next += 1;
        actix_web::rt::time::sleep(Duration::from_millis(rng.next() % 5)).await;
        let killed_at = Instant::now();
        server.kill();
        let _ = in_flight.await;

        let server = LarderProcess::spawn(&args);
        let read = |n: u64| {
            let url = server.url(&format!("/crash/{n}"));
            async move {
                let r = get(&url, &only_if_cached).await;
                match r.status {
                    200 if r.body == crash_body(n) => Some(true),
                    200 => None,
                    504 => Some(false),
                    other => panic!("round {round}: /crash/{n} answered {other}"),
                }
            }
        };
        // Every request of this round, the in-flight one included: exact or absent.
        let tracked: std::collections::HashSet<u64> = present.iter().map(|(n, ..)| *n).collect();
        for n in round_start..next {
            if !tracked.contains(&n) {
                checked += 1;
                if read(n).await.is_none() {
                    wrong += 1;
                    eprintln!("round {round}: /crash/{n} (never completed) served wrong bytes");
                }
            }
        }
        // Every entry believed present, oldest use first.
        present.sort_by_key(|(_, at, _)| *at);
        let mut survivors = Vec::new();
        let mut missing = Vec::new();
        for (n, used, durable) in present.drain(..) {
            checked += 1;
            match read(n).await {
                Some(true) => survivors.push((n, used)),
                Some(false) => missing.push((n, used, durable)),
                None => {
                    wrong += 1;
                    eprintln!("round {round}: /crash/{n} served wrong bytes");
                }
            }
        }
        // LRU keeps a suffix of the use order: a flushed entry missing while an older one
        // survives was lost by the crash.
        let oldest_survivor = survivors.iter().map(|(_, used)| *used).min();
        for (n, used, durable) in &missing {
            let flushed = *durable || barrier.is_some_and(|b| *used <= b);
            if flushed && oldest_survivor.is_some_and(|oldest| oldest < *used) {
                lost += 1;
                eprintln!(
                    "round {round}: /crash/{n} (size class {}) lost; last used {:?} before the kill, {}",
                    n % 4,
                    killed_at.saturating_duration_since(*used),
                    if *durable {
                        "a hit in a gracefully stopped server"
                    } else {
                        "stored before a flush barrier"
                    }
                );
            } else if flushed {
                evicted += 1;
            }
        }
        if lost > reported_lost {
            reported_lost = lost;
            // What survived and what went, in use order, to tell a lost range from an eviction
            // out of order.
            let mut all: Vec<(Instant, u64, char)> = survivors
                .iter()
                .map(|(n, used)| (*used, *n, '+'))
                .chain(
                    missing
                        .iter()
                        .map(|(n, used, d)| (*used, *n, if *d { 'D' } else { '-' })),
                )
                .collect();
            all.sort();
            let line: Vec<String> = all
                .iter()
                .map(|(used, n, c)| {
                    format!(
                        "{c}{n}@{}ms",
                        killed_at.saturating_duration_since(*used).as_millis()
                    )
                })
                .collect();
            eprintln!(
                "round {round}: barrier {:?} before the kill; use order (+ present, - missing, D missing durable): {}",
                barrier.map(|b| killed_at.saturating_duration_since(b)),
                line.join(" ")
            );
        }
        kept += survivors.len() as u64;

        // The read-back hits were the latest uses, in this order; a graceful stop persists them.
        let now = Instant::now();
        present = survivors
            .into_iter()
            .enumerate()
            .map(|(i, (n, _))| (n, now + Duration::from_micros(i as u64), true))
            .collect();
        assert!(server.terminate().success(), "round {round}: graceful stop");
    }
    eprintln!(
        "crash: {rounds} rounds in {:.1?}, {written} entries written, {checked} read-backs, {kept} present, {evicted} evicted (older than every survivor), {wrong} wrong, {lost} committed-but-lost",
        started.elapsed()
    );
    assert_eq!(wrong, 0, "served wrong or partial content after a crash");
    assert_eq!(lost, 0, "lost entries committed well before the crash");
    assert!(kept > 0);
    assert!(
        evicted > 0,
        "max_size never evicted anything: the bound was not exercised"
    );
}
