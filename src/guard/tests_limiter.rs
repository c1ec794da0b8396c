//! The adaptive limiter against a simulated database, on a fake clock: bounds, recovery
//! after a latency spike, steadiness on a steady load, and convergence to a knee that moves.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::limiter::{AdaptiveConfig, Limiter, Sample};

/// A database that scales linearly up to `knee` running queries; past it each query takes
/// `1 + fall * (running - knee)^2` times as long (contention: every extra query slows all
/// the others), so throughput peaks a little past the knee and then falls.
#[derive(Clone, Copy, Debug)]
struct Db {
    knee: f64,
    /// Running time of a query alone, seconds.
    service: f64,
    fall: f64,
    /// Multiplies every running time (a latency spike, a side load).
    slow: f64,
}

impl Db {
    /// Running time of a query that runs at concurrency `c`.
    fn latency(&self, c: f64) -> f64 {
        let over = (c - self.knee).max(0.0);
        self.slow * self.service * (1.0 + self.fall * over * over)
    }

    fn throughput(&self, c: f64) -> f64 {
        c / self.latency(c)
    }

    /// The concurrency of highest throughput (the best static limit), up to `max`.
    fn best(&self, max: usize) -> usize {
        (1..=max)
            .max_by(|&a, &b| {
                self.throughput(a as f64)
                    .total_cmp(&self.throughput(b as f64))
            })
            .unwrap_or(1)
    }
}

/// A closed loop of `clients` with no think time through one limiter.
struct Sim {
    lim: Limiter,
    now: Instant,
    t0: Instant,
    rng: StdRng,
    clients: usize,
    /// (end, start) of running queries.
    running: BinaryHeap<Reverse<(Instant, Instant)>>,
    noise: f64,
    completed: u64,
    verbose: bool,
}

impl Sim {
    fn new(cfg: AdaptiveConfig, ceiling: usize, clients: usize, seed: u64, noise: f64) -> Sim {
        let t0 = Instant::now();
        let mut lim = Limiter::new(cfg, usize::MAX, "test", t0);
        lim.set_ceiling(ceiling, t0);
        Sim {
            lim,
            now: t0,
            t0,
            rng: StdRng::seed_from_u64(seed),
            clients,
            running: BinaryHeap::new(),
            noise,
            completed: 0,
            verbose: false,
        }
    }

    fn fill(&mut self, db: &Db) {
        while self.running.len() < self.lim.limit().min(self.clients) {
            let c = (self.running.len() + 1) as f64;
            let jitter = 1.0 + self.noise * (self.rng.gen::<f64>() * 2.0 - 1.0);
            let d = Duration::from_secs_f64((db.latency(c) * jitter).max(1e-6));
            self.running.push(Reverse((self.now + d, self.now)));
            self.lim.running(self.running.len(), self.now);
        }
    }

    /// Runs until `secs` of simulated time have passed since the start; calls `each` with
    /// the elapsed seconds and the enforced and base limits after every completion.
    fn run(&mut self, db: Db, secs: f64, mut each: impl FnMut(f64, usize, usize)) {
        let until = self.t0 + Duration::from_secs_f64(secs);
        self.fill(&db);
        while let Some(&Reverse((end, start))) = self.running.peek() {
            if end > until {
                break;
            }
            self.running.pop();
            self.now = end;
            let bound = self.running.len() + 1 >= self.lim.limit();
            let c = self.lim.on_sample(
                Sample {
                    latency: end - start,
                    bound,
                },
                end,
            );
            if let (Some(c), true) = (c, self.verbose) {
                println!("{:7.2} {c}", (end - self.t0).as_secs_f64());
            }
            self.lim.running(self.running.len(), end);
            self.completed += 1;
            let (l, b) = (self.lim.limit(), self.lim.base());
            each((end - self.t0).as_secs_f64(), l, b);
            self.fill(&db);
        }
        self.now = until;
    }
}

fn cfg(min: usize, max: usize) -> AdaptiveConfig {
    AdaptiveConfig { min, max }
}

fn db(knee: f64, fall: f64) -> Db {
    Db {
        knee,
        service: 0.01,
        fall,
        slow: 1.0,
    }
}

/// (min, max) of the base limit over the simulated seconds `[from, to)`.
fn base_range(sim: &mut Sim, d: Db, from: f64, to: f64) -> (usize, usize) {
    let (mut lo, mut hi) = (usize::MAX, 0);
    sim.run(d, to, |t, _, b| {
        if t >= from {
            lo = lo.min(b);
            hi = hi.max(b);
        }
    });
    (lo, hi)
}

