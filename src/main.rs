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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgsluice: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Command::Demo { port }) => {
            init_tracing(LogFormat::Text);
            rt.block_on(pgsluice::demo::run(port, cli.flags))
        }
        Some(Command::HashPassword) => pgsluice::demo::hash_password(),
        Some(Command::Top {
            admin,
            interval,
            once,
        }) => rt.block_on(pgsluice::top::run(admin, interval, once)),
        None => match Config::from_flags(cli.flags) {
            Ok(cfg) => {
                init_tracing(cfg.log_format);
                rt.block_on(pgsluice::run::run_until_signal(cfg))
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgsluice: {e:#}");
            ExitCode::from(2)
        }
    }
}
