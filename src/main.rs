//! The `larder` binary: parses the command line, sets up logging, and runs `serve` or `dump`.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use larder::cli::{Cli, Command, DumpArgs, ServeArgs};
use larder::clock::{Clock, SystemClock};
use larder::config::{Config, LogConfig, Overrides};
use larder::server::Larder;
use larder::store::{Store, StoreError, StoreOptions};

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
    init_tracing(&config.log);
    actix_web::rt::System::new().block_on(async move {
        let larder = Larder::start(&config, Arc::new(SystemClock))?;
        larder.run_until_signal().await.context("server failed")
    })
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
    // One pass over the index gains nothing from a page cache; keep dump's memory small.
    let options = StoreOptions {
        cache_capacity: 8 << 20,
        ..StoreOptions::default()
    };
    match Store::open(&config.storage.path, options) {
        Ok(store) => {
            larder::dump::dump_store(
                &store,
                &mut out,
                args.format,
                prefix,
                tag,
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

fn init_tracing(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG wins over the config so an operator can raise verbosity without editing files.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}