/// The base limit is within reach of the best static limit: no lower than 0.6 of it, no
/// higher than 1.6 of it plus one.
fn near(base: (usize, usize), best: usize) -> bool {
    base.0 as f64 >= best as f64 * 0.6 && base.1 as f64 <= best as f64 * 1.6 + 1.0
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever the database, the load and the noise, the limit in force stays within
    /// [min, max], and never above the pools' capacity.
    #[test]
    fn stays_within_bounds(
        min in 1usize..6,
        span in 0usize..30,
        ceiling in 1usize..40,
        clients in 1usize..80,
        knee in 1.0f64..40.0,
        fall in 0.0f64..0.5,
        noise in 0.0f64..0.5,
        seed in any::<u64>(),
    ) {
        let max = min + span;
        let hi = max.min(ceiling);
        let lo = min.min(hi);
        let mut sim = Sim::new(cfg(min, max), ceiling, clients, seed, noise);
        let mut bad = None;
        sim.run(db(knee, fall), 20.0, |t, l, b| {
            if !(lo..=hi).contains(&l) || !(lo..=hi).contains(&b) {
                bad.get_or_insert((t, l, b));
            }
        });
        prop_assert!(bad.is_none(), "limit out of [{lo}, {hi}]: {bad:?}");
        prop_assert!(sim.completed > 0);
    }

    /// On a steady load the base limit settles near the best static limit and then moves
    /// within a set band: no more than half of it (at least 2) between lowest and highest.
    #[test]
    fn steady_load_does_not_oscillate(
        knee in 4u32..24,
        fall in 0.02f64..0.2,
        noise in 0.0f64..0.2,
        seed in any::<u64>(),
    ) {
        let d = db(f64::from(knee), fall);
        let best = d.best(48);
        let mut sim = Sim::new(cfg(1, 48), 48, 200, seed, noise);
        // From a minute on: the way down from 48 is `falls_fast_from_the_top`'s business.
        let (lo, hi) = base_range(&mut sim, d, 60.0, 120.0);
        let band = best.div_ceil(2).max(2);
        prop_assert!(hi - lo <= band, "base moved over [{lo}, {hi}] (best {best}, band {band})");
        prop_assert!(near((lo, hi), best), "base [{lo}, {hi}] far from the best {best}");
    }

    /// A database that scales up to the ceiling: a ten-fold latency spike of two seconds
    /// may pull the limit down, but it is back within a step of the ceiling soon after.
    #[test]
    fn recovers_after_a_latency_spike(
        ceiling in 4usize..32,
        spike_at in 10.0f64..20.0,
        noise in 0.0f64..0.2,
        seed in any::<u64>(),
    ) {
        let mut sim = Sim::new(cfg(1, 64), ceiling, 200, seed, noise);
        let linear = db(1000.0, 0.0);
        sim.run(linear, spike_at, |_, _, _| {});
        sim.run(Db { slow: 10.0, ..linear }, spike_at + 2.0, |_, _, _| {});
        let (lo, _) = base_range(&mut sim, linear, spike_at + 22.0, spike_at + 40.0);
        let near = ceiling - (ceiling / 4).max(1);
        prop_assert!(lo >= near, "base {lo} after the spike, ceiling {ceiling}");
    }

    /// When capacity drops (the knee moves down) the limit follows it down within 10 s,
    /// and when capacity returns it climbs back within 20 s.
    #[test]
    fn converges_down_past_a_knee_and_back_up(
        high in 12u32..24,
        low in 2u32..6,
        noise in 0.0f64..0.15,
        seed in any::<u64>(),
    ) {
        let (up, down) = (db(f64::from(high), 0.05), db(f64::from(low), 0.05));
        let (best_up, best_down) = (up.best(40), down.best(40));
        let mut sim = Sim::new(cfg(1, 40), 40, 200, seed, noise);
        sim.run(up, 30.0, |_, _, _| {});
        let r = base_range(&mut sim, down, 40.0, 60.0);
        prop_assert!(near(r, best_down), "base {r:?} 10 s after the best fell to {best_down}");
        let (lo, _) = base_range(&mut sim, up, 80.0, 100.0);
        prop_assert!(lo as f64 >= best_up as f64 * 0.6,
            "base {lo} 20 s after the best came back to {best_up}");
    }
}

/// The limiter holds still when the clients do not use the limit: fewer clients than
/// slots is no reason to go up, or down.
#[test]
fn app_limited_load_moves_nothing() {
    let mut sim = Sim::new(cfg(2, 32), 32, 5, 7, 0.1);
    let (lo, hi) = base_range(&mut sim, db(1000.0, 0.0), 0.0, 30.0);
    assert_eq!((lo, hi), (32, 32));
}

