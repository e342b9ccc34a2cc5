//! Opens the store, binds the proxy and admin listeners (or takes them from systemd socket activation), runs both, and flushes the store on the way out.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, RwLock};

use std::time::Instant;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Server, ServerHandle, Service, ServiceResponse};
use actix_web::http::{Method, header};
use actix_web::{App, HttpServer, web};

use crate::admin::{self, AdminToken};
use crate::clock::Clock;
use crate::config::Config;
use crate::maintenance::Maintenance;
use crate::metrics::{self, Metrics};
use crate::notify;
use crate::proxy::{self, Flights, ProxyState};
use crate::store::{Store, StoreOptions};
use crate::upstream::Upstream;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the cache store in {path}: {source}")]
    Store {
        path: String,
        source: crate::store::StoreError,
    },
    #[error(
        "refusing to start the admin API on {0} without a token: set [admin] token, token_file or LARDER_ADMIN_TOKEN, or listen on loopback"
    )]
    AdminWithoutToken(SocketAddr),
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started server: both listeners bound, not yet serving until `run` is awaited.
pub struct Larder {
    maintenance: Maintenance,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    proxy: Server,
    admin: Server,
    admin_token: AdminToken,
    store: Store,
}

/// Stops a running server from outside (tests, signal handling), or changes what a reload may.
#[derive(Clone)]
pub struct LarderHandle {
    proxy: ServerHandle,
    admin: ServerHandle,
    admin_addr: SocketAddr,
    admin_token: AdminToken,
}

impl LarderHandle {
    /// Replaces the admin token (config reload). Refuses to drop the token of an admin API
    /// that listens beyond loopback, as `start` would.
    pub fn set_admin_token(&self, token: Option<String>) -> Result<(), StartError> {
        if token.is_none() && !self.admin_addr.ip().is_loopback() {
            return Err(StartError::AdminWithoutToken(self.admin_addr));
        }
        *self.admin_token.write().unwrap_or_else(|e| e.into_inner()) = token;
        Ok(())
    }

    /// Stops both listeners; `graceful` lets in-flight responses finish first.
    pub async fn stop(&self, graceful: bool) {
        // systemd then knows the stop is ours and waits (up to TimeoutStopSec) instead of
        // treating the coming exit as a crash.
        notify::notify_or_warn("STOPPING=1");
        tokio::join!(self.proxy.stop(graceful), self.admin.stop(graceful));
    }
}

/// Listening sockets handed over by systemd socket activation (`systemd/larder.socket`);
/// a listener given here is used instead of binding its configured address.
#[derive(Debug, Default)]
pub struct Inherited {
    pub proxy: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

/// The sockets systemd passed to this process (sd_listen_fds(3)): `LISTEN_FDS` descriptors
/// from fd 3 on, meant for us only if `LISTEN_PID` is our pid. A socket named `proxy` or
/// `admin` in `LISTEN_FDNAMES` (from `FileDescriptorName=` of separate .socket units) goes
/// there; otherwise the first is the proxy's and the second the admin API's. Without them,
/// nothing is inherited. Takes ownership of those descriptors, so it hands them out once per
/// process; later calls find none.
pub fn inherited_listeners() -> Result<Inherited, StartError> {
    use std::os::fd::FromRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let var = |name| std::env::var(name).ok();
    let ours = var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let Some(count) = var("LISTEN_FDS").filter(|_| ours) else {
        return Ok(Inherited::default());
    };
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Inherited::default());
    }
    let bad = |m: String| StartError::Activation(m);
    let count: i32 = count
        .parse()
        .ok()
        .filter(|n| (1..=2).contains(n))
        .ok_or_else(|| bad(format!("LISTEN_FDS={count}: expected 1 or 2 sockets")))?;
    let names: Vec<String> = match var("LISTEN_FDNAMES") {
        Some(n) if !n.is_empty() => n.split(':').map(str::to_string).collect(),
        _ => ["proxy", "admin"].iter().map(|s| s.to_string()).collect(),
    };
    let mut inherited = Inherited::default();
    for (i, fd) in (3..3 + count).enumerate() {
        let name = names.get(i).map_or("", String::as_str);
        // SAFETY: systemd passed fds 3..3+LISTEN_FDS open to this pid (checked above), and
        // TAKEN makes this the only place that ever owns them.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        if let Err(e) = listener.local_addr() {
            return Err(bad(format!("fd {fd} ({name}) is not a TCP socket: {e}")));
        }
        // systemd names every socket of one .socket unit alike (by default the unit's name),
        // so any other name means "by position", in the unit's ListenStream= order.
        let slot = match (name, i) {
            ("proxy", _) | (_, 0) if name != "admin" => &mut inherited.proxy,
            _ => &mut inherited.admin,
        };
        if slot.replace(listener).is_some() {
            return Err(bad(format!(
                "fd {fd} ({name:?}) is a second socket for the same listener"
            )));
        }
    }
    Ok(inherited)
}

