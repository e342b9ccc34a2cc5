//! Test support: a scripted origin on port 0 with per-path hit counters, Larder in-process or as the built binary, and an HTTP client.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use bytes::Bytes;
use futures_util::stream;

use larder::clock::{Clock, ManualClock};
use larder::config::{Config, Overrides, RawConfig};
use larder::server::{Larder, LarderHandle};

/// A request as the origin saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How the origin sends a body.
#[derive(Clone, Debug)]
pub enum Body {
    Full(Bytes),
    /// Declares Content-Length = `declared` but sends only `sent` and then (50 ms later) breaks
    /// the connection.
    CutShort {
        declared: u64,
        sent: Bytes,
    },
    /// Sends the chunks with a pause before each.
    Slow {
        chunks: Vec<Bytes>,
        pause: Duration,
    },
    /// Like `Slow`, but with a Content-Length for the whole body.
    SlowSized {
        chunks: Vec<Bytes>,
        pause: Duration,
    },
}

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    pub delay: Duration,
}

impl Reply {
    pub fn ok(body: impl Into<Bytes>) -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: Body::Full(body.into()),
            delay: Duration::ZERO,
        }
    }
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            ..Reply::ok(Bytes::new())
        }
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    pub fn body(mut self, body: Body) -> Reply {
        self.body = body;
        self
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

type Script = Arc<dyn Fn(&Seen, usize) -> Reply + Send + Sync>;

struct OriginState {
    routes: Mutex<HashMap<String, Script>>,
    /// Set by `stop`: a request still arriving on an open keep-alive connection is dropped.
    stopped: std::sync::atomic::AtomicBool,
    seen: Mutex<Vec<Seen>>,
    clock: Arc<ManualClock>,
}

/// An in-process origin on 127.0.0.1:0. Unscripted paths answer 404. Its Date header follows
/// `clock`, which the proxy under test shares, so ages computed from Date agree with the
/// proxy's manually moved time.
pub struct TestOrigin {
    pub addr: SocketAddr,
    pub clock: Arc<ManualClock>,
    state: Arc<OriginState>,
    handle: ServerHandle,
}

impl TestOrigin {
    pub async fn start() -> TestOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let state = Arc::new(OriginState {
            routes: Mutex::default(),
            stopped: Default::default(),
            seen: Mutex::default(),
            clock: clock.clone(),
        });
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(64 << 20))
                .default_service(web::to(origin_handler))
        })
        .workers(2)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        TestOrigin {
            addr,
            clock,
            state,
            handle,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Scripts `path` (path and query) with a function of the request and its 1-based count.
    pub fn route(&self, path: &str, f: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(path.to_string(), Arc::new(f));
    }

    /// Scripts every path starting with `prefix` (checked when no exact route matches).
    pub fn route_prefix(
        &self,
        prefix: &str,
        f: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
    ) {
        self.route(&format!("{prefix}*"), f);
    }

    /// Scripts `path` to always give `reply`.
    pub fn fixed(&self, path: &str, reply: Reply) {
        self.route(path, move |_, _| reply.clone());
    }

    /// How many requests reached `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.seen(path).len()
    }

    /// The requests that reached `path`, oldest first.
    pub fn seen(&self, path: &str) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }

    pub async fn stop(&self) {
        // Workers may still serve a pooled connection for a moment after the listener closes;
        // those requests get their connection dropped, as from a dead origin.
        self.state
            .stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.stop(false).await;
    }
}

