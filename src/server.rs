//! Opens the store, binds the proxy and admin listeners, runs both, and flushes the store on the way out.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpServer, web};

use crate::admin;
use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
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
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    proxy: Server,
    admin: Server,
    store: Store,
}

/// Stops a running server from outside (tests, signal handling).
#[derive(Clone)]
pub struct LarderHandle {
    proxy: ServerHandle,
    admin: ServerHandle,
}

impl LarderHandle {
    /// Stops both listeners; `graceful` lets in-flight responses finish first.
    pub async fn stop(&self, graceful: bool) {
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
        });
        let origin = config.origin.clone();
        let shutdown_secs = config.shutdown_timeout.as_secs();
        let proxy = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                // One awc client per worker: it is not Send.
                .app_data(web::Data::new(Upstream::new(&origin)))
                // Client bodies stream straight to the origin; no size cap at this layer.
                .app_data(web::PayloadConfig::new(usize::MAX))
                .default_service(web::to(proxy::handle))
        })
        .workers(config.workers)
        .shutdown_timeout(shutdown_secs)
        .listen(proxy_listener)
        .map_err(|source| StartError::Bind {
            what: "proxy",
            addr: proxy_addr,
            source,
        })?
        .run();

        let admin_state = web::Data::new(admin::AdminState {
            store: store.clone(),
            token: config.admin.token.clone(),
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
        .listen(admin_listener)
        .map_err(|source| StartError::Bind {
            what: "admin",
            addr: admin_addr,
            source,
        })?
        .run();

        Ok(Larder {
            proxy_addr,
            admin_addr,
            proxy,
            admin,
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
        }
    }

    /// Serves until both listeners stop (signal or handle), then flushes the store so that
    /// everything stored before the stop is on disk.
    pub async fn run(self) -> std::io::Result<()> {
        tracing::info!(proxy = %self.proxy_addr, admin = %self.admin_addr, "larder ready");
        let (proxy, admin) = tokio::join!(self.proxy, self.admin);
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final store flush failed");
        }
        tracing::info!("larder stopped");
        proxy.and(admin)
    }
}
