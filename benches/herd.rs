//! Herd benchmark: 200 concurrent requests for a cold URL whose origin takes 200 ms; prints origin fetches and the waiters' latency (p50, max, max over the origin delay).
//!
//! `cargo bench --bench herd` (optional args: rounds, concurrency, origin delay in ms).
//! Everything runs on 127.0.0.1 in this process: an actix origin and a real Larder on port 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use futures_util::future::join_all;

use larder::clock::SystemClock;
use larder::config::{Config, Overrides, RawConfig};
use larder::server::Larder;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let arg = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (rounds, concurrency, delay_ms) = (arg(0, 5) as usize, arg(1, 200) as usize, arg(2, 200));
    actix_web::rt::System::new().block_on(run(
        rounds,
        concurrency,
        Duration::from_millis(delay_ms),
    ));
}

async fn run(rounds: usize, concurrency: usize, delay: Duration) {
    let hits = Arc::new(AtomicUsize::new(0));
    let origin_hits = hits.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin_addr = listener.local_addr().unwrap();
    let origin = HttpServer::new(move || {
        let hits = origin_hits.clone();
        App::new().default_service(web::to(move || {
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                actix_web::rt::time::sleep(delay).await;
                HttpResponse::Ok()
                    .insert_header(("cache-control", "public, max-age=3600"))
                    .body(vec![b'x'; 1024])
            }
        }))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    let origin_handle = origin.handle();
    actix_web::rt::spawn(origin);

    let dir = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        origin: Some(format!("http://{origin_addr}")),
        data_dir: Some(dir.path().to_path_buf()),
    };
    let config = Config::from_raw(RawConfig::default(), &overrides, None).unwrap();
    let larder = Larder::start(&config, Arc::new(SystemClock)).unwrap();
    let proxy = larder.proxy_addr();
    let handle = larder.handle();
    actix_web::rt::spawn(larder.run());

    let client = awc::Client::builder()
        .connector(awc::Connector::new().limit(0))
        .timeout(Duration::from_secs(30))
        .finish();
    println!("herd: {concurrency} concurrent cold requests per round, origin delay {delay:?}");
    println!("waiters = requests answered from another request's fetch (Cache-Status: collapsed);");
    println!("hit_herd = the same 200 requests once the URL is cached: the machine's floor");
    println!(
        "round  origin_fetches   ok  waiters  waiter_p50_ms  waiter_max_ms  max_over_origin_ms  all_p99_ms  hit_herd_ms"
    );
    let mut all_fetches = Vec::new();
    let mut worst_over = 0.0f64;
    for round in 0..rounds {
        let before = hits.load(Ordering::SeqCst);
        let url = format!("http://{proxy}/cold/{round}");
        let results = join_all((0..concurrency).map(|_| {
            let (client, url) = (&client, url.clone());
            async move {
                let started = Instant::now();
                let (ok, collapsed) = match client.get(url).send().await {
                    Ok(mut r) => {
                        let collapsed = r
                            .headers()
                            .get("cache-status")
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.contains("collapsed"));
                        let ok = r.body().await.is_ok_and(|b| b.len() == 1024) && r.status() == 200;
                        (ok, collapsed)
                    }
                    Err(_) => (false, false),
                };
                (ok, collapsed, started.elapsed())
            }
        }))
        .await;
        let fetches = hits.load(Ordering::SeqCst) - before;
        all_fetches.push(fetches);
        let ok = results.iter().filter(|(ok, _, _)| *ok).count();
        let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
        let mut waiters: Vec<f64> = results
            .iter()
            .filter(|(_, collapsed, _)| *collapsed)
            .map(|(_, _, d)| ms(d))
            .collect();
        let mut all: Vec<f64> = results.iter().map(|(_, _, d)| ms(d)).collect();
        waiters.sort_by(f64::total_cmp);
        all.sort_by(f64::total_cmp);
        let pct = |v: &[f64], p: f64| {
            if v.is_empty() {
                f64::NAN
            } else {
                v[((v.len() as f64 - 1.0) * p).round() as usize]
            }
        };
        // The same herd again, now all hits: what 200 concurrent requests cost on this machine
        // without any origin wait (the floor under the waiters' overhead).
        let started = Instant::now();
        let hits_ok = join_all((0..concurrency).map(|_| {
            let (client, url) = (&client, url.clone());
            async move {
                match client.get(url).send().await {
                    Ok(mut r) => r.body().await.is_ok_and(|b| b.len() == 1024),
                    Err(_) => false,
                }
            }
        }))
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
        let hit_herd = ms(&started.elapsed());
        assert_eq!(hits_ok, concurrency, "the hit herd failed");
        let over = pct(&waiters, 1.0) - ms(&delay);
        // Round 0 also opens every connection; the steady rounds are the measurement.
        if round > 0 {
            worst_over = worst_over.max(over);
        }
        println!(
            "{round:>5}  {fetches:>14}  {ok:>3}  {:>7}  {:>13.1}  {:>13.1}  {:>18.1}  {:>10.1}  {:>11.1}",
            waiters.len(),
            pct(&waiters, 0.5),
            pct(&waiters, 1.0),
            over,
            pct(&all, 0.99),
            hit_herd,
        );
    }
    println!("origin fetches per round: {all_fetches:?} (1 = fully coalesced)");
    println!(
        "worst waiter max over the origin delay, rounds 1..: {worst_over:.1} ms (target: 10 ms)"
    );
    handle.stop(true).await;
    origin_handle.stop(true).await;
}
