//! Long runs of the differential workload tester (`tests/differential/`): every
//! configuration, or the named ones, one after another for `--secs` each, against the
//! release build of pgsluice; prints each run's report and a summary table.
//!
//! `cargo bench --bench difftest -- --secs 600 [--seed N] [--config NAME]... [--list]`
//! Exits 1 when any configuration saw a failure, unless `--allow-failures` (the benchmark
//! smoke, which checks the tool runs, not pgsluice).

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/differential/mod.rs"]
mod diff;

use std::process::ExitCode;

struct Args {
    secs: Option<f64>,
    seed: Option<u64>,
    configs: Vec<String>,
    list: bool,
    allow_failures: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        secs: None,
        seed: None,
        configs: Vec::new(),
        list: false,
        allow_failures: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--secs" => {
                a.secs = Some(
                    value("--secs")?
                        .parse()
                        .map_err(|e| format!("--secs: {e}"))?,
                )
            }
            "--seed" => {
                a.seed = Some(
                    value("--seed")?
                        .parse()
                        .map_err(|e| format!("--seed: {e}"))?,
                )
            }
            "--config" => a.configs.push(value("--config")?),
            "--list" => a.list = true,
            "--allow-failures" => a.allow_failures = true,
            // `cargo bench` passes --bench to harness-less targets.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("difftest: {e}");
            return ExitCode::from(2);
        }
    };
    let all = diff::configs::all();
    if args.list {
        for c in &all {
            println!("{}", c.name);
        }
        return ExitCode::SUCCESS;
    }
    let mut selected = Vec::new();
    for name in &args.configs {
        match all.iter().find(|c| c.name == name.as_str()) {
            Some(c) => selected.push(c.clone()),
            None => {
                eprintln!("difftest: unknown configuration {name:?} (see --list)");
                return ExitCode::from(2);
            }
        }
    }
    if selected.is_empty() {
        selected = all;
    }
    let seed = args.seed.unwrap_or_else(diff::seed_from_env);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let reports: Vec<diff::Report> = rt.block_on(async {
        let mut out = Vec::new();
        for mut c in selected {
            if let Some(s) = args.secs {
                c.secs = s;
            }
            let r = diff::run(&c, seed).await;
            println!("{}", r.text());
            out.push(r);
        }
        out
    });
    println!("difftest summary, seed {seed}:\n{}", diff::Report::header());
    for r in &reports {
        println!("{}", r.row());
    }
    let failures: u64 = reports.iter().map(|r| r.failures()).sum();
    if failures > 0 && !args.allow_failures {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
