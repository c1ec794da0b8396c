//! Bounds of single pools (`[databases.NAME]`, `[users.NAME]`) and per-database pauses,
//! under the upstream's own limit.

use std::sync::Arc;
use std::time::Duration;

use super::tests_core::{cfg, ms, req, Got, Sim};
use super::{AdmitRequest, GuardConfig, PoolLimits, ShedReason};

fn on(pool: &str, identity: &str, client: u64) -> AdmitRequest {
    let mut r = req(identity, client);
    r.pool = Arc::from(pool);
    r
}

fn with_db(limit: usize, db: &str, l: PoolLimits) -> GuardConfig {
    let mut c = cfg(limit);
    c.pools.databases.insert(db.into(), l);
    c.codel_interval = Duration::from_secs(3600);
    c
}

fn register(s: &mut Sim, label: &str, db: &str, user: &str) {
    s.core.register_pool(&Arc::from(label), db, user);
}

#[test]
fn a_pool_cap_holds_its_pool_back_and_leaves_the_rest_of_the_limit_to_others() {
    let l = PoolLimits {
        max_active: Some(1),
        ..PoolLimits::default()
    };
    let mut s = Sim::new(with_db(4, "reports", l));
    register(&mut s, "reports/u", "reports", "u");
    register(&mut s, "app/u", "app", "u");
    let r1 = s.must_grant(on("reports/u", "r", 1));
    s.must_queue(on("reports/u", "r", 2), 2);
    // The upstream still has three slots: other pools use them, ahead of the queued query.
    for c in 3..6 {
        s.must_grant(on("app/u", "a", c));
    }
    assert!(matches!(s.admit(on("app/u", "a", 6), 6), Got::Queued));
    s.advance(ms(1));
    s.release(&r1);
    let done = s.drain();
    assert_eq!(
        done.len(),
        1,
        "the freed slot goes to the pool's own waiter"
    );
    assert_eq!(done[0].0, 2);
    assert_eq!(s.core.snapshot(s.now).pools["reports/u"].limit, 1);
    assert_eq!(s.core.snapshot(s.now).pools["app/u"].limit, 4);
}

#[test]
fn a_user_entry_wins_over_its_database_and_auto_lifts_the_cap() {
    let mut c = with_db(
        8,
        "app",
        PoolLimits {
            max_active: Some(1),
            max_queue: Some(5),
            ..PoolLimits::default()
        },
    );
    let auto = PoolLimits {
        max_active: Some(usize::MAX),
        ..PoolLimits::default()
    };
    c.pools.users.insert("batch".into(), auto);
    let mut s = Sim::new(c);
    register(&mut s, "app/batch", "app", "batch");
    register(&mut s, "app/web", "app", "web");
    let snap = s.core.snapshot(s.now);
    assert_eq!(snap.pools["app/batch"].limit, 8);
    assert_eq!(snap.pools["app/web"].limit, 1);
    let resolved = s.core_limits("app/batch");
    assert_eq!((resolved.max_active, resolved.max_queue), (None, Some(5)));
}

#[test]
fn a_pool_queue_bound_refuses_its_pool_only() {
    let l = PoolLimits {
        max_active: Some(1),
        max_queue: Some(2),
        ..PoolLimits::default()
    };
    let mut s = Sim::new(with_db(10, "reports", l));
    register(&mut s, "reports/u", "reports", "u");
    s.must_grant(on("reports/u", "r", 1));
    s.must_queue(on("reports/u", "r", 2), 2);
    s.must_queue(on("reports/u", "r", 3), 3);
    assert!(matches!(
        s.admit(on("reports/u", "r", 4), 4),
        Got::Shed(ShedReason::QueueFull)
    ));
    // A statement inside a transaction is never refused for length.
    let mut tx = on("reports/u", "r", 5);
    tx.in_transaction = true;
    s.must_queue(tx, 5);
}

#[test]
fn a_pool_queue_timeout_replaces_the_global_one() {
    let l = PoolLimits {
        max_active: Some(1),
        queue_timeout: Some(ms(200)),
        ..PoolLimits::default()
    };
    let mut c = with_db(10, "reports", l);
    c.queue_timeout = Duration::from_secs(30);
    let mut s = Sim::new(c);
    register(&mut s, "reports/u", "reports", "u");
    s.must_grant(on("reports/u", "r", 1));
    s.must_queue(on("reports/u", "r", 2), 2);
    s.advance(ms(199));
    s.expire();
    assert!(s.drain().is_empty());
    s.advance(ms(1));
    s.expire();
    let done = s.drain();
    assert_eq!(done.len(), 1);
    assert!(matches!(done[0], (2, Err(ShedReason::QueueTimeout))));
}

#[test]
fn a_reload_applies_new_pool_bounds_to_waiters_at_once() {
    let l = PoolLimits {
        max_active: Some(1),
        ..PoolLimits::default()
    };
    let mut s = Sim::new(with_db(10, "reports", l));
    register(&mut s, "reports/u", "reports", "u");
    s.must_grant(on("reports/u", "r", 1));
    s.must_queue(on("reports/u", "r", 2), 2);
    let mut c = with_db(
        10,
        "reports",
        PoolLimits {
            max_active: Some(2),
            ..PoolLimits::default()
        },
    );
    c.queue_timeout = Duration::from_secs(5);
    s.core.update_config(c, s.now, &mut s.out);
    let done = s.drain();
    assert_eq!(done.len(), 1, "the raised cap lets the waiter in");
    assert!(done[0].1.is_ok());
}

