//! Opens the store, binds the proxy and admin listeners, runs both, and flushes the store on the way out.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, RwLock};

use std::time::Instant;

use actix_web::body::{BodySize, MessageBody};
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

impl Larder {
    /// Opens the store and binds both listeners (port 0 picks a free port). Call inside an
    /// actix system; serving starts when `run` is awaited or spawned.
    pub fn start(config: &Config, clock: Arc<dyn Clock>) -> Result<Larder, StartError> {
        if config.admin.token.is_none() && !config.admin.listen.ip().is_loopback() {
            return Err(StartError::AdminWithoutToken(config.admin.listen));
        }
        if config.admin.token.is_none() {
            tracing::warn!(admin = %config.admin.listen, "no admin token configured: the admin API is open to local users");
        }
        let store_options = StoreOptions {
            cache_capacity: config.storage.memory_cache,
            max_size: Some(config.storage.max_size),
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
        let proxy_listener = bind("proxy", config.listen)?;
        let admin_listener = bind("admin", config.admin.listen)?;
        let local = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let proxy_addr = local(&proxy_listener, "proxy", config.listen)?;
        let admin_addr = local(&admin_listener, "admin", config.admin.listen)?;

        let flights = Arc::new(Flights::new(
            config.coalescing.remember_uncacheable,
            config.coalescing.timeout,
            config.coalescing.max_body,
            config.coalescing.total_memory,
        ));
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
                    async move {
                        let response = response.await?;
                        record_request(&response, started);
                        Ok(response)
                    }
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

/// Counts a proxied request in the metrics and writes its access-log line. Reads only what
/// the response already holds; the log line costs nothing when `larder::access` is off.
fn record_request<B: MessageBody>(response: &ServiceResponse<B>, started: Instant) {
    let req = response.request();
    let status = response.status().as_u16();
    let cache_status = response
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok());
    let result = metrics::result_of(status, cache_status);
    // The announced length: exact for hits and sized origin bodies; unknown when chunked.
    let bytes = match response.response().body().size() {
        BodySize::Sized(n) if req.method() != Method::HEAD => Some(n),
        _ => None,
    };
    if let Some(state) = req.app_data::<web::Data<ProxyState>>() {
        state.metrics.count_response(result, bytes);
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info!(
        target: "larder::access",
        method = req.method().as_str(),
        url = format_args!("{host}{}", req.path()),
        status,
        cache = cache_status.unwrap_or("-"),
        result,
        bytes,
        // Time until the response head; a streamed body may take longer.
        duration_ms = started.elapsed().as_micros() as f64 / 1000.0,
        "request"
    );
}