/// A limit that is not what slows the database (queries take as long at fewer slots, as
/// with `pg_sleep`): after a first look below, no more probes down; they would only cost.
#[test]
fn no_probing_down_where_nothing_queues() {
    let mut sim = Sim::new(cfg(1, 64), 8, 200, 5, 0.02);
    let mut probes_late = 0;
    let mut first = None;
    sim.run(db(1000.0, 0.0), 55.0, |t, l, b| {
        if l < b {
            first.get_or_insert(t);
            if t > 10.0 {
                probes_late += 1;
            }
        }
    });
    assert!(first.is_some(), "never looked below the ceiling");
    assert_eq!(
        probes_late, 0,
        "kept probing down a database that does not queue"
    );
    assert_eq!(sim.lim.base(), 8);
}

/// Far too high a start (40) on a database whose best is 5 (0.7 s per query at 40): down
/// near the best within ten seconds.
#[test]
fn falls_fast_from_the_top() {
    let d = db(2.0, 0.05);
    let best = d.best(40);
    let mut sim = Sim::new(cfg(1, 40), 40, 200, 3, 0.05);
    let mut reached = None;
    sim.run(d, 30.0, |t, _, b| {
        if near((b, b), best) && reached.is_none() {
            reached = Some(t);
        }
    });
    let t = reached.expect("never came near the best limit");
    assert!(t < 10.0, "took {t:.1} s to come near the best limit {best}");
}

/// Through the admission core: the limit never exceeds what the pool's connections allow,
/// a grant never takes a slot above the limit in force, and a database past its knee at 2
/// running queries brings a pool of 6 down towards it.
#[test]
fn the_core_follows_the_limiter_within_the_pools_capacity() {
    use super::tests_core::{req, Sim as CoreSim};
    use super::GuardConfig;
    let c = GuardConfig {
        adaptive: Some(cfg(1, 64)),
        ..GuardConfig::default()
    };
    let mut s = CoreSim::new(c);
    let t0 = s.now;
    let mut r = req("a", 0);
    r.lease = true;
    r.capacity = 6;
    // (end, grant) of running queries; 40 clients in a closed loop.
    let mut running: Vec<(Instant, super::core::Grant)> = Vec::new();
    let latency = |active: usize| {
        let over = active.saturating_sub(2) as f64;
        Duration::from_secs_f64(0.01 * (1.0 + 0.5 * over * over))
    };
    let first = s.must_grant(r);
    assert_eq!(s.core.limit(), 6, "a pool of 6 caps the limit");
    running.push((s.now + latency(1), first));
    for client in 1..40 {
        let before = s.core.limit();
        if let super::tests_core::Got::Granted(g) = s.admit(req("a", client), client) {
            assert!(s.core.active() <= before);
            running.push((s.now + latency(s.core.active()), g));
        }
    }
    let mut lowest = usize::MAX;
    while s.now < t0 + Duration::from_secs(30) {
        running.sort_by_key(|(end, _)| *end);
        let (end, mut g) = running.remove(0);
        s.now = end;
        g.set_running(latency(s.core.active()));
        let limit = s.core.limit();
        s.release(&g);
        // The client comes straight back.
        if let super::tests_core::Got::Granted(g) = s.admit(req("a", 0), 0) {
            running.push((s.now + latency(s.core.active()), g));
        }
        for (_, outcome) in s.drain() {
            let g = outcome.expect("no shedding in a stable closed loop");
            assert!(
                s.core.active() <= limit.max(s.core.limit()),
                "granted above the limit"
            );
            running.push((s.now + latency(s.core.active()), g));
        }
        assert!(
            s.core.limit() <= 6,
            "limit {} above the pool",
            s.core.limit()
        );
        lowest = lowest.min(s.core.limit());
        assert_eq!(s.core.active(), running.len());
    }
    assert!(
        s.core.base_limit() <= 4,
        "base limit {} after 30 s past a knee at 2 (lowest {lowest})",
        s.core.base_limit()
    );
}

#[test]
#[ignore]
fn debug_trace() {
    let env = |k: &str, d: f64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (k1, k2, fall) = (env("K1", 18.0), env("K2", 2.0), env("FALL", 0.05));
    let seed = std::env::var("SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut sim = Sim::new(cfg(1, 40), 40, 200, seed, env("NOISE", 0.05));
    sim.verbose = true;
    let mut show = |_: f64, _: usize, _: usize| {};
    sim.run(db(k1, fall), 30.0, &mut show);
    println!("--- knee {k2}");
    sim.run(db(k2, fall), 60.0, &mut show);
}