async fn origin_handler(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<OriginState>,
) -> HttpResponse {
    if state.stopped.load(std::sync::atomic::Ordering::SeqCst) {
        // A body that fails at once makes actix close the connection without a response.
        return HttpResponse::Ok().streaming(stream::once(async {
            Err::<Bytes, _>(std::io::Error::other("origin stopped"))
        }));
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let seen = Seen {
        method: req.method().to_string(),
        path: path.clone(),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    let count = {
        let mut all = state.seen.lock().unwrap();
        all.push(seen.clone());
        all.iter().filter(|s| s.path == path).count()
    };
    let script = {
        let routes = state.routes.lock().unwrap();
        routes.get(&path).cloned().or_else(|| {
            routes
                .iter()
                .find(|(k, _)| k.ends_with('*') && path.starts_with(&k[..k.len() - 1]))
                .map(|(_, v)| v.clone())
        })
    };
    let Some(script) = script else {
        return HttpResponse::NotFound().body("no such route");
    };
    let reply = script(&seen, count);
    if !reply.delay.is_zero() {
        actix_web::rt::time::sleep(reply.delay).await;
    }
    let mut builder =
        HttpResponse::build(actix_web::http::StatusCode::from_u16(reply.status).unwrap());
    if !reply
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("date"))
    {
        builder.insert_header(("date", httpdate::fmt_http_date(state.clock.now())));
    }
    for (n, v) in &reply.headers {
        builder.append_header((n.as_str(), v.as_str()));
    }
    match reply.body {
        Body::Full(b) => builder.body(b),
        Body::CutShort { declared, sent } => {
            // The pause lets the head and the first bytes go out before the cut (an error
            // at once would make actix drop the connection before any response).
            let s = stream::unfold(0, move |step| {
                let sent = sent.clone();
                async move {
                    match step {
                        0 => Some((Ok(sent), 1)),
                        1 => {
                            actix_web::rt::time::sleep(Duration::from_millis(50)).await;
                            Some((Err(std::io::Error::other("origin cut the body")), 2))
                        }
                        _ => None,
                    }
                }
            });
            builder.no_chunking(declared).streaming(s)
        }
        Body::Slow { chunks, pause } => builder.streaming(paced(chunks, pause)),
        Body::SlowSized { chunks, pause } => {
            let len = chunks.iter().map(|c| c.len() as u64).sum();
            builder.no_chunking(len).streaming(paced(chunks, pause))
        }
    }
}

fn paced(
    chunks: Vec<Bytes>,
    pause: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    stream::unfold(chunks.into_iter(), move |mut it| async move {
        let next = it.next()?;
        actix_web::rt::time::sleep(pause).await;
        Some((Ok::<_, std::io::Error>(next), it))
    })
}

/// A Larder running in this process on 127.0.0.1:0 over a temp data dir.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub clock: Arc<ManualClock>,
    pub dir: Arc<tempfile::TempDir>,
    handle: LarderHandle,
    finished: tokio::sync::oneshot::Receiver<()>,
}

impl TestProxy {
    /// Starts Larder in front of `origin` with an extra TOML snippet.
    pub async fn start_with(origin: &TestOrigin, extra_toml: &str) -> TestProxy {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Self::start_in(origin, extra_toml, dir).await
    }

    pub async fn start(origin: &TestOrigin) -> TestProxy {
        Self::start_with(origin, "").await
    }

    /// Starts over an existing data dir (for restarts in-process).
    pub async fn start_in(
        origin: &TestOrigin,
        extra_toml: &str,
        dir: Arc<tempfile::TempDir>,
    ) -> TestProxy {
        let config = test_config(&origin.url(), dir.path(), extra_toml);
        let clock = origin.clock.clone();
        let larder = Larder::start(&config, clock.clone()).expect("larder starts");
        let addr = larder.proxy_addr();
        let admin_addr = larder.admin_addr();
        let handle = larder.handle();
        let (tx, finished) = tokio::sync::oneshot::channel();
        actix_web::rt::spawn(async move {
            let _ = larder.run().await;
            let _ = tx.send(());
        });
        TestProxy {
            addr,
            admin_addr,
            clock,
            dir,
            handle,
            finished,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Moves the clock this proxy and its origin share.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Stops gracefully and waits until the store is flushed and released.
    pub async fn stop(self) -> Arc<tempfile::TempDir> {
        self.handle.stop(true).await;
        let _ = self.finished.await;
        self.dir
    }
}

/// A validated config for tests: listeners on port 0, data in `dir`, plus `extra_toml`.
pub fn test_config(origin: &str, dir: &Path, extra_toml: &str) -> Config {
    let raw = RawConfig::parse(extra_toml).expect("test TOML parses");
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        origin: Some(origin.to_string()),
        data_dir: Some(dir.to_path_buf()),
    };
    let mut config = Config::from_raw(raw, &overrides, None).expect("test config validates");
    config.workers = 2;
    config
}

/// A client with no timeouts surprises and no decompression.
pub fn client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .disable_redirects()
        .finish()
}

