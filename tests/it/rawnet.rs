//! Raw-socket test tools: a client that sends exact bytes and reads the status line, an origin that answers scripted bytes, and a Larder in front of any URL.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime};

use larder::clock::ManualClock;
use larder::server::{Larder, LarderHandle};

use crate::support::test_config;

/// What came back on one raw connection.
#[derive(Debug)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    /// The server closed (FIN or reset) rather than going quiet.
    pub closed: bool,
}

impl RawReply {
    /// The status code of the first response, if one arrived.
    pub fn status(&self) -> Option<u16> {
        let text = self.text();
        let line = text.lines().next()?;
        let mut parts = line.split(' ');
        if !parts.next()?.starts_with("HTTP/1.") {
            return None;
        }
        parts.next()?.parse().ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// A header of the first response (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        let text = self.text();
        let head = text.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// The body of the first response (everything after its head).
    pub fn body(&self) -> &[u8] {
        let at = self
            .bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(self.bytes.len(), |i| i + 4);
        &self.bytes[at..]
    }
}

/// Connects, writes `request`, and reads until the server closes or sends nothing for `quiet`.
pub fn exchange_blocking(addr: SocketAddr, request: &[u8], quiet: Duration) -> RawReply {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream.set_read_timeout(Some(quiet)).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The server may refuse and close before it has read everything (a reset is an answer too).
    let _ = stream.write_all(request);
    read_reply(&mut stream)
}

/// Reads until close or silence (the stream's read timeout).
pub fn read_reply(stream: &mut TcpStream) -> RawReply {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16384];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break false;
            }
            Err(_) => break true,
        }
    };
    RawReply { bytes, closed }
}

/// `exchange_blocking` off the test's runtime (which also drives in-process servers).
pub async fn exchange(addr: SocketAddr, request: impl Into<Vec<u8>>) -> RawReply {
    let request = request.into();
    blocking(move || exchange_blocking(addr, &request, Duration::from_secs(3))).await
}

/// Runs blocking socket work on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A well-formed GET that closes its connection, for "a normal request still works".
pub fn plain_get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: hostile.test\r\nConnection: close\r\n\r\n").into_bytes()
}

/// Panics on server worker threads, counted for the whole test binary.
static WORKER_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics on actix worker threads from now on (idempotent). Actix restarts a worker
/// that panics, so a panic would otherwise go unnoticed by the next request.
pub fn watch_worker_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread
                .name()
                .is_some_and(|n| n.starts_with("actix-server worker"))
            {
                WORKER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

pub fn worker_panics() -> usize {
    WORKER_PANICS.load(Ordering::SeqCst)
}

/// A scripted origin: a std listener whose every connection runs `script(stream, n)` on its
/// own thread (`n` counts connections from 1). It stops accepting when dropped.
pub struct RawOrigin {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl RawOrigin {
    pub fn start(script: impl Fn(TcpStream, usize) + Send + Sync + 'static) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let script = Arc::new(script);
        let (count, halt) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let script = script.clone();
                std::thread::spawn(move || script(stream, n));
            }
        });
        RawOrigin {
            addr,
            accepted,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Reads one request head (up to the blank line) from an origin connection.
pub fn read_request_head(stream: &mut TcpStream) -> Option<String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Waits (≤ 5 s) until `cond` holds.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Larder running in this process in front of any origin URL, with its own manual clock.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub clock: Arc<ManualClock>,
    handle: LarderHandle,
    _dir: tempfile::TempDir,
    finished: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl Proxy {
    pub async fn start(origin_url: &str, extra_toml: &str) -> Proxy {
        Self::start_workers(origin_url, extra_toml, 2).await
    }

    /// `start` with this many workers (one makes every request share one origin client).
    pub async fn start_workers(origin_url: &str, extra_toml: &str, workers: usize) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(origin_url, dir.path(), extra_toml);
        config.workers = workers;
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let larder = Larder::start(&config, clock.clone()).expect("larder starts");
        let (addr, admin_addr, handle) =
            (larder.proxy_addr(), larder.admin_addr(), larder.handle());
        let (tx, rx) = tokio::sync::oneshot::channel();
        actix_web::rt::spawn(async move {
            let _ = larder.run().await;
            let _ = tx.send(());
        });
        Proxy {
            addr,
            admin_addr,
            clock,
            handle,
            _dir: dir,
            finished: Mutex::new(Some(rx)),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The stored entries' URLs, from the admin API's `/entries`.
    pub async fn entry_urls(&self) -> Vec<String> {
        let got = crate::support::get(&format!("http://{}/entries", self.admin_addr), &[]).await;
        assert_eq!(got.status, 200, "{}", got.text());
        got.text()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["url"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
        let rx = self.finished.lock().unwrap().take();
        if let Some(rx) = rx {
            let _ = rx.await;
        }
    }
}
