//! The built binary across restarts: a stored entry is still a hit after a graceful stop and after SIGKILL.

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
