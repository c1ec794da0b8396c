//! The configurations run in CI and by `benches/difftest`.

use super::run::{secs_from_env, Config, Faults, Mode};

/// Short timeouts so that faults resolve within the run (as in the soak).
const FAULT_FLAGS: &[&str] = &[
    "--queue-timeout",
    "2s",
    "--connect-timeout",
    "1s",
    "--health-interval",
    "200ms",
    "--cancel-grace",
    "1s",
    "--breaker-cooldown",
    "200ms",
    "--breaker-max-cooldown",
    "1s",
];

const CLIENT_FAULTS: Faults = Faults {
    cancel: true,
    kill: true,
    terminate: false,
    restart: false,
};

pub fn all() -> Vec<Config> {
    use Mode::*;
    let mut v = Vec::new();
    // The oracle against PostgreSQL itself: must be 100 % correct.
    let mut c = Config::new("direct_baseline", Direct, Some(4), None);
    c.faults = CLIENT_FAULTS;
    c.secs = secs_from_env(6.0);
    v.push(c);
    // The oracle's judgment of server faults, against PostgreSQL itself.
    let mut c = Config::new("direct_terminate", Direct, Some(4), None);
    c.faults = Faults {
        terminate: true,
        ..CLIENT_FAULTS
    };
    c.secs = secs_from_env(6.0);
    v.push(c);
    // Pool size equal to, below and above max-active. The first two with brief operations
    // only: 16 clients on 4 connections is a load the proxy must serve without refusing
    // anything (issue 16: pgbench -c 16 over --pool-size 4, 0 failed).
    let mut c = Config::new("txn_pool4_equal", Transaction, Some(4), Some(4));
    c.short = true;
    c.shed_fails = true;
    v.push(c);
    let mut c = Config::new("txn_pool_below_active", Transaction, Some(4), Some(8));
    c.short = true;
    c.shed_fails = true;
    v.push(c);
    let mut c = Config::new("txn_pool_above_active", Transaction, Some(8), Some(4));
    c.faults = CLIENT_FAULTS;
    v.push(c);
    // Tiny pools with 32 clients. On one connection 32 clients queue far longer than the
    // standing-queue target, but nobody gives up: a stable queue, which the guard's
    // defaults must serve without refusing anything.
    let mut c = Config::new("txn_tiny_pool1", Transaction, Some(1), None);
    c.clients = 32;
    c.short = true;
    c.shed_fails = true;
    v.push(c);
    // The full mix on two connections, with client kills: a killed client's query is
    // wasted work, which switches standing-queue shedding on by design, so that rule is off
    // here and every query, the slow ones included, must get its turn within 8 s.
    let mut c = Config::new("txn_tiny_pool2", Transaction, Some(2), None);
    c.clients = 32;
    c.faults = CLIENT_FAULTS;
    c.shed_fails = true;
    c.flags = vec!["--codel-interval", "0", "--queue-timeout", "8s"];
    v.push(c);
    // The guard's defaults: pool 20, max-active = pool, 80 clients.
    v.push(Config::new("txn_defaults", Transaction, None, None));
    // Session mode holds a server per client: as many clients as connections, or more
    // clients that come and go (a client that waits past --queue-timeout gets 53400).
    let mut c = Config::new("session_equal", Session, Some(8), None);
    c.clients = 8;
    c.faults = CLIENT_FAULTS;
    v.push(c);
    let mut c = Config::new("session_oversubscribed", Session, Some(4), None);
    c.churn = Some((3, 15));
    v.push(c);
    // Server-side faults.
    let mut c = Config::new("txn_faults_terminate", Transaction, Some(4), None);
    c.faults = Faults {
        terminate: true,
        ..CLIENT_FAULTS
    };
    c.flags = FAULT_FLAGS.to_vec();
    v.push(c);
    let mut c = Config::new("txn_faults_restart", Transaction, Some(4), None);
    c.faults = Faults {
        restart: true,
        ..CLIENT_FAULTS
    };
    c.flags = FAULT_FLAGS.to_vec();
    v.push(c);
    let mut c = Config::new("session_faults", Session, Some(8), None);
    c.clients = 8;
    c.faults = Faults {
        terminate: true,
        restart: true,
        ..CLIENT_FAULTS
    };
    c.flags = FAULT_FLAGS.to_vec();
    v.push(c);
    // Every session, relay and guard wake-up on one current-thread runtime (`--threads 1`),
    // with client and server faults: nothing may rely on a second worker to make progress.
    let mut c = Config::new("txn_one_thread", Transaction, Some(4), None);
    c.faults = Faults {
        terminate: true,
        ..CLIENT_FAULTS
    };
    c.flags = [FAULT_FLAGS, &["--threads", "1"]].concat();
    v.push(c);
    // The upstream as two hosts (one server under two names): role checks, host choice and
    // the re-check of pooled connections, with server faults and restarts.
    let mut c = Config::new("txn_two_hosts", Transaction, Some(4), None);
    c.faults = Faults {
        terminate: true,
        restart: true,
        ..CLIENT_FAULTS
    };
    c.flags = FAULT_FLAGS.to_vec();
    c.two_hosts = true;
    v.push(c);
    v
}

pub fn by_name(name: &str) -> Option<Config> {
    all().into_iter().find(|c| c.name == name)
}
