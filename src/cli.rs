//! The command-line surface (clap types only, no logic): `larder serve` and `larder dump`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Larder: a caching HTTP reverse proxy that keeps its cache on disk.
#[derive(Debug, Parser)]
#[command(name = "larder", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the caching proxy (and its admin listener).
    Serve(ServeArgs),
    /// Print what the cache holds, one JSON object per stored response.
    Dump(DumpArgs),
}

/// `larder serve`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (see config.example.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address for the proxy listener, e.g. 127.0.0.1:8080 (overrides [server] listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Origin to cache, e.g. http://127.0.0.1:3000 (overrides [origin] url).
    #[arg(long, value_name = "URL")]
    pub origin: Option<String>,
    /// Cache directory (overrides [storage] path; default ./larder-data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address for the admin API (overrides [admin] listen).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
}

/// Output formats of `larder dump`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DumpFormat {
    /// One JSON object per line.
    Jsonl,
    /// An aligned table for people.
    Table,
}

/// `larder dump`
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// TOML configuration file; the store path comes from it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Cache directory (overrides [storage] path).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = DumpFormat::Jsonl)]
    pub format: DumpFormat,
    /// Only entries whose URL starts with this (e.g. http://example.com/blog/).
    #[arg(long, value_name = "URL")]
    pub prefix: Option<String>,
    /// Only entries carrying this tag (from Surrogate-Key).
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    /// At most this many entries.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Read the store directly even if a server may be running (fails if it is locked).
    #[arg(long)]
    pub offline: bool,
}
