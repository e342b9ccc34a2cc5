//! Turns the TOML file and command-line flags into validated, typed settings; the only place that knows the config syntax.
//!
//! Two stages, as in ripgrep: `RawConfig` mirrors the file exactly (serde, unknown keys
//! rejected), and `Config` holds validated values (socket addresses, durations, byte sizes).
//! Flags are applied on the raw form so that a flag and a file key go through the same checks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::PolicyOptions;

/// Why a configuration was refused. Every message names the key at fault and, when there is one, the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`{}: {message}", in_file(.path))]
    Invalid {
        key: &'static str,
        path: Option<PathBuf>,
        message: String,
    },
}

fn in_file(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

/// The file as written. Every section and key is optional; defaults fill the rest.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub origin: RawOrigin,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub log: RawLog,
}

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub workers: Option<usize>,
    pub shutdown_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub header_timeout: Option<String>,
    pub keep_alive: Option<String>,
    pub max_uri_length: Option<String>,
    pub max_header_size: Option<String>,
}

/// `[origin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOrigin {
    pub url: Option<String>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub max_concurrent_requests: Option<usize>,
}

/// `[storage]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub path: Option<PathBuf>,
    pub max_size: Option<String>,
    pub max_object_size: Option<String>,
    pub memory_cache: Option<String>,
    pub hot_cache: Option<String>,
    pub sweep_interval: Option<String>,
    pub keep_revalidatable: Option<String>,
}

/// `[cache]`: the caching rules an operator may tune.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub heuristic_percent: Option<u32>,
    pub max_heuristic_lifetime: Option<String>,
    pub honor_cdn_cache_control: Option<bool>,
    pub default_stale_if_error: Option<String>,
    pub normalize_accept_encoding: Option<bool>,
    pub normalize_accept_language: Option<bool>,
    pub share_set_cookie: Option<bool>,
    pub coalesce_timeout: Option<String>,
    pub coalesce_leader_timeout: Option<String>,
    pub coalesce_max_body: Option<String>,
    pub coalesce_memory: Option<String>,
    pub remember_uncacheable: Option<String>,
    pub range_fill_max: Option<String>,
    pub max_background_refreshes: Option<usize>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub metrics_public: Option<bool>,
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}

/// Command-line values that override the file (`larder serve` flags).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub origin: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub admin_listen: Option<String>,
}

/// Validated settings for one server.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub coalescing: CoalesceConfig,
    pub workers: usize,
    pub shutdown_timeout: Duration,
    /// Bounds on client connections and request heads.
    pub client_limits: ClientLimits,
    pub origin: OriginConfig,
    pub storage: StorageConfig,
    pub policy: PolicyOptions,
    pub admin: AdminConfig,
    pub log: LogConfig,
}

/// Request coalescing (one origin fetch per URL at a time).
#[derive(Debug, Clone)]
pub struct CoalesceConfig {
    /// Longest a request waits for another request's fetch before fetching on its own.
    pub timeout: Duration,
    /// Longest a cache fetch (the one the waiters share) waits for the origin's response head;
    /// past it the fetch fails with 504 (or stale-if-error). Defaults to the origin's
    /// `response_timeout`.
    pub leader_timeout: Duration,
    /// Largest body shared with waiting requests through memory.
    pub max_body: u64,
    /// Bound on the memory of all shared bodies together.
    pub total_memory: u64,
    /// How long a URL that answered uncacheable is fetched per request instead of coalesced.
    pub remember_uncacheable: Duration,
    /// A Range request for an unstored URL fetches the full object (and stores it) only up to
    /// this size; larger or unknown-length objects get the Range forwarded and nothing stored.
    pub range_fill_max: u64,
    /// Background (stale-while-revalidate) refreshes waiting on the origin at once; past it a
    /// stale hit is served without starting one.
    pub max_background_refreshes: usize,
}

/// What one client may hold or send (`[server]`).
#[derive(Debug, Clone)]
pub struct ClientLimits {
    /// Open client connections, all workers together; past it new ones wait in the backlog.
    pub max_connections: usize,
    /// Time allowed for a request head to arrive in full (slowloris), then 408 and close.
    pub header_timeout: Duration,
    /// How long an idle keep-alive connection stays open.
    pub keep_alive: Duration,
    /// Longest request target (414 beyond).
    pub max_uri_length: usize,
    /// Largest request header section (431 beyond).
    pub max_header_size: usize,
}

