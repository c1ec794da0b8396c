//! CLI entry: parse, init tracing, run.

use clap::Parser;
use pgsluice::config::{Cli, Command, Config, LogFormat};
use std::io::IsTerminal;
use std::process::ExitCode;

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGSLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal; files, pipes and journald get text.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

/// One thread: a current-thread runtime, so a client's and its server's socket events are
/// handled without crossing threads. Otherwise a worker pool (0 = one per core).
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if threads > 1 {
        b.worker_threads(threads);
    }
    b.enable_all().build()
}

fn start(threads: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    runtime(threads).map_err(|e| {
        eprintln!("pgsluice: cannot start runtime: {e}");
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // The proxy's configuration is read before the runtime exists: it says how many threads.
        None => match Config::from_flags(cli.flags) {
            Ok(cfg) => match start(cfg.threads) {
                Ok(rt) => {
                    init_tracing(cfg.log_format);
                    rt.block_on(pgsluice::run::run_until_signal(cfg))
                }
                Err(code) => return code,
            },
            Err(e) => Err(e),
        },
        Some(command) => {
            let rt = match start(0) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match command {
                Command::Demo { port } => {
                    init_tracing(LogFormat::Text);
                    rt.block_on(pgsluice::demo::run(port, cli.flags))
                }
                Command::Top {
                    admin,
                    interval,
                    once,
                } => rt.block_on(pgsluice::top::run(admin, interval, once)),
                Command::HashPassword => pgsluice::demo::hash_password(),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgsluice: {e:#}");
            ExitCode::from(2)
        }
    }
}
