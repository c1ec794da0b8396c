//! Adaptive concurrency limit (`--max-active auto`): finds the concurrency past which the
//! database's throughput stops rising, and holds the limit there. Pure: the guard feeds it
//! every completed query (its running time, not its queue time) with an explicit clock.
//!
//! Hill climbing on measured throughput, in windows of completed queries. The limiter runs
//! at a *base* limit and now and then tries one window a step above or below it (a probe),
//! comparing the probe's throughput with the base windows just before and after it (so a
//! slow drift in capacity cancels out). What it compares is *scaling*: the change in
//! throughput as a fraction of the change in concurrency that actually ran. Near 1 the
//! database still scales (more concurrency is worth it); near 0 it is on its plateau (extra
//! queries only queue inside the database); below 0 it is past its knee (lock or CPU
//! contention makes it slower). A step up is kept when it scaled at least half as well as
//! linear; a step down when it lost at most a quarter of linear. Between those the limit
//! stays, and probes become rarer (down to one in `MAX_HOLD` windows) until throughput
//! shifts. See docs/DESIGN.md, "Adaptive limit", for why not a latency baseline.
//!
//! A window starts measuring one recent running time after its limit took effect (queries
//! started under the previous limit would blur the comparison), and a window in which the
//! limit was not binding (the clients did not use it) decides nothing: the limit never
//! creeps up on an idle or client-bound database, nor moves on a closed loop of fewer
//! clients. Noise, capacity shifts and the latency gate on probes down: docs/DESIGN.md.

use std::time::{Duration, Instant};

mod types;

use types::LimiterMetrics;
pub(crate) use types::{Change, Decision, Dir, Sample, Stats};

/// Bounds of the adaptive limit (`--max-active-min`, `--max-active-max`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdaptiveConfig {
    pub min: usize,
    /// Never above the server connections the pools may lease, whatever this says.
    pub max: usize,
}

/// A window closes after this long at least: long enough that scheduler noise and a single
/// slow query average out, short enough to follow a capacity change within seconds.
const MIN_WINDOW: Duration = Duration::from_millis(250);
/// ... and after this many counted completions, and one per slot, at least.
const MIN_SAMPLES: u32 = 16;
/// A window that has not filled by then is judged with what it has, or not at all.
const MAX_WINDOW: Duration = Duration::from_secs(10);
/// The fewest completions a window may be judged on.
const MIN_JUDGED: u32 = 6;
/// Probe step, as a fraction of the base limit (at least 1): big enough that the change in
/// throughput stands out of the window-to-window noise, even at a limit of 16.
const STEP: f64 = 0.25;
/// Keep a step up that scaled at least this well (fraction of linear).
const KEEP_UP: f64 = 0.5;
/// Keep a step down that lost at most this much (fraction of linear).
const KEEP_DOWN: f64 = 0.25;
/// Most base windows between probes once both directions were refused.
const MAX_HOLD: u32 = 16;
/// A base window whose throughput differs from the running average by more than this
/// fraction means the database changed: probe again at once.
const SHIFT: f64 = 0.3;
/// How long the running time seen at a limit is remembered.
const LATENCY_MEMORY: Duration = Duration::from_secs(60);
/// Window-to-window noise assumed before any was measured.
const INITIAL_NOISE: f64 = 0.05;
/// A probe whose concurrency changed by less than this fraction tells nothing.
const MIN_MOVE: f64 = 0.05;

/// One window: from `start` (when its limit took effect) the first `settle` is skipped,
/// while queries started under the previous limit drain; then completions are counted and
/// the running queries integrated over time.
struct Window {
    start: Instant,
    settle: Duration,
    n: u32,
    bound: u32,
    sum_latency: f64,
    /// Running queries integrated over the measured part (query-seconds), up to `last`.
    area: f64,
    last: Instant,
    running: usize,
}

impl Window {
    fn new(start: Instant, settle: Duration, running: usize) -> Self {
        Window {
            start,
            settle,
            n: 0,
            bound: 0,
            sum_latency: 0.0,
            area: 0.0,
            last: start + settle,
            running,
        }
    }

    fn measured_from(&self) -> Instant {
        self.start + self.settle
    }

    /// Integrates the running count up to `now` (nothing during the settle time).
    fn advance(&mut self, now: Instant) {
        if now > self.last {
            self.area += self.running as f64 * (now - self.last).as_secs_f64();
            self.last = now;
        }
    }
}

