//! The `larder` binary: parses the command line, sets up logging, and runs `serve` or `dump`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use larder::cli::{Cli, Command, DumpArgs, ServeArgs};
use larder::clock::{Clock, SystemClock};
use larder::config::{Config, LogConfig, Overrides};
use larder::server::{Larder, LarderHandle};
use larder::store::{ReadOnlyStore, StoreError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Dump(args) => dump(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("larder: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        origin: args.origin,
        data_dir: args.data_dir,
        admin_listen: args.admin_listen,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let set_level = init_tracing(&config.log);
    let inherited = larder::server::inherited_listeners()?;
    actix_web::rt::System::new().block_on(async move {
        let larder = Larder::start_with(&config, Arc::new(SystemClock), inherited)?;
        reload_on_hangup(larder.handle(), args.config, overrides, set_level)
            .context("cannot handle SIGHUP")?;
        larder.run_until_signal().await.context("server failed")
    })
}

/// On SIGHUP, reads the config again and applies what can change while running: the log
/// level and the admin token. Everything else (listeners, origin, storage, cache rules) is
/// fixed at start and needs a restart. A config that does not load changes nothing.
fn reload_on_hangup(
    handle: LarderHandle,
    path: Option<PathBuf>,
    overrides: Overrides,
    set_level: Option<SetLevel>,
) -> std::io::Result<()> {
    use actix_web::rt::signal::unix::{SignalKind, signal};
    // Registered before READY=1 is sent, so an early `systemctl reload` is not fatal.
    let mut hangup = signal(SignalKind::hangup())?;
    actix_web::rt::spawn(async move {
        while hangup.recv().await.is_some() {
            let config = match Config::load(path.as_deref(), &overrides) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "reload failed; the running settings stay");
                    continue;
                }
            };
            if let Err(e) = handle.set_admin_token(config.admin.token.clone()) {
                tracing::error!(error = %e, "reload failed; the running settings stay");
                continue;
            }
            tracing::info!(
                level = %config.log.level,
                "config reloaded: admin token and log level (other settings need a restart)"
            );
            match &set_level {
                Some(set) => {
                    if let Err(e) = set(&config.log.level) {
                        tracing::error!(error = %e, "log level not reloaded");
                    }
                }
                None => tracing::warn!("RUST_LOG is set and wins over [log] level; not reloaded"),
            }
        }
    });
    Ok(())
}

fn dump(args: DumpArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        data_dir: args.data_dir,
        ..Overrides::default()
    };
    let config = Config::load_without_origin(args.config.as_deref(), &overrides)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (prefix, tag) = (args.prefix.as_deref(), args.tag.as_deref());
    // The read-only reader writes nothing and keeps no page table: its memory does not grow
    // with the store.
    match ReadOnlyStore::open(&config.storage.path) {
        Ok(store) => {
            let entries = store.iter().flat_map(|s| s.entries(prefix, tag));
            larder::dump::dump_entries(
                entries,
                &mut out,
                args.format,
                args.limit,
                SystemClock.now(),
            )?;
        }
        // A running server holds sled's lock: read through its admin API instead.
        Err(StoreError::Locked(_)) if !args.offline => {
            actix_web::rt::System::new().block_on(larder::dump::dump_via_admin(
                config.admin.listen,
                config.admin.token.as_deref(),
                &mut out,
                args.format,
                prefix,
                tag,
                args.limit,
            ))?;
        }
        Err(e @ StoreError::Locked(_)) => {
            return Err(anyhow::anyhow!(
                "{e}; --offline reads the store directly, which needs the server stopped"
            ));
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)).with_context(|| {
                format!("cannot open the store in {}", config.storage.path.display())
            });
        }
    }
    Ok(())
}

/// Replaces the log filter of the running subscriber.
type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installs the subscriber; answers how to change its level later, or `None` when RUST_LOG
/// fixed it.
fn init_tracing(log: &LogConfig) -> Option<SetLevel> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // RUST_LOG wins over the config so an operator can raise verbosity without editing files.
    let (filter, from_env) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, true),
        Err(_) => (EnvFilter::new(&log.level), false),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // The reload handle's type names the formatter, so each format gets its own closure.
    let set: SetLevel = if log.json {
        let builder = builder.json().with_filter_reloading();
        let handle = builder.reload_handle();
        builder.init();
        Box::new(move |level| {
            let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        })
    } else {
        let builder = builder.with_filter_reloading();
        let handle = builder.reload_handle();
        builder.init();
        Box::new(move |level| {
            let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        })
    };
    (!from_env).then_some(set)
}