/// A finished response: status, headers, full body.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `method url` with headers and reads the whole response (up to 64 MiB).
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)]) -> Got {
    try_send(method, url, headers, Bytes::new())
        .await
        .expect("request succeeds")
}

/// GET with headers.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Got {
    send("GET", url, headers).await
}

/// Like `send` with a body, returning the error instead of panicking (for cut connections).
pub async fn try_send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Got, String> {
    let method = actix_web::http::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = client().request(method, url);
    for (n, v) in headers {
        req = req.append_header((*n, *v));
    }
    let mut resp = req.send_body(body).await.map_err(|e| e.to_string())?;
    let body = resp
        .body()
        .limit(64 << 20)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Got {
        status: resp.status().as_u16(),
        headers: resp
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    })
}

/// The built `larder` binary running as a child process.
pub struct LarderProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stderr_lines: Arc<Mutex<Vec<String>>>,
}

impl LarderProcess {
    /// Runs `larder serve` with `args` and waits (≤ 20 s) for its "larder ready" log line.
    pub fn spawn(args: &[&str]) -> LarderProcess {
        Self::spawn_env(args, &[])
    }

    /// `spawn` with extra environment variables (e.g. NOTIFY_SOCKET).
    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> LarderProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_larder"))
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("larder binary starts");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let keep = lines.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("larder ready")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                keep.lock().unwrap().push(line);
            }
        });
        let ready = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("larder did not become ready: {:?}", lines.lock().unwrap());
            }
        };
        let field = |name: &str| -> SocketAddr {
            let start = ready
                .find(&format!("{name}="))
                .expect("address in ready line")
                + name.len()
                + 1;
            let rest = &ready[start..];
            let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
            rest[..end].parse().expect("socket address")
        };
        LarderProcess {
            addr: field("proxy"),
            admin_addr: field("admin"),
            child,
            stderr_lines: lines,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends SIGTERM and waits (≤ 30 s) for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        wait_with_timeout(&mut self.child, Duration::from_secs(30))
    }

    /// Sends `signal` (e.g. "TERM") with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{signal} {pid}");
    }

    /// SIGKILL, the crash case.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> Vec<String> {
        self.stderr_lines.lock().unwrap().clone()
    }
}

impl Drop for LarderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the built binary to completion with `args`; returns (exit code, stdout, stderr).
pub fn run_binary(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_larder"))
        .args(args)
        .output()
        .expect("larder binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn temp_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Sends raw bytes on a fresh connection and returns everything read until the server
/// closes or goes quiet for `quiet`.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], quiet: Duration) -> String {
    let request = request.to_vec();
    // Blocking I/O off the test's single-threaded runtime, which also drives the servers.
    tokio::task::spawn_blocking(move || raw_exchange_blocking(addr, &request, quiet))
        .await
        .unwrap()
}

fn raw_exchange_blocking(addr: SocketAddr, request: &[u8], quiet: Duration) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(quiet)).unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// xorshift64*: deterministic test randomness (kill moments, sizes, mutated inputs) that a
/// printed seed reproduces, without a dependency.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from the clock and the process id; print `.0` so that a failure can be replayed.
    pub fn seeded() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng(nanos ^ (u64::from(std::process::id()) << 32) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// An index into something `len` long (0 when it is empty).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}