#[test]
fn pausing_a_database_holds_its_pools_and_lets_open_transactions_finish() {
    let mut s = Sim::new(with_db(10, "other", PoolLimits::default()));
    register(&mut s, "app/u", "app", "u");
    register(&mut s, "other/u", "other", "u");
    s.core.pause_database("app");
    s.must_queue(on("app/u", "a", 1), 1);
    let other = s.must_grant(on("other/u", "o", 2));
    let mut tx = on("app/u", "a", 3);
    tx.in_transaction = true;
    s.must_grant(tx);
    // A pool created after the pause starts paused.
    register(&mut s, "app/late", "app", "late");
    s.must_queue(on("app/late", "l", 4), 4);
    // A login (connection only) waits too.
    let mut login = on("app/u", "a", 5);
    login.slot = false;
    login.lease = true;
    login.capacity = 4;
    s.must_queue(login, 5);
    // A freed slot is not handed to the paused database's waiters.
    s.release(&other);
    assert!(s.drain().is_empty());
    assert_eq!(s.core.paused_databases(), vec!["app".to_string()]);
    s.core.resume_database(Some("app"), s.now, &mut s.out);
    let mut done: Vec<u64> = s
        .drain()
        .into_iter()
        .map(|(t, r)| {
            assert!(r.is_ok());
            t
        })
        .collect();
    done.sort_unstable();
    assert_eq!(done, vec![1, 4, 5]);
}

#[test]
fn a_paused_database_times_out_as_paused_and_resume_all_clears_it() {
    let mut c = with_db(10, "x", PoolLimits::default());
    c.queue_timeout = ms(100);
    let mut s = Sim::new(c);
    register(&mut s, "app/u", "app", "u");
    s.core.pause_database("app");
    s.must_queue(on("app/u", "a", 1), 1);
    s.advance(ms(100));
    s.expire();
    assert!(matches!(s.drain()[..], [(1, Err(ShedReason::Paused))]));
    s.core.resume_database(None, s.now, &mut s.out);
    assert!(s.core.paused_databases().is_empty());
    s.must_grant(on("app/u", "a", 2));
}

#[test]
fn a_pool_share_weighs_its_identities_unless_share_names_them() {
    let mut c = with_db(
        8,
        "big",
        PoolLimits {
            share: Some(3),
            ..PoolLimits::default()
        },
    );
    c.queue_timeout = Duration::from_secs(3600);
    let mut s = Sim::new(c);
    register(&mut s, "big/u", "big", "u");
    register(&mut s, "small/u", "small", "u");
    let mut running = std::collections::VecDeque::new();
    for i in 0..8 {
        let pool = if i % 2 == 0 { "big/u" } else { "small/u" };
        running.push_back(s.must_grant(on(pool, &format!("id-{pool}"), i)));
    }
    for t in 0..300u64 {
        s.must_queue(on("big/u", "id-big/u", 100 + t), 100 + t);
        s.must_queue(on("small/u", "id-small/u", 1000 + t), 1000 + t);
    }
    let mut big = 0u32;
    for _ in 0..400 {
        s.advance(ms(1));
        let g = running.pop_front().unwrap();
        s.release(&g);
        for (_, res) in s.drain() {
            let g = res.expect("granted");
            big += u32::from(&*g.pool == "big/u");
            running.push_back(g);
        }
    }
    let ratio = f64::from(big) / f64::from(400 - big);
    assert!((ratio - 3.0).abs() <= 0.3, "big={big} ratio={ratio}");
    // A reload that names the identity with --share overrides the pool's share.
    let mut c = with_db(
        8,
        "big",
        PoolLimits {
            share: Some(3),
            ..PoolLimits::default()
        },
    );
    c.shares.insert("id-big/u".into(), 1);
    s.core.update_config(c, s.now, &mut s.out);
    let w = s.core.snapshot(s.now).identities["id-big/u"].weight;
    assert_eq!(w, 1);
}

/// Waiters held by a paused database are not a standing queue: with waste seen, another
/// database's young waiter must not be shed because the paused ones have waited long.
#[test]
fn a_paused_databases_old_waiters_do_not_make_the_queue_stand() {
    let mut s = Sim::new(cfg(1));
    register(&mut s, "app/u", "app", "u");
    register(&mut s, "other/u", "other", "u");
    s.core.pause_database("app");
    s.must_queue(on("app/u", "a", 1), 1);
    s.advance(ms(400));
    let _running = s.must_grant(on("other/u", "o", 2));
    s.must_queue(on("other/u", "o", 3), 3);
    // Within one CoDel interval (100 ms) of its own wait, with waste recorded all along.
    for _ in 0..9 {
        s.advance(ms(10));
        s.core.record_waste(s.now);
        s.expire();
        let done = s.drain();
        assert!(
            done.is_empty(),
            "shed while the paused ones waited: {done:?}"
        );
    }
    assert_eq!(s.core.queued(), 2);
}
