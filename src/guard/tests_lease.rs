//! Slots and server-connection leases granted as one decision: a client holding a
//! connection only ever waits for a slot, and slots are never held by anyone waiting for a
//! connection, so clients in a transaction always finish.

use std::sync::Arc;
use std::time::Duration;

use super::tests_core::{cfg, ms, req, Got, Sim};
use super::{AdmitRequest, ShedReason};

/// A new query of a client that holds no server connection of `pool` (capacity `cap`).
fn fresh(identity: &str, client: u64, pool: &str, cap: usize) -> AdmitRequest {
    let mut r = req(identity, client);
    r.pool = Arc::from(pool);
    r.lease = true;
    r.capacity = cap;
    r
}

/// A statement inside an open transaction: the client holds its connection already.
fn in_tx(identity: &str, client: u64, pool: &str) -> AdmitRequest {
    let mut r = req(identity, client);
    r.pool = Arc::from(pool);
    r.in_transaction = true;
    r
}

/// Bug 1 in miniature: pool of 2, limit 2, two clients inside transactions holding both
/// connections, more clients arriving. Nobody may take a slot while waiting for a
/// connection, so the transactions' next statements run at once.
#[test]
fn statements_of_open_transactions_never_wait_behind_connection_waiters() {
    let mut s = Sim::new(cfg(2));
    // Two BEGINs: slot + lease each; the slots come back at ReadyForQuery('T').
    let mut a = s.must_grant(fresh("app", 1, "db/u", 2));
    let mut b = s.must_grant(fresh("app", 2, "db/u", 2));
    a.lease = false; // the sessions keep their leases with their connections
    b.lease = false;
    s.release(&a);
    s.release(&b);
    // Six new clients: slots are free but no connection is, so they queue holding nothing.
    for c in 3..9 {
        s.must_queue(fresh("app", c, "db/u", 2), c);
    }
    assert_eq!(s.core.active(), 0, "no slot held by a connection waiter");
    // The open transactions' statements get slots immediately.
    let a2 = s.must_grant(in_tx("app", 1, "db/u"));
    let b2 = s.must_grant(in_tx("app", 2, "db/u"));
    s.release(&a2);
    s.release(&b2);
    assert!(s.drain().is_empty(), "nothing freed a connection yet");
    // COMMIT of client 1 ends its transaction: its connection goes back, the oldest waiter
    // gets slot and connection together.
    let commit = s.must_grant(in_tx("app", 1, "db/u"));
    s.release(&commit);
    s.core.release_lease("db/u", s.now, &mut s.out);
    let got = s.drain();
    assert_eq!(got.len(), 1);
    let (tok, res) = &got[0];
    assert_eq!(*tok, 3);
    let g = res.as_ref().expect("granted");
    assert!(g.slot && g.lease);
}

/// A pool out of connections does not hold up another pool of the same upstream.
#[test]
fn a_full_pool_does_not_block_another_pool() {
    let mut s = Sim::new(cfg(4));
    let mut a = s.must_grant(fresh("x", 1, "one/u", 1));
    a.lease = false;
    s.release(&a);
    s.must_queue(fresh("x", 2, "one/u", 1), 2);
    // Same identity, other pool: served at once although an older waiter exists.
    let g = s.must_grant(fresh("x", 3, "two/u", 1));
    assert!(g.lease);
    s.release(&g);
    // Releasing pool one's lease serves its waiter.
    s.core.release_lease("one/u", s.now, &mut s.out);
    let got = s.drain();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 2);
}

/// Logins wait for a connection only, ahead of new queries, and time out like any waiter.
#[test]
fn logins_wait_for_a_connection_without_a_slot() {
    let mut s = Sim::new(cfg(1));
    let mut held = s.must_grant(fresh("x", 1, "db/u", 1));
    held.lease = false;
    let mut login = fresh("x", 2, "db/u", 1);
    login.slot = false;
    s.must_queue(login.clone(), 2);
    s.must_queue(fresh("x", 3, "db/u", 1), 3);
    // The slot frees but the connection does not: neither can go.
    s.release(&held);
    assert!(s.drain().is_empty());
    // The connection frees: the login goes first and takes no slot.
    s.core.release_lease("db/u", s.now, &mut s.out);
    let got = s.drain();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 2);
    let g = got[0].1.as_ref().expect("login granted");
    assert!(!g.slot && g.lease);
    assert_eq!(s.core.active(), 0);
    // A second login finds no connection and times out as `queue_timeout`.
    s.must_queue(login, 4);
    s.advance(Duration::from_secs(6));
    s.expire();
    let got = s.drain();
    assert!(got
        .iter()
        .any(|(t, r)| *t == 4 && matches!(r, Err(ShedReason::QueueTimeout))));
}

/// Connection waiters behind clients idle in a transaction are not shed as a standing
/// queue: the database is idle, refusing them relieves nothing.
#[test]
fn waiters_behind_idle_transactions_are_not_shed_by_codel() {
    let mut s = Sim::new(cfg(4));
    let mut a = s.must_grant(fresh("x", 1, "db/u", 1));
    a.lease = false;
    s.release(&a);
    s.core.record_waste(s.now);
    s.must_queue(fresh("x", 2, "db/u", 1), 2);
    for _ in 0..10 {
        s.advance(ms(100));
        s.expire();
    }
    assert!(
        s.drain().is_empty(),
        "waiter shed while the database was idle"
    );
    assert!(matches!(s.admit(in_tx("x", 1, "db/u"), 9), Got::Granted(_)));
}
