//! Invariants of the admission core under random operation sequences.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::core::{Admission, Completion, Core, Grant};
use super::tests_core::req;
use super::GuardConfig;

#[derive(Debug, Clone)]
enum Op {
    Arrive {
        ident: u8,
        client: u64,
        tx: bool,
        mid: bool,
        deadline_ms: Option<u64>,
    },
    Release(usize),
    Advance(u64),
    Check(usize),
    Abandon(usize),
    Failure,
    Success,
    Pause,
    Resume,
    SetLimit(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..3, 0u64..40, any::<bool>(), any::<bool>(), proptest::option::of(0u64..400))
            .prop_map(|(ident, client, tx, mid, deadline_ms)| Op::Arrive { ident, client, tx, mid, deadline_ms }),
        4 => any::<usize>().prop_map(Op::Release),
        3 => (0u64..250).prop_map(Op::Advance),
        2 => any::<usize>().prop_map(Op::Check),
        1 => any::<usize>().prop_map(Op::Abandon),
        1 => Just(Op::Failure),
        1 => Just(Op::Success),
        1 => Just(Op::Pause),
        1 => Just(Op::Resume),
        1 => (0usize..5).prop_map(Op::SetLimit),
    ]
}

struct Model {
    core: Core<u64>,
    cfg: GuardConfig,
    now: Instant,
    running: Vec<Grant>,
    /// token -> core waiter id
    waiting: HashMap<u64, u64>,
    settled: HashSet<u64>,
    next_token: u64,
}

impl Model {
    fn settle(&mut self, out: Vec<Completion<u64>>, limit_before: usize, active_before: usize) {
        for c in out {
            assert_eq!(
                self.waiting.remove(&c.payload),
                Some(c.id),
                "unknown or duplicate waiter"
            );
            assert!(self.settled.insert(c.payload), "waiter settled twice");
            if let Ok(g) = c.outcome {
                self.running.push(g);
            }
        }
        let limit = self.cfg.max_active.max(limit_before);
        assert!(
            self.core.active() <= limit.max(active_before),
            "active {} over limit {}",
            self.core.active(),
            limit
        );
        assert_eq!(self.core.active(), self.running.len());
        assert_eq!(self.core.queued(), self.waiting.len());
        let snap = self.core.snapshot(self.now);
        assert_eq!(
            snap.pools.values().map(|p| p.active).sum::<usize>(),
            self.running.len()
        );
        assert_eq!(
            snap.pools.values().map(|p| p.queued).sum::<usize>(),
            self.waiting.len()
        );
        assert_eq!(
            snap.identities.values().map(|i| i.active).sum::<usize>(),
            self.running.len()
        );
    }

    fn nth_waiting(&self, i: usize) -> Option<(u64, u64)> {
        if self.waiting.is_empty() {
            return None;
        }
        let mut v: Vec<(u64, u64)> = self.waiting.iter().map(|(&t, &id)| (t, id)).collect();
        v.sort_unstable();
        Some(v[i % v.len()])
    }

    fn apply(&mut self, op: Op) {
        let (limit_before, active_before) = (self.cfg.max_active, self.core.active());
        let mut out = Vec::new();
        let now = self.now;
        match op {
            Op::Arrive {
                ident,
                client,
                tx,
                mid,
                deadline_ms,
            } => {
                let mut r = req(["a", "b", "c"][ident as usize], client);
                r.in_transaction = tx;
                r.last_admitted = mid.then_some(now);
                r.deadline = deadline_ms.map(|d| now + Duration::from_millis(d));
                let token = self.next_token;
                self.next_token += 1;
                match self.core.admit(r, now, || token) {
                    Admission::Granted(g) => {
                        assert!(
                            self.core.active() <= self.cfg.max_active,
                            "granted over the limit"
                        );
                        self.settled.insert(token);
                        self.running.push(g);
                    }
                    Admission::Shed(_) => {
                        self.settled.insert(token);
                    }
                    Admission::Queued { id, wake_at } => {
                        assert!(wake_at > now, "wake time in the past");
                        self.waiting.insert(token, id);
                    }
                }
            }
            Op::Release(i) => {
                if !self.running.is_empty() {
                    let g = self.running.swap_remove(i % self.running.len());
                    self.core.release(&g, now, &mut out);
                }
            }
            Op::Advance(ms) => self.now += Duration::from_millis(ms),
            Op::Check(i) => {
                if let Some((_, id)) = self.nth_waiting(i) {
                    if let Some(next) = self.core.check(id, now, &mut out) {
                        assert!(next > now, "a waiter not due must wake later");
                    }
                }
            }
            Op::Abandon(i) => {
                if let Some((token, id)) = self.nth_waiting(i) {
                    assert!(self.core.abandon(id, self.now));
                    self.waiting.remove(&token);
                    self.settled.insert(token);
                    assert!(!self.core.abandon(id, self.now), "abandoned twice");
                }
            }
            Op::Failure => self.core.record_failure(now, &mut out),
            Op::Success => self.core.record_success(now),
            Op::Pause => self.core.pause(),
            Op::Resume => self.core.resume(now, &mut out),
            Op::SetLimit(n) => {
                self.cfg.max_active = n;
                self.core.update_config(self.cfg.clone(), now, &mut out);
            }
        }
        self.settle(out, limit_before, active_before);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_waiter_ends_exactly_once_and_the_limit_holds(ops in proptest::collection::vec(op(), 1..120)) {
        let mut cfg = GuardConfig { max_active: 2, max_queue: 6, ..GuardConfig::default() };
        cfg.queue_timeout = Duration::from_millis(300);
        cfg.cohorts = 4;
        cfg.shares.insert("a".into(), 3);
        let now = Instant::now();
        let mut m = Model {
            core: Core::new(cfg.clone(), now),
            cfg,
            now,
            running: Vec::new(),
            waiting: HashMap::new(),
            settled: HashSet::new(),
            next_token: 0,
        };
        for op in ops {
            m.apply(op);
        }
        // Wind down: every waiter must end admitted, timed out or shed.
        m.apply(Op::Resume);
        m.apply(Op::Success);
        if m.cfg.max_active == 0 {
            m.apply(Op::SetLimit(1));
        }
        m.apply(Op::Advance(10_000));
        let mut out = Vec::new();
        m.core.expire_due(m.now, &mut out);
        let (l, a) = (m.cfg.max_active, m.core.active());
        m.settle(out, l, a);
        prop_assert!(m.waiting.is_empty(), "waiters left behind: {:?}", m.waiting);
        // Every request reached exactly one end: admitted, shed, timed out or abandoned.
        prop_assert_eq!(m.settled.len(), m.next_token as usize);
        while !m.running.is_empty() {
            m.apply(Op::Release(0));
        }
        prop_assert_eq!(m.core.active(), 0);
        prop_assert_eq!(m.core.queued(), 0);
    }
}