/// Where and how to reach the origin.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    /// Scheme, host and port of the origin, without a trailing slash.
    pub base_url: String,
    pub connect_timeout: Duration,
    /// Time allowed for the response headers after the request body last moved (then 504).
    pub response_timeout: Duration,
    /// Longest pause allowed between two body chunks before the fetch is abandoned.
    pub body_timeout: Duration,
    /// Requests in flight to the origin at once, all workers together (more wait for a slot).
    pub max_concurrent_requests: usize,
}

/// The on-disk cache.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub path: PathBuf,
    pub max_size: u64,
    pub max_object_size: u64,
    /// sled's page cache, which holds hot records and inline bodies in memory.
    pub memory_cache: u64,
    /// The in-memory hot tier: decoded records and verified bodies of recently used URLs.
    pub hot_cache: u64,
    /// Expiry sweeping.
    pub sweep: crate::maintenance::SweepConfig,
}

/// The admin listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
    /// `GET /metrics` needs no token (for scrapers on a trusted network).
    pub metrics_public: bool,
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub json: bool,
}

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
const DEFAULT_ORIGIN: &str = "http://127.0.0.1:3000";
const DEFAULT_DATA_DIR: &str = "./larder-data";
const DEFAULT_MAX_SIZE: u64 = 10 << 30;
const DEFAULT_MAX_ORIGIN_REQUESTS: usize = 256;
/// actix's parser answers 431 itself once a request head passes 128 KiB; a larger setting
/// could never be reached.
const HEAD_BUFFER_MAX: u64 = 128 << 10;

/// `[server]` connection and request-head bounds; errors name their key.
fn client_limits(raw: &RawServer) -> Result<ClientLimits, (&'static str, String)> {
    let max_connections = match raw.max_connections {
        None => 10_000,
        Some(n) if (1..=1_000_000).contains(&n) => n,
        Some(n) => {
            return Err((
                "server.max_connections",
                format!("{n} is not between 1 and 1000000"),
            ));
        }
    };
    let positive = |key: &'static str, value: &Option<String>, default: &str| {
        let d = duration_or(value, default).map_err(|m| (key, m))?;
        if d.is_zero() {
            return Err((key, "must be more than 0".to_string()));
        }
        Ok(d)
    };
    let header_timeout = positive("server.header_timeout", &raw.header_timeout, "10s")?;
    let keep_alive = positive("server.keep_alive", &raw.keep_alive, "15s")?;
    let size = |key: &'static str, value: &Option<String>, default: u64| {
        let n = match value {
            Some(s) => parse_bytes(s).map_err(|m| (key, m))?,
            None => default,
        };
        if !(256..=HEAD_BUFFER_MAX).contains(&n) {
            return Err((key, format!("{n} bytes is not between 256 and 128KiB")));
        }
        Ok(n as usize)
    };
    Ok(ClientLimits {
        max_connections,
        header_timeout,
        keep_alive,
        max_uri_length: size("server.max_uri_length", &raw.max_uri_length, 8 << 10)?,
        max_header_size: size("server.max_header_size", &raw.max_header_size, 32 << 10)?,
    })
}