impl Larder {
    /// Opens the store and binds both listeners (port 0 picks a free port). Call inside an
    /// actix system; serving starts when `run` is awaited or spawned.
    pub fn start(config: &Config, clock: Arc<dyn Clock>) -> Result<Larder, StartError> {
        Self::start_with(config, clock, Inherited::default())
    }

    /// `start`, using the listeners in `inherited` instead of binding their addresses.
    pub fn start_with(
        config: &Config,
        clock: Arc<dyn Clock>,
        inherited: Inherited,
    ) -> Result<Larder, StartError> {
        let admin_planned = inherited
            .admin
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .unwrap_or(config.admin.listen);
        if config.admin.token.is_none() && !admin_planned.ip().is_loopback() {
            let refused = StartError::AdminWithoutToken(admin_planned);
            tracing::error!(admin = %admin_planned, "{refused}");
            return Err(refused);
        }
        if config.admin.token.is_none() {
            tracing::warn!(admin = %config.admin.listen, "no admin token configured: the admin API is open to local users");
        }
        let store_options = StoreOptions {
            cache_capacity: config.storage.memory_cache,
            max_size: Some(config.storage.max_size),
            hot_cache: config.storage.hot_cache,
            ..StoreOptions::default()
        };
        let store = Store::open(&config.storage.path, store_options).map_err(|source| {
            StartError::Store {
                path: config.storage.path.display().to_string(),
                source,
            }
        })?;
        let bind = |what, addr| {
            TcpListener::bind(addr).map_err(|source| StartError::Bind { what, addr, source })
        };
        for (what, l) in [("proxy", &inherited.proxy), ("admin", &inherited.admin)] {
            if let Some(addr) = l.as_ref().and_then(|l| l.local_addr().ok()) {
                tracing::info!(%addr, "{what} listener from systemd socket activation");
            }
        }
        let proxy_listener = match inherited.proxy {
            Some(l) => l,
            None => bind("proxy", config.listen)?,
        };
        let admin_listener = match inherited.admin {
            Some(l) => l,
            None => bind("admin", config.admin.listen)?,
        };
        let local = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let proxy_addr = local(&proxy_listener, "proxy", config.listen)?;
        let admin_addr = local(&admin_listener, "admin", config.admin.listen)?;

        let flights = Arc::new(
            Flights::new(&config.coalescing).with_reader_stall(config.origin.body_timeout),
        );
        let metrics = Arc::new(Metrics::new());
        let state = web::Data::new(ProxyState {
            store: store.clone(),
            policy: config.policy.clone(),
            clock: clock.clone(),
            max_object_size: config.storage.max_object_size,
            range_fill_max: config.coalescing.range_fill_max,
            flights: flights.clone(),
            metrics: metrics.clone(),
            limits: proxy::RequestLimits {
                max_uri_length: config.client_limits.max_uri_length,
                max_header_size: config.client_limits.max_header_size,
            },
            refresh_slots: Arc::new(tokio::sync::Semaphore::new(
                config.coalescing.max_background_refreshes,
            )),
        });
        let origin = config.origin.clone();
        // One bound on origin requests for all workers (each has its own awc client).
        let origin_slots = Arc::new(tokio::sync::Semaphore::new(
            config.origin.max_concurrent_requests,
        ));
        let limits = &config.client_limits;
        // actix counts connections per worker.
        let connections_per_worker = limits.max_connections.div_ceil(config.workers.max(1));
        let shutdown_secs = config.shutdown_timeout.as_secs();
        let proxy = HttpServer::new(move || {
            App::new()
                // Outermost: sees the final response of every request, including errors.
                .wrap_fn(|req, srv| {
                    let started = Instant::now();
                    let response = srv.call(req);
                    async move { Ok(record_request(response.await?, started)) }
                })
                .app_data(state.clone())
                // One awc client per worker: it is not Send.
                .app_data(web::Data::new(
                    Upstream::new(&origin).with_request_slots(origin_slots.clone()),
                ))
                // Client bodies stream straight to the origin; no size cap at this layer.
                .app_data(web::PayloadConfig::new(usize::MAX))
                .default_service(web::to(proxy::handle))
        })
        .workers(config.workers)
        // A response goes out in several writes (head, then body chunks as they arrive); Nagle
        // would hold the small last one back for the client's delayed ACK (~40 ms).
        .tcp_nodelay(true)
        .max_connections(connections_per_worker)
        // Slowloris: a request head must arrive in full within this (else 408 and close).
        .client_request_timeout(limits.header_timeout)
        .keep_alive(limits.keep_alive)
        .shutdown_timeout(shutdown_secs)
        // Signals are ours (see `run_until_signal`): one graceful stop for both listeners,
        // systemd notified, and a second signal that exits at once.
        .disable_signals()
        .listen(proxy_listener)
        .map_err(|source| StartError::Bind {
            what: "proxy",
            addr: proxy_addr,
            source,
        })?
        .run();

        let admin_token: AdminToken = Arc::new(RwLock::new(config.admin.token.clone()));
        let admin_state = web::Data::new(admin::AdminState {
            store: store.clone(),
            token: admin_token.clone(),
            metrics_public: config.admin.metrics_public,
            clock: clock.clone(),
            flights,
            metrics,
            entry_streams: Arc::new(tokio::sync::Semaphore::new(admin::MAX_ENTRY_STREAMS)),
        });
        let admin = HttpServer::new(move || {
            App::new()
                .app_data(admin_state.clone())
                .configure(admin::routes)
        })
        .workers(1)
        .shutdown_timeout(shutdown_secs)
        .disable_signals()
        .listen(admin_listener)
        .map_err(|source| StartError::Bind {
            what: "admin",
            addr: admin_addr,
            source,
        })?
        .run();

        let maintenance = Maintenance::start(store.clone(), clock, config.storage.sweep.clone());
        Ok(Larder {
            maintenance,
            proxy_addr,
            admin_addr,
            proxy,
            admin,
            admin_token,
            store,
        })
    }