pub(crate) struct Limiter {
    cfg: AdaptiveConfig,
    /// Server connections the pools may lease in all (the limit's hard ceiling).
    ceiling: usize,
    base: usize,
    /// Limit in force: `base`, or the probe's during a probe window.
    limit: usize,
    probing: Option<Dir>,
    window: Window,
    /// How long a new limit takes to settle: the running time of recent queries.
    settle: Duration,
    /// The bound base window before the current probe (or the last one).
    before: Option<Stats>,
    /// A finished probe waiting for the base window after it.
    pending: Option<(Dir, Stats, Stats)>,
    next_dir: Dir,
    /// Base windows to wait before the next probe.
    hold: u32,
    /// `hold` after the next refusal in both directions.
    backoff: u32,
    refusals: u32,
    /// Consecutive kept steps in one direction (bigger steps while they last).
    streak: u32,
    last_kept: Option<Dir>,
    /// Running average of base-window throughput.
    avg: Option<f64>,
    /// Lowest mean running time of judged windows at each limit, and when it was last seen
    /// (entries older than `LATENCY_MEMORY` are forgotten). Only used to skip probes down
    /// while a lower limit was not faster.
    latency_at: std::collections::BTreeMap<usize, (f64, Instant)>,
    /// Typical relative difference in throughput between two base windows in a row: what
    /// a probe's effect must exceed to count (a busy machine's windows differ by tens of
    /// percent; the limit must not random-walk on that).
    noise: f64,
    /// A base window deviated from `avg` by more than a shift; one more in a row confirms.
    shift_seen: bool,
    /// The first window after a start or new bounds was seen (it measures the ramp-up
    /// from idle, not the limit).
    warm: bool,
    m: LimiterMetrics,
}

