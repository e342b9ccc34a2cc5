//! Range benchmark over HTTP: a real Larder serving the last 64 KiB of cached objects of several sizes, to show the time does not grow with the object.
//!
//! Run:  cargo bench --bench range                 (64 MiB and 1 GiB, 200 requests each)
//!       cargo bench --bench range -- 16,256 50    (sizes in MiB, requests per size)
//! Everything runs on 127.0.0.1 in this process: an actix origin holding the objects in
//! memory, and a Larder on port 0 whose store lives in a temp dir under $LARDER_BENCH_DIR
//! (default: the system temp dir). It fills the cache with one full GET per object, then sends
//! `Range: bytes=-65536` one request at a time, rotating over the sizes so that no size is
//! measured at a quieter moment than another, and checks every answer byte for byte.
//! "first" is the first range request after the fill: the body file counts as verified from
//! its commit, so it does not hash the whole file either.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use bytes::Bytes;
use futures_util::StreamExt;

use larder::clock::SystemClock;
use larder::config::{Config, Overrides, RawConfig};
use larder::server::Larder;

const TAIL: usize = 64 * 1024;

/// An object of `mib` MiB whose bytes depend on their offset (a wrong slice shows).
fn object(mib: usize) -> Bytes {
    let mut v: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8).collect();
    for (i, chunk) in v.chunks_mut(1 << 20).enumerate() {
        chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    Bytes::from(v)
}

fn main() {
    // `cargo bench` passes `--bench`; skip flags.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let sizes: Vec<usize> = args
        .first()
        .map_or("64,1024", String::as_str)
        .split(',')
        .map(|s| s.trim().parse().expect("sizes in MiB, comma-separated"))
        .collect();
    let reps: usize = args
        .get(1)
        .map_or(200, |s| s.parse().expect("requests per size"));
    actix_web::rt::System::new().block_on(run(sizes, reps));
}

async fn run(sizes: Vec<usize>, reps: usize) {
    let objects: Arc<Vec<(usize, Bytes)>> =
        Arc::new(sizes.iter().map(|&mib| (mib, object(mib))).collect());
    let served = objects.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin_addr = listener.local_addr().unwrap();
    let origin = HttpServer::new(move || {
        let served = served.clone();
        App::new().default_service(web::to(move |req: HttpRequest| {
            let served = served.clone();
            async move {
                let mib: usize = req.path().trim_start_matches("/obj/").parse().unwrap_or(0);
                match served.iter().find(|(m, _)| *m == mib) {
                    Some((_, body)) => HttpResponse::Ok()
                        .insert_header(("cache-control", "public, max-age=3600"))
                        .insert_header(("content-type", "application/octet-stream"))
                        .body(body.clone()),
                    None => HttpResponse::NotFound().finish(),
                }
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

    let base = std::env::var_os("LARDER_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        origin: Some(format!("http://{origin_addr}")),
        data_dir: Some(dir.path().to_path_buf()),
    };
    let largest = sizes.iter().max().copied().unwrap_or(1) as u64;
    let raw = RawConfig::parse(&format!(
        "[storage]\nmax_size = \"{}MiB\"\nmax_object_size = \"{}MiB\"\n",
        largest * 4,
        largest * 2
    ))
    .unwrap();
    let config = Config::from_raw(raw, &overrides, None).unwrap();
    let larder = Larder::start(&config, Arc::new(SystemClock)).unwrap();
    let proxy = larder.proxy_addr();
    let handle = larder.handle();
    actix_web::rt::spawn(larder.run());

    let client = awc::Client::builder()
        .timeout(Duration::from_secs(300))
        .finish();
    println!("last 64 KiB over HTTP (Range: bytes=-65536) from a Larder, {reps} requests per size");
    println!("(all objects filled first, then the requests interleaved across sizes)");
    let mut rows = Vec::new();
    for (mib, body) in objects.iter() {
        let url = format!("http://{proxy}/obj/{mib}");
        let started = Instant::now();
        let mut resp = client.get(&url).send().await.unwrap();
        let mut n = 0;
        while let Some(chunk) = resp.next().await {
            n += chunk.unwrap().len();
        }
        assert_eq!(n, body.len(), "fill read the whole object");
        let fill = started.elapsed();
        // The client has every byte once the store has committed (the last chunk waits for it).
        let want = body.slice(body.len() - TAIL..);
        let first = tail(&client, &url, &want).await;
        rows.push((*mib, url, want, fill, first, Vec::with_capacity(reps)));
    }
    for round in 0..reps {
        // Rotate the order, so no size always goes first.
        for i in 0..rows.len() {
            let at = (round + i) % rows.len();
            let (_, url, want, _, _, times) = &mut rows[at];
            let took = tail(&client, url, want).await;
            times.push(took);
        }
    }
    println!(
        "{:>9} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "size", "fill", "first", "median", "p90", "max"
    );
    for (mib, _, _, fill, first, mut times) in rows {
        times.sort();
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        println!(
            "{:>6}MiB {:>8.2}s {:>7.2}ms {:>8.1}µs {:>8.1}µs {:>8.1}µs",
            mib,
            fill.as_secs_f64(),
            first.as_secs_f64() * 1e3,
            at(0.5).as_secs_f64() * 1e6,
            at(0.9).as_secs_f64() * 1e6,
            times.last().unwrap().as_secs_f64() * 1e6,
        );
    }
    handle.stop(true).await;
    origin_handle.stop(true).await;
}

/// One `bytes=-65536` request: must be a 206 hit with exactly `want`; returns its latency.
async fn tail(client: &awc::Client, url: &str, want: &Bytes) -> Duration {
    let started = Instant::now();
    let mut resp = client
        .get(url)
        .insert_header(("range", format!("bytes=-{TAIL}")))
        .send()
        .await
        .unwrap();
    let got = resp.body().limit(TAIL).await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status().as_u16(), 206);
    let status = resp
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(status.starts_with("larder; hit"), "not a hit: {status}");
    assert!(got == *want, "wrong bytes");
    took
}