    /// The bound proxy address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// A handle that stops this server.
    pub fn handle(&self) -> LarderHandle {
        LarderHandle {
            proxy: self.proxy.handle(),
            admin: self.admin.handle(),
            admin_addr: self.admin_addr,
            admin_token: self.admin_token.clone(),
        }
    }

    /// Serves until both listeners stop (through a [`LarderHandle`]), then flushes the store so
    /// that everything stored before the stop is on disk. Tells systemd READY=1 first (both
    /// listeners are bound and the store is open by now) and pings its watchdog meanwhile.
    pub async fn run(self) -> std::io::Result<()> {
        tracing::info!(proxy = %self.proxy_addr, admin = %self.admin_addr, "larder ready");
        notify::notify_or_warn("READY=1");
        // The ping runs on the main runtime: it proves the process is scheduling, not that each
        // worker is; a wedged main thread is the failure a restart can cure.
        let watchdog = notify::watchdog_interval().map(|every| {
            actix_web::rt::spawn(async move {
                let mut ticks = actix_web::rt::time::interval(every);
                loop {
                    ticks.tick().await;
                    notify::notify_or_warn("WATCHDOG=1");
                }
            })
        });
        let (proxy, admin) = tokio::join!(self.proxy, self.admin);
        drop(self.maintenance);
        if let Some(w) = watchdog {
            w.abort();
        }
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final store flush failed");
        }
        tracing::info!("larder stopped");
        proxy.and(admin)
    }

    /// [`Larder::run`], stopped by SIGTERM or SIGINT: the first one stops both listeners
    /// gracefully (in-flight responses get `[server] shutdown_timeout`, then the store is
    /// flushed and `run` returns); a second one exits the process at once with status 130.
    pub async fn run_until_signal(self) -> std::io::Result<()> {
        use actix_web::rt::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let handle = self.handle();
        actix_web::rt::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!(
                "stopping: in-flight responses may finish; a second signal exits at once"
            );
            actix_web::rt::spawn(async move { handle.stop(true).await });
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting without waiting for in-flight responses");
            std::process::exit(130);
        });
        self.run().await
    }
}