impl Limiter {
    /// `start`: the ceiling until the pools report their capacity (the configured pool
    /// size; the first lease replaces it).
    pub(crate) fn new(cfg: AdaptiveConfig, start: usize, upstream: &str, now: Instant) -> Self {
        let mut l = Limiter {
            ceiling: start.max(1),
            base: 0,
            limit: 0,
            probing: None,
            window: Window::new(now, Duration::ZERO, 0),
            settle: Duration::ZERO,
            before: None,
            pending: None,
            next_dir: Dir::Down,
            hold: 0,
            backoff: 1,
            refusals: 0,
            streak: 0,
            last_kept: None,
            avg: None,
            noise: INITIAL_NOISE,
            latency_at: Default::default(),
            shift_seen: false,
            warm: false,
            m: LimiterMetrics::new(upstream),
            cfg,
        };
        // Start at the top: a new pool behaves like a static limit of its size (what a user
        // coming from PgBouncer expects) until the database shows it does not scale.
        l.base = l.hi();
        l.limit = l.base;
        l.m.base.set(l.base as f64);
        l
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn base(&self) -> usize {
        self.base
    }

    fn hi(&self) -> usize {
        self.cfg.max.min(self.ceiling).max(1)
    }

    fn lo(&self) -> usize {
        self.cfg.min.clamp(1, self.hi())
    }

    /// New bounds (reload); the limit moves into them at once.
    pub(crate) fn reconfigure(&mut self, cfg: AdaptiveConfig, now: Instant) -> Option<Change> {
        self.cfg = cfg;
        self.rebound(now)
    }

    /// The pools may lease `ceiling` server connections in all.
    pub(crate) fn set_ceiling(&mut self, ceiling: usize, now: Instant) -> Option<Change> {
        if ceiling == self.ceiling {
            return None;
        }
        // A first (or bigger) pool: its connections are worth trying, from the top.
        let grew = ceiling > self.ceiling || self.ceiling == usize::MAX;
        let was_top = self.base >= self.hi();
        self.ceiling = ceiling;
        if grew && was_top {
            self.base = self.hi();
        }
        self.rebound(now)
    }

    fn rebound(&mut self, now: Instant) -> Option<Change> {
        self.base = self.base.clamp(self.lo(), self.hi());
        self.probing = None;
        self.pending = None;
        self.before = None;
        self.warm = false;
        self.m.base.set(self.base as f64);
        self.apply(self.base, Decision::Bounds, None, None, now)
    }

    /// Sets the enforced limit and starts a new window.
    fn apply(
        &mut self,
        to: usize,
        decision: Decision,
        window: Option<Stats>,
        scaling: Option<f64>,
        now: Instant,
    ) -> Option<Change> {
        let from = self.limit;
        self.limit = to;
        self.window.advance(now);
        let settle = if from == to {
            Duration::ZERO
        } else {
            self.settle
        };
        self.window = Window::new(now, settle, self.window.running);
        (from != to).then_some(Change {
            from,
            to,
            decision,
            window,
            scaling,
        })
    }

    fn count(&self, d: Decision) {
        self.m.decisions[d.index()].increment(1);
    }

    /// The number of running queries changed to `running` (a grant or a release).
    pub(crate) fn running(&mut self, running: usize, now: Instant) {
        self.window.advance(now);
        self.window.running = running;
    }

    /// A query finished (call before `running` reports its release). Returns the change of
    /// limit it caused, if any.
    pub(crate) fn on_sample(&mut self, s: Sample, now: Instant) -> Option<Change> {
        self.window.advance(now);
        // Recent running time (what a new limit needs to take effect), however windows end.
        self.settle = (self.settle * 7 + s.latency.min(MAX_WINDOW)) / 8;
        if now <= self.window.measured_from() {
            return None;
        }
        let w = &mut self.window;
        w.n += 1;
        w.bound += u32::from(s.bound);
        w.sum_latency += s.latency.as_secs_f64();
        let span = now.saturating_duration_since(w.measured_from());
        let need = MIN_SAMPLES.max(self.limit as u32);
        let mean = w.sum_latency / f64::from(w.n);
        let long_enough = span.as_secs_f64() >= MIN_WINDOW.as_secs_f64().max(2.0 * mean);
        if !(w.n >= need && long_enough) && span < MAX_WINDOW {
            return None;
        }
        let judged = w.n >= MIN_JUDGED && 2 * w.bound >= w.n;
        let secs = span.as_secs_f64();
        // Throughput by Little's law, running queries over running time, rather than
        // completions over time: queries of a closed loop finish in waves of `limit`, and a
        // window a few running times long would count a whole wave more or less by chance.
        let stats = (judged && secs > 0.0 && mean > 0.0).then(|| Stats {
            limit: self.limit,
            throughput: w.area / secs / mean,
            inflight: w.area / secs,
            latency: mean,
        });
        if let Some(st) = stats {
            self.remember_latency(&st, now);
            self.m.throughput.set(st.throughput);
            self.m.inflight.set(st.inflight);
            self.m.latency.set(st.latency);
        }
        self.close(stats, now)
    }

    fn close(&mut self, stats: Option<Stats>, now: Instant) -> Option<Change> {
        let Some(st) = stats else {
            // The clients did not use the limit (or too few queries finished): nothing to
            // learn, and a probe in progress is abandoned.
            self.count(Decision::AppLimited);
            self.before = None;
            self.pending = None;
            self.probing = None;
            return self.apply(self.base, Decision::AppLimited, None, None, now);
        };
        if !self.warm {
            self.warm = true;
            return self.apply(self.base, Decision::Bounds, Some(st), None, now);
        }
        if let Some(dir) = self.probing.take() {
            // A probe always starts after a base window; without one it is just dropped.
            if let Some(before) = self.before {
                // Clear-cut against the window before it (lowering lost nothing, raising
                // scaled almost linearly): kept at once, and the probe window serves as the
                // base window of the next probe. Saves a window per step where it counts:
                // on the way down from far past the knee, and up from far below it.
                let s = scaling(&st, before.throughput, before.inflight);
                let r = st.throughput / before.throughput - 1.0;
                let m = st.inflight / before.inflight - 1.0;
                let clear = s.is_some()
                    && match dir {
                        Dir::Down => r >= self.noise,
                        Dir::Up => r >= 0.9 * m + self.noise,
                    };
                if clear {
                    self.count(Decision::Keep(dir));
                    self.keep(dir, st.limit);
                    if let Some(s) = s {
                        self.m.scaling.set(s);
                    }
                    self.before = Some(st);
                    self.m.base.set(self.base as f64);
                    return self.probe_from(Decision::Keep(dir), st, s, now);
                }
                self.pending = Some((dir, before, st));
            }
            self.count(Decision::ProbeDone);
            return self.apply(self.base, Decision::ProbeDone, Some(st), None, now);
        }
        if let Some((dir, before, probe)) = self.pending.take() {
            return self.judge(dir, before, probe, st, now);
        }
        self.base_window(st, now)
    }

    /// A base window with nothing pending: watch for a shift, then probe or hold.
    fn base_window(&mut self, st: Stats, now: Instant) -> Option<Change> {
        if let Some(b) = self.before.filter(|b| b.limit == st.limit) {
            self.observe_noise(&b, &st);
        }
        self.before = Some(st);
        if let Some(a) = self.avg.filter(|&a| self.shifted(a, st.throughput)) {
            if std::mem::replace(&mut self.shift_seen, true) {
                return self.shift(a, st, now);
            }
            // One window may be a fluke: wait for the next before believing it.
            return self.apply(self.base, Decision::Shift, Some(st), None, now);
        }
        self.shift_seen = false;
        self.avg = Some(match self.avg {
            Some(a) => 0.7 * a + 0.3 * st.throughput,
            None => st.throughput,
        });
        if self.hold > 0 {
            self.hold -= 1;
            return self.apply(self.base, Decision::Shift, Some(st), None, now);
        }
        let Some((dir, to)) = self.probe_target(&st) else {
            // min == max: nothing to find.
            return self.apply(self.base, Decision::Shift, Some(st), None, now);
        };
        self.probing = Some(dir);
        self.count(Decision::Probe(dir));
        self.apply(to, Decision::Probe(dir), Some(st), None, now)
    }

    /// Probe step: a quarter of the base limit, doubled after each kept step in the same
    /// direction (twice at most), so a limit far off moves there in a few windows.
    fn step(&self) -> usize {
        let momentum = f64::from(1u32 << self.streak.min(2));
        let step = (self.base as f64 * STEP * momentum).round() as usize;
        step.clamp(1, (self.base / 2).max(1))
    }

    /// Direction and limit of the next probe after base window `w`: `next_dir`, or the
    /// other one at a bound. No probe down while queries run as fast as they did at a lower
    /// limit recently (within the noise): nothing queues in the database, so fewer slots
    /// can only lose throughput. That keeps a limit that is not the bottleneck of the database (`pg_sleep`,
    /// a pool at its size) free of probing costs.
    fn probe_target(&self, w: &Stats) -> Option<(Dir, usize)> {
        let step = self.step();
        let up = (self.base + step).min(self.hi());
        let down = self.base.saturating_sub(step).max(self.lo());
        let uncongested = self
            .latency_at
            .range(..self.base)
            .any(|(_, &(lat, _))| w.latency <= lat * (1.1 + self.noise));
        let order = match self.next_dir {
            Dir::Up => [(Dir::Up, up), (Dir::Down, down)],
            Dir::Down => [(Dir::Down, down), (Dir::Up, up)],
        };
        order
            .into_iter()
            .find(|&(d, to)| to != self.base && !(d == Dir::Down && uncongested))
    }

    fn judge(
        &mut self,
        dir: Dir,
        before: Stats,
        probe: Stats,
        after: Stats,
        now: Instant,
    ) -> Option<Change> {
        let polluted = self.shifted(before.throughput, after.throughput);
        self.observe_noise(&before, &after);
        if polluted {
            // The database changed under the probe: its comparison means nothing. The next
            // base windows tell whether the change lasts (`base_window`).
            self.count(Decision::Shift);
            self.unhold();
            self.before = Some(after);
            return self.apply(self.base, Decision::Shift, Some(after), None, now);
        }
        let base_x = (before.throughput + after.throughput) / 2.0;
        let base_u = (before.inflight + after.inflight) / 2.0;
        let scaling = scaling(&probe, base_x, base_u);
        let decision = match scaling {
            None => Decision::Inconclusive,
            Some(s) => {
                self.m.scaling.set(s);
                // The probe's change in throughput against what `KEEP_*` of linear scaling
                // would give, with the windows' own noise as a margin against moving.
                let r = probe.throughput / base_x - 1.0;
                let m = probe.inflight / base_u - 1.0;
                let keep = match dir {
                    Dir::Up => r >= KEEP_UP * m + self.noise,
                    Dir::Down => r >= KEEP_DOWN * m + self.noise,
                };
                if keep {
                    Decision::Keep(dir)
                } else {
                    Decision::Refuse(dir)
                }
            }
        };
        self.count(decision);
        match decision {
            Decision::Keep(d) => {
                self.keep(d, probe.limit);
                // The window after the probe ran at the old base: the next probe needs a
                // base window at the new one first.
                self.before = None;
            }
            _ => {
                self.streak = 0;
                self.last_kept = None;
                self.next_dir = match dir {
                    Dir::Up => Dir::Down,
                    Dir::Down => Dir::Up,
                };
                // At a bound only one direction can be probed: one refusal says it all.
                let one_way = self.base == self.hi() || self.base == self.lo();
                self.refusals += if one_way { 2 } else { 1 };
                if self.refusals >= 2 {
                    // Refused both ways: the limit is where it belongs; probe less often.
                    self.hold = self.backoff;
                    self.backoff = (self.backoff * 2).min(MAX_HOLD);
                    self.refusals = 0;
                }
                self.before = Some(after);
            }
        }
        self.m.base.set(self.base as f64);
        if self.before.is_some() && self.hold == 0 {
            // `after` is a fine base window for the next probe: start it now.
            return self.probe_from(decision, after, scaling, now);
        }
        self.apply(self.base, decision, Some(after), scaling, now)
    }

    /// A probe's step is kept: `to` becomes the base.
    fn keep(&mut self, d: Dir, to: usize) {
        self.streak = if self.last_kept == Some(d) {
            self.streak + 1
        } else {
            0
        };
        self.last_kept = Some(d);
        self.base = to;
        self.next_dir = d;
        self.unhold();
        self.avg = None;
    }

    /// Starts the next probe right after a judged base window (or stays at base when there
    /// is nowhere to go).
    fn probe_from(
        &mut self,
        decision: Decision,
        window: Stats,
        scaling: Option<f64>,
        now: Instant,
    ) -> Option<Change> {
        match self.probe_target(&window) {
            Some((d, to)) => {
                self.probing = Some(d);
                self.count(Decision::Probe(d));
                self.apply(to, decision, Some(window), scaling, now)
            }
            None => self.apply(self.base, decision, Some(window), scaling, now),
        }
    }

    /// Throughput at the base limit moved from `was` to `now_st`'s by more than `SHIFT`:
    /// capacity changed (a side load, a slower plan, a failover). When it fell, the same
    /// concurrency now takes proportionally longer, so the knee has most likely moved down in
    /// proportion: the base jumps there at once (probes then refine it). When it rose,
    /// probing resumes upwards. Either way probes come again at once.
    fn shift(&mut self, was: f64, st: Stats, now: Instant) -> Option<Change> {
        self.count(Decision::Shift);
        self.unhold();
        self.shift_seen = false;
        self.streak = 0;
        self.last_kept = None;
        if st.throughput < was {
            // At most halved per shift: a deeper fall is followed by the next one.
            let ratio = (st.throughput / was).max(0.5);
            let to = (self.base as f64 * ratio).round() as usize;
            self.base = to.clamp(self.lo(), self.hi());
            self.next_dir = Dir::Down;
        } else {
            self.next_dir = Dir::Up;
        }
        self.m.base.set(self.base as f64);
        self.avg = Some(st.throughput);
        if self.base != st.limit {
            // The window ran at the old base: the next probe needs one at the new base.
            self.before = None;
            self.avg = None;
            return self.apply(self.base, Decision::Shift, Some(st), None, now);
        }
        self.before = Some(st);
        self.probe_from(Decision::Shift, st, None, now)
    }

    /// Two windows at the same limit differ in throughput by more than a shift: more than
    /// `SHIFT`, and more than twice the usual noise.
    fn shifted(&self, a: f64, b: f64) -> bool {
        a > 0.0 && (b / a - 1.0).abs() > SHIFT.max(2.0 * self.noise)
    }

    fn remember_latency(&mut self, st: &Stats, now: Instant) {
        self.latency_at
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < LATENCY_MEMORY);
        let e = self.latency_at.entry(st.limit).or_insert((st.latency, now));
        *e = (e.0.min(st.latency), now);
    }

    fn observe_noise(&mut self, a: &Stats, b: &Stats) {
        if a.throughput > 0.0 {
            let d = (b.throughput / a.throughput - 1.0).abs().min(1.0);
            self.noise = 0.75 * self.noise + 0.25 * d;
        }
    }

    fn unhold(&mut self) {
        self.hold = 0;
        self.backoff = 1;
        self.refusals = 0;
    }
}

/// How a probe scaled against its base: its change in throughput over its change in
/// running queries (1 linear, 0 flat, negative past the knee). `None` when the running
/// queries hardly changed (the clients did not use the probe's slots).
fn scaling(probe: &Stats, base_x: f64, base_u: f64) -> Option<f64> {
    if base_x <= 0.0 || base_u <= 0.0 {
        return None;
    }
    let moved = probe.inflight / base_u - 1.0;
    (moved.abs() >= MIN_MOVE).then(|| (probe.throughput / base_x - 1.0) / moved)
}