impl Config {
    /// Reads `file` (if given), applies `overrides`, and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_inner(file, overrides, true)
    }

    /// Like `load` for commands that never contact the origin (`dump`): a missing
    /// `origin.url` is not an error.
    pub fn load_without_origin(
        file: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        Self::load_inner(file, overrides, false)
    }

    fn load_inner(
        file: Option<&Path>,
        overrides: &Overrides,
        origin_required: bool,
    ) -> Result<Config, ConfigError> {
        let raw = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                RawConfig::parse(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message,
                })?
            }
            None => RawConfig::default(),
        };
        let mut raw = raw;
        if !origin_required && raw.origin.url.is_none() && overrides.origin.is_none() {
            raw.origin.url = Some(DEFAULT_ORIGIN.to_string());
        }
        Config::from_raw(raw, overrides, file)
    }

    /// Validates a parsed file plus overrides; `file` is only used to name the source in errors.
    pub fn from_raw(
        mut raw: RawConfig,
        overrides: &Overrides,
        file: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        if let Some(v) = &overrides.listen {
            raw.server.listen = Some(v.clone());
        }
        if let Some(v) = &overrides.origin {
            raw.origin.url = Some(v.clone());
        }
        if let Some(v) = &overrides.data_dir {
            raw.storage.path = Some(v.clone());
        }
        if let Some(v) = &overrides.admin_listen {
            raw.admin.listen = Some(v.clone());
        }
        let path = file.map(Path::to_path_buf);
        let bad = |key: &'static str, message: String| ConfigError::Invalid {
            key,
            path: path.clone(),
            message,
        };

        let listen = parse_addr(raw.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN))
            .map_err(|m| bad("server.listen", m))?;
        let workers = match raw.server.workers {
            None | Some(0) => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(n) if n > 1024 => {
                return Err(bad("server.workers", format!("{n} is more than 1024")));
            }
            Some(n) => n,
        };
        let shutdown_timeout = duration_or(&raw.server.shutdown_timeout, "30s")
            .map_err(|m| bad("server.shutdown_timeout", m))?;
        let client_limits = client_limits(&raw.server).map_err(|(k, m)| bad(k, m))?;

        let url = raw.origin.url.as_deref().ok_or_else(|| {
            bad(
                "origin.url",
                "no origin configured: set [origin] url or pass --origin URL".into(),
            )
        })?;
        let origin = OriginConfig {
            base_url: parse_origin_url(url).map_err(|m| bad("origin.url", m))?,
            connect_timeout: duration_or(&raw.origin.connect_timeout, "5s")
                .map_err(|m| bad("origin.connect_timeout", m))?,
            response_timeout: duration_or(&raw.origin.response_timeout, "30s")
                .map_err(|m| bad("origin.response_timeout", m))?,
            body_timeout: duration_or(&raw.origin.body_timeout, "60s")
                .map_err(|m| bad("origin.body_timeout", m))?,
            max_concurrent_requests: match raw.origin.max_concurrent_requests {
                None => DEFAULT_MAX_ORIGIN_REQUESTS,
                Some(n) if (1..=100_000).contains(&n) => n,
                Some(n) => {
                    return Err(bad(
                        "origin.max_concurrent_requests",
                        format!("{n} is not between 1 and 100000"),
                    ));
                }
            },
        };

        let max_size = match &raw.storage.max_size {
            Some(s) => parse_bytes(s).map_err(|m| bad("storage.max_size", m))?,
            None => DEFAULT_MAX_SIZE,
        };
        if max_size < 1 << 20 {
            return Err(bad(
                "storage.max_size",
                format!("{max_size} bytes is below the 1MiB minimum"),
            ));
        }
        let max_object_size = match &raw.storage.max_object_size {
            Some(s) => parse_bytes(s).map_err(|m| bad("storage.max_object_size", m))?,
            None => max_size / 8,
        };
        if max_object_size > max_size {
            return Err(bad(
                "storage.max_object_size",
                "larger than storage.max_size".into(),
            ));
        }
        let memory_cache = match &raw.storage.memory_cache {
            Some(s) => parse_bytes(s).map_err(|m| bad("storage.memory_cache", m))?,
            None => 64 << 20,
        };
        let hot_cache = match &raw.storage.hot_cache {
            Some(s) => parse_bytes(s).map_err(|m| bad("storage.hot_cache", m))?,
            None => 64 << 20,
        };
        let sweep = crate::maintenance::SweepConfig {
            interval: duration_or(&raw.storage.sweep_interval, "60s")
                .map_err(|m| bad("storage.sweep_interval", m))?,
            keep_revalidatable: duration_or(&raw.storage.keep_revalidatable, "1d")
                .map_err(|m| bad("storage.keep_revalidatable", m))?,
            batch: 256,
        };
        if sweep.interval.is_zero() {
            return Err(bad("storage.sweep_interval", "must be more than 0".into()));
        }
        let storage = StorageConfig {
            path: raw
                .storage
                .path
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            max_size,
            max_object_size,
            memory_cache,
            hot_cache,
            sweep,
        };
        if storage.path.as_os_str().is_empty() {
            return Err(bad("storage.path", "must not be empty".into()));
        }

        let defaults = PolicyOptions::default();
        let c = &raw.cache;
        let heuristic_fraction_percent = c
            .heuristic_percent
            .unwrap_or(defaults.heuristic_fraction_percent);
        if heuristic_fraction_percent > 100 {
            return Err(bad(
                "cache.heuristic_percent",
                format!("{heuristic_fraction_percent} is not between 0 and 100"),
            ));
        }
        let policy = PolicyOptions {
            heuristic_fraction_percent,
            max_heuristic_lifetime: match &c.max_heuristic_lifetime {
                Some(s) => parse_duration(s).map_err(|m| bad("cache.max_heuristic_lifetime", m))?,
                None => defaults.max_heuristic_lifetime,
            },
            honor_cdn_cache_control: c
                .honor_cdn_cache_control
                .unwrap_or(defaults.honor_cdn_cache_control),
            default_stale_if_error: match &c.default_stale_if_error {
                Some(s) => parse_duration(s).map_err(|m| bad("cache.default_stale_if_error", m))?,
                None => defaults.default_stale_if_error,
            },
            normalize_accept_encoding: c
                .normalize_accept_encoding
                .unwrap_or(defaults.normalize_accept_encoding),
            normalize_accept_language: c
                .normalize_accept_language
                .unwrap_or(defaults.normalize_accept_language),
            share_set_cookie: c.share_set_cookie.unwrap_or(defaults.share_set_cookie),
        };

        let coalescing = CoalesceConfig {
            timeout: duration_or(&c.coalesce_timeout, "30s")
                .map_err(|m| bad("cache.coalesce_timeout", m))?,
            leader_timeout: match &c.coalesce_leader_timeout {
                Some(s) => match parse_duration(s) {
                    Ok(d) if d.is_zero() => {
                        return Err(bad(
                            "cache.coalesce_leader_timeout",
                            "must be more than 0 (every fetch would fail)".into(),
                        ));
                    }
                    Ok(d) => d,
                    Err(m) => return Err(bad("cache.coalesce_leader_timeout", m)),
                },
                None => origin.response_timeout,
            },
            max_body: match &c.coalesce_max_body {
                Some(s) => parse_bytes(s).map_err(|m| bad("cache.coalesce_max_body", m))?,
                None => 64 << 20,
            },
            total_memory: match &c.coalesce_memory {
                Some(s) => parse_bytes(s).map_err(|m| bad("cache.coalesce_memory", m))?,
                None => 256 << 20,
            },
            remember_uncacheable: duration_or(&c.remember_uncacheable, "30s")
                .map_err(|m| bad("cache.remember_uncacheable", m))?,
            range_fill_max: match &c.range_fill_max {
                Some(s) => parse_bytes(s).map_err(|m| bad("cache.range_fill_max", m))?,
                None => 64 << 20,
            },
            max_background_refreshes: match c.max_background_refreshes {
                None => 32,
                Some(n) if (1..=100_000).contains(&n) => n,
                Some(n) => {
                    return Err(bad(
                        "cache.max_background_refreshes",
                        format!("{n} is not between 1 and 100000"),
                    ));
                }
            },
        };

        let admin_listen = parse_addr(raw.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN))
            .map_err(|m| bad("admin.listen", m))?;
        if admin_listen == listen && listen.port() != 0 {
            return Err(bad(
                "admin.listen",
                format!(
                    "{admin_listen} is also server.listen; the admin API needs its own address"
                ),
            ));
        }
        let token = match (&raw.admin.token, &raw.admin.token_file) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "admin.token",
                    "set either admin.token or admin.token_file, not both".into(),
                ));
            }
            (Some(t), None) => Some(t.trim().to_string()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| bad("admin.token_file", format!("{}: {e}", f.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => std::env::var("LARDER_ADMIN_TOKEN")
                .ok()
                .map(|t| t.trim().to_string()),
        };
        if token.as_deref() == Some("") {
            return Err(bad("admin.token", "the admin token is empty".into()));
        }
        let admin = AdminConfig {
            listen: admin_listen,
            token,
            metrics_public: raw.admin.metrics_public.unwrap_or(false),
        };

        let level = raw.log.level.clone().unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(bad("log.level", format!("`{level}` is not a log filter")));
        }
        let json = match raw.log.format.as_deref().unwrap_or("text") {
            "text" => false,
            "json" => true,
            other => {
                return Err(bad(
                    "log.format",
                    format!("`{other}`: expected text or json"),
                ));
            }
        };

        Ok(Config {
            listen,
            coalescing,
            workers,
            shutdown_timeout,
            client_limits,
            origin,
            storage,
            policy,
            admin,
            log: LogConfig { level, json },
        })
    }
}