/// Counts a proxied request in the metrics when its head is ready, and arranges for its
/// access-log line to be written when its body has been handed over (so that `bytes` is
/// what was sent, chunked bodies included, and `duration_ms` covers the whole response).
/// Costs no allocation when `larder::access` is off.
fn record_request(
    response: ServiceResponse<BoxBody>,
    started: Instant,
) -> ServiceResponse<LoggedBody> {
    let req = response.request();
    let status = response.status().as_u16();
    let cache_status = response
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok());
    let result = metrics::result_of(status, cache_status);
    // The announced length: exact for hits and sized origin bodies; unknown when chunked.
    let announced = match response.response().body().size() {
        BodySize::Sized(n) if req.method() != Method::HEAD => Some(n),
        _ => None,
    };
    if let Some(state) = req.app_data::<web::Data<ProxyState>>() {
        state.metrics.count_response(result, announced);
        // A pass always went to the origin (once); cache fetches count themselves.
        if cache_status.is_some_and(|cs| cs.contains("fwd=method") || cs.contains("fwd=request")) {
            state.metrics.origin_requests.inc();
        }
    }
    let line = tracing::enabled!(target: "larder::access", tracing::Level::INFO).then(|| {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        Box::new(AccessLine {
            method: req.method().clone(),
            url: format!("{host}{target}"),
            status,
            cache: cache_status.unwrap_or("-").to_string(),
            result,
            started,
            bytes: 0,
        })
    });
    response.map_body(|_, body| LoggedBody { body, line })
}

/// What one access-log line says, filled in as the body goes out.
struct AccessLine {
    method: Method,
    url: String,
    status: u16,
    cache: String,
    result: &'static str,
    started: Instant,
    bytes: u64,
}

/// A response body that counts the bytes it hands to the connection and writes the access-log
/// line when it is dropped: at its end, or when the client went away (then `bytes` is short).
pub struct LoggedBody {
    body: BoxBody,
    line: Option<Box<AccessLine>>,
}

impl MessageBody for LoggedBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<bytes::Bytes, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_next(cx);
        if let (std::task::Poll::Ready(Some(Ok(chunk))), Some(line)) = (&polled, &mut self.line) {
            line.bytes += chunk.len() as u64;
        }
        polled
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let Some(line) = self.line.take() else { return };
        tracing::info!(
            target: "larder::access",
            method = line.method.as_str(),
            url = %line.url,
            status = line.status,
            cache = line.cache.as_str(),
            result = line.result,
            bytes = line.bytes,
            // Until the last byte was handed to the connection.
            duration_ms = line.started.elapsed().as_micros() as f64 / 1000.0,
            "request"
        );
    }
}
