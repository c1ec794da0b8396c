//! The async guard on tokio's paused clock.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::poll;

use super::tests_core::req;
use super::{Guard, GuardConfig, ShedReason};

fn guard(limit: usize, max_queue: usize) -> Arc<Guard> {
    Guard::new(GuardConfig {
        max_active: limit,
        max_queue,
        // Keep CoDel out of tests about plain queueing.
        codel_interval: Duration::from_secs(3600),
        ..GuardConfig::default()
    })
}

#[tokio::test(start_paused = true)]
async fn free_slot_admits_at_once() {
    let g = guard(2, 10);
    let p = g.admit(req("a", 1)).await.expect("admitted");
    assert_eq!(p.waited(), Duration::ZERO);
    assert_eq!(g.snapshot().active, 1);
    drop(p);
    assert_eq!(g.snapshot().active, 0);
}

#[tokio::test(start_paused = true)]
async fn release_wakes_the_next_waiter() {
    let g = guard(1, 10);
    let held = g.admit(req("a", 1)).await.unwrap();
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.admit(req("a", 2)).await.map(|p| p.waited()) });
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(g.snapshot().queued, 1);
    drop(held);
    let waited = waiter.await.unwrap().expect("admitted after release");
    assert_eq!(waited, Duration::from_millis(30));
    assert_eq!(
        g.snapshot().active,
        0,
        "the waiter's permit was dropped with its task"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_a_queued_admit_frees_its_place() {
    let g = guard(1, 1);
    let _held = g.admit(req("a", 1)).await.unwrap();
    {
        let mut fut = pin!(g.admit(req("a", 2)));
        assert!(poll!(fut.as_mut()).is_pending());
        assert_eq!(g.snapshot().queued, 1);
        let third = g.admit(req("a", 3)).await.unwrap_err();
        assert_eq!(third.reason, ShedReason::QueueFull);
    }
    assert_eq!(g.snapshot().queued, 0, "dropped waiter left the queue");
    let mut fut = pin!(g.admit(req("a", 4)));
    assert!(poll!(fut.as_mut()).is_pending(), "its place is free again");
}

#[tokio::test(start_paused = true)]
async fn slot_granted_to_a_dropped_waiter_goes_back() {
    let g = guard(1, 10);
    let held = g.admit(req("a", 1)).await.unwrap();
    let next = {
        let mut fut = pin!(g.admit(req("a", 2)));
        assert!(poll!(fut.as_mut()).is_pending());
        let g2 = g.clone();
        let next = tokio::spawn(async move { g2.admit(req("b", 3)).await.is_ok() });
        tokio::task::yield_now().await;
        assert_eq!(g.snapshot().queued, 2);
        // The slot is granted to the first waiter, which is dropped before it looks.
        drop(held);
        assert_eq!(g.snapshot().active, 1);
        next
    };
    // The granted-but-unclaimed slot went on to the next waiter: no leak, no double grant.
    assert!(next.await.unwrap());
    assert_eq!(g.snapshot().active, 0);
    assert_eq!(g.snapshot().queued, 0);
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_and_client_deadline() {
    let g = guard(1, 10);
    let _held = g.admit(req("a", 1)).await.unwrap();
    let shed = g.admit(req("a", 2)).await.unwrap_err();
    assert_eq!(shed.reason, ShedReason::QueueTimeout);
    assert_eq!(shed.waited, Duration::from_secs(5));
    assert_eq!((shed.active, shed.limit), (1, 1));
    let mut r = req("a", 3);
    r.deadline = Some(tokio::time::Instant::now().into_std() + Duration::from_millis(250));
    let shed = g.admit(r).await.unwrap_err();
    assert_eq!(shed.waited, Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn a_lone_waiter_in_a_standing_queue_is_shed_by_codel() {
    let g = Guard::new(GuardConfig {
        max_active: 1,
        ..GuardConfig::default()
    });
    let _held = g.admit(req("a", 1)).await.unwrap();
    // Some client just gave up: a standing queue is now worth shedding.
    g.record_waste();
    let shed = g.admit(req("a", 2)).await.unwrap_err();
    assert_eq!(shed.reason, ShedReason::StandingQueue);
    assert_eq!(shed.waited, Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn breaker_releases_queued_waiters() {
    let g = guard(1, 10);
    let held = g.admit(req("a", 1)).await.unwrap();
    let mut waiters = Vec::new();
    for i in 0..3 {
        let g2 = g.clone();
        waiters.push(tokio::spawn(async move {
            g2.admit(req("a", 10 + i)).await.map(|_| ())
        }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(g.snapshot().queued, 3);
    for _ in 0..5 {
        g.record_failure();
    }
    assert_eq!(g.circuit_state(), super::CircuitState::Open);
    for w in waiters {
        let shed = w.await.unwrap().unwrap_err();
        assert_eq!(shed.reason, ShedReason::CircuitOpen);
        assert_eq!(shed.waited, Duration::from_millis(10));
    }
    assert_eq!(
        g.admit(req("a", 20)).await.unwrap_err().reason,
        ShedReason::CircuitOpen
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(g.circuit_state(), super::CircuitState::HalfOpen);
    let probe = g.admit(req("a", 21)).await.unwrap();
    assert!(probe.is_probe());
    assert_eq!(
        g.admit(req("a", 22)).await.unwrap_err().reason,
        ShedReason::CircuitOpen
    );
    g.record_success();
    drop(probe);
    assert_eq!(g.circuit_state(), super::CircuitState::Closed);
    assert!(g.admit(req("a", 23)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn pause_holds_and_resume_wakes() {
    let g = guard(4, 10);
    let running = g.admit(req("a", 1)).await.unwrap();
    g.pause();
    assert!(g.is_paused());
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.admit(req("a", 2)).await.map(|p| p.waited()) });
    tokio::time::sleep(Duration::from_millis(40)).await;
    assert_eq!(g.snapshot().queued, 1);
    g.resume();
    assert_eq!(waiter.await.unwrap().unwrap(), Duration::from_millis(40));
    drop(running);
    g.pause();
    let shed = g.admit(req("a", 3)).await.unwrap_err();
    assert_eq!(shed.reason, ShedReason::Paused);
    assert_eq!(shed.message(), "pgsluice: paused");
}

#[tokio::test(start_paused = true)]
async fn live_reload_raises_the_limit_for_waiters() {
    let g = guard(1, 10);
    let _held = g.admit(req("a", 1)).await.unwrap();
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.admit(req("a", 2)).await.is_ok() });
    tokio::time::sleep(Duration::from_millis(5)).await;
    g.update_config(GuardConfig {
        max_active: 2,
        codel_interval: Duration::from_secs(3600),
        ..GuardConfig::default()
    });
    assert!(waiter.await.unwrap());
    assert_eq!(g.snapshot().limit, 2);
}

#[test]
fn guard_and_permit_are_shareable() {
    fn send_sync<T: Send + Sync>() {}
    fn send_static<T: Send + 'static>() {}
    send_sync::<Guard>();
    send_static::<super::Permit>();
}