impl RawConfig {
    /// Parses TOML text; the error text names the offending key and line.
    pub fn parse(text: &str) -> Result<RawConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not an address like 127.0.0.1:8080"))
}

/// Accepts `http://host[:port]` with an optional trailing slash; the proxy appends the client's path.
fn parse_origin_url(s: &str) -> Result<String, String> {
    let trimmed = s.trim().trim_end_matches('/');
    let rest = trimmed.strip_prefix("http://").ok_or_else(|| {
        format!("`{s}` must start with http:// (TLS to the origin is not supported yet)")
    })?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "`{s}` must be scheme://host[:port] with no path, query or user-info"
        ));
    }
    Ok(trimmed.to_string())
}

fn duration_or(value: &Option<String>, default: &str) -> Result<Duration, String> {
    parse_duration(value.as_deref().unwrap_or(default))
}

/// Parses durations such as `250ms`, `30s`, `5m`, `2h`, `1d`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s, 500ms, 5m, 1h"))?;
    let millis_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{s}` has an unknown unit (use ms, s, m, h or d)")),
    };
    n.checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses byte sizes such as `10GiB`, `512MiB`, `64KiB`, `1GB`, `4096`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 10GiB, 512MiB or 4096"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "`{s}` has an unknown unit (use B, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_origin() -> Overrides {
        Overrides {
            origin: Some("http://127.0.0.1:3000".into()),
            ..Overrides::default()
        }
    }

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../config.example.toml");
        let raw = RawConfig::parse(text).expect("config.example.toml parses");
        let cfg = Config::from_raw(raw, &Overrides::default(), None).expect("and validates");
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.storage.max_size, 10 << 30);
        assert_eq!(cfg.admin.listen.to_string(), "127.0.0.1:8081");
    }

    #[test]
    fn origin_flag_alone_runs_on_defaults() {
        let cfg = Config::from_raw(RawConfig::default(), &with_origin(), None).unwrap();
        assert_eq!(cfg.storage.path, PathBuf::from("./larder-data"));
        assert_eq!(cfg.origin.base_url, "http://127.0.0.1:3000");
        assert_eq!(cfg.origin.response_timeout, Duration::from_secs(30));
        assert_eq!(cfg.storage.max_object_size, (10u64 << 30) / 8);
    }

    #[test]
    fn leader_timeout_defaults_to_the_origin_response_timeout() {
        let raw = RawConfig::parse("[origin]\nresponse_timeout = \"7s\"\n").unwrap();
        let cfg = Config::from_raw(raw, &with_origin(), None).unwrap();
        assert_eq!(cfg.coalescing.leader_timeout, Duration::from_secs(7));
        let raw = RawConfig::parse("[cache]\ncoalesce_leader_timeout = \"250ms\"\n").unwrap();
        let cfg = Config::from_raw(raw, &with_origin(), None).unwrap();
        assert_eq!(cfg.coalescing.leader_timeout, Duration::from_millis(250));
    }

    #[test]
    fn flags_override_the_file() {
        let raw = RawConfig::parse("[server]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let o = Overrides {
            listen: Some("127.0.0.1:2".into()),
            ..with_origin()
        };
        assert_eq!(Config::from_raw(raw, &o, None).unwrap().listen.port(), 2);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = RawConfig::parse("[server]\nlisen = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = RawConfig::parse("[server]\nworkers = \"four\"\n").unwrap_err();
        assert!(err.contains("workers"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[server]\nlisten = \"nope\"", "server.listen"),
            ("[storage]\nmax_size = \"10 parsecs\"", "storage.max_size"),
            (
                "[origin]\nresponse_timeout = \"soon\"",
                "origin.response_timeout",
            ),
            ("[origin]\nurl = \"ftp://x\"", "origin.url"),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("[admin]\nlisten = \"127.0.0.1:8080\"", "admin.listen"),
            (
                "[cache]\nheuristic_percent = 500",
                "cache.heuristic_percent",
            ),
            (
                "[cache]\ncoalesce_leader_timeout = \"0s\"",
                "cache.coalesce_leader_timeout",
            ),
            ("[server]\nmax_connections = 0", "server.max_connections"),
            ("[server]\nheader_timeout = \"0s\"", "server.header_timeout"),
            (
                "[server]\nmax_header_size = \"1MiB\"",
                "server.max_header_size",
            ),
            ("[server]\nmax_uri_length = \"10\"", "server.max_uri_length"),
            (
                "[origin]\nmax_concurrent_requests = 0",
                "origin.max_concurrent_requests",
            ),
        ];
        for (text, key) in cases {
            let raw = RawConfig::parse(text).unwrap();
            let overrides = if key == "origin.url" {
                Overrides::default()
            } else {
                with_origin()
            };
            let err = Config::from_raw(raw, &overrides, Some(Path::new("x.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("x.toml"), "{text}: {err}");
        }
    }

    #[test]
    fn missing_origin_is_explained() {
        let err = Config::from_raw(RawConfig::default(), &Overrides::default(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("origin.url"), "{err}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("10GiB"), Ok(10 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("1kb"), Ok(1000));
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert!(parse_duration("1y").is_err());
    }
}
