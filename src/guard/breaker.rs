//! Circuit breaker: fail fast while the upstream is sick, probe it with one request.

use std::time::{Duration, Instant};

use super::config::BreakerConfig;
use super::types::CircuitState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

/// Consecutive-failure breaker with exponential cool-down.
#[derive(Debug)]
pub(crate) struct Breaker {
    cfg: BreakerConfig,
    state: State,
    /// Cool-down used by the latest opening; the next re-open doubles it.
    cooldown: Duration,
}

/// What the breaker says about a new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Normal traffic.
    Yes,
    /// This request is the single half-open probe.
    Probe,
    /// Fail fast.
    No,
}

impl Breaker {
    pub(crate) fn new(cfg: BreakerConfig) -> Self {
        Breaker {
            cfg,
            state: State::Closed { failures: 0 },
            cooldown: Duration::ZERO,
        }
    }

    pub(crate) fn set_config(&mut self, cfg: BreakerConfig) {
        self.cfg = cfg;
    }

    /// Open-with-elapsed-cool-down reads as half-open: the transition is lazy.
    pub(crate) fn state(&self, now: Instant) -> CircuitState {
        match self.state {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { until } if now < until => CircuitState::Open,
            State::Open { .. } | State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    pub(crate) fn pass(&mut self, now: Instant) -> Pass {
        match self.state {
            State::Closed { .. } => Pass::Yes,
            State::Open { until } if now < until => Pass::No,
            State::Open { .. }
            | State::HalfOpen {
                probe_in_flight: false,
            } => {
                self.state = State::HalfOpen {
                    probe_in_flight: true,
                };
                Pass::Probe
            }
            State::HalfOpen {
                probe_in_flight: true,
            } => Pass::No,
        }
    }

    /// The probe left without a verdict (shed, abandoned, or finished without a report):
    /// let the next request probe instead.
    pub(crate) fn probe_abandoned(&mut self) {
        if let State::HalfOpen {
            probe_in_flight: true,
        } = self.state
        {
            self.state = State::HalfOpen {
                probe_in_flight: false,
            };
        }
    }

    /// Closes the circuit unless it is still cooling down: a query that started before
    /// the opening and ends well proves little; the probe decides.
    /// Closed with no failure counted: a success changes nothing.
    pub(crate) fn is_clean(&self) -> bool {
        matches!(self.state, State::Closed { failures: 0 })
    }

    /// Forgets past failures: they were another server's (a failover).
    pub(crate) fn reset(&mut self) {
        self.state = State::Closed { failures: 0 };
        self.cooldown = Duration::ZERO;
    }

    pub(crate) fn record_success(&mut self, now: Instant) {
        if let State::Open { until } = self.state {
            if now < until {
                return;
            }
        }
        self.state = State::Closed { failures: 0 };
        self.cooldown = Duration::ZERO;
    }

    /// Returns true when this failure opened the circuit.
    pub(crate) fn record_failure(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.cfg.failure_threshold.max(1) {
                    self.cooldown = self.cfg.base_cooldown.min(self.cfg.max_cooldown);
                    self.open(now);
                    true
                } else {
                    self.state = State::Closed { failures };
                    false
                }
            }
            // A running query that started before the opening reports late: already open.
            State::Open { until } if now < until => false,
            State::Open { .. } | State::HalfOpen { .. } => {
                self.cooldown = self
                    .cooldown
                    .saturating_mul(2)
                    .max(self.cfg.base_cooldown)
                    .min(self.cfg.max_cooldown);
                self.open(now);
                true
            }
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open {
            until: super::core::later(now, self.cooldown),
        };
    }

    /// When an open circuit turns half-open, if it is open.
    #[cfg(test)]
    pub(crate) fn open_until(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            base_cooldown: Duration::from_millis(500),
            max_cooldown: Duration::from_secs(2),
        }
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        assert!(!b.record_failure(t0));
        assert!(!b.record_failure(t0));
        b.record_success(t0);
        assert!(!b.record_failure(t0));
        assert!(!b.record_failure(t0));
        assert_eq!(b.state(t0), CircuitState::Closed);
        assert!(b.record_failure(t0));
        assert_eq!(b.state(t0), CircuitState::Open);
        assert_eq!(b.pass(t0), Pass::No);
    }

    #[test]
    fn half_open_admits_exactly_one_probe_then_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.record_failure(t0);
        }
        let ms = Duration::from_millis;
        assert_eq!(b.pass(t0 + ms(499)), Pass::No);
        assert_eq!(b.state(t0 + ms(500)), CircuitState::HalfOpen);
        assert_eq!(b.pass(t0 + ms(500)), Pass::Probe);
        assert_eq!(b.pass(t0 + ms(501)), Pass::No);
        assert_eq!(b.pass(t0 + ms(900)), Pass::No);
        b.record_success(t0 + ms(900));
        assert_eq!(b.state(t0 + ms(901)), CircuitState::Closed);
        assert_eq!(b.pass(t0 + ms(901)), Pass::Yes);
    }

    #[test]
    fn cooldown_doubles_per_reopen_and_is_capped() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.record_failure(t0);
        }
        let mut now = t0;
        let mut seen = Vec::new();
        for _ in 0..5 {
            let until = b.open_until().expect("open");
            seen.push(until - now);
            now = until;
            assert_eq!(b.pass(now), Pass::Probe);
            assert!(b.record_failure(now));
        }
        let ms = Duration::from_millis;
        assert_eq!(seen, vec![ms(500), ms(1000), ms(2000), ms(2000), ms(2000)]);
        // A success resets the cool-down to the base.
        now = b.open_until().unwrap();
        assert_eq!(b.pass(now), Pass::Probe);
        b.record_success(now);
        for _ in 0..3 {
            b.record_failure(now);
        }
        assert_eq!(b.open_until(), Some(now + ms(500)));
    }

    #[test]
    fn abandoned_probe_lets_another_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.record_failure(t0);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.pass(t1), Pass::Probe);
        b.probe_abandoned();
        assert_eq!(b.pass(t1), Pass::Probe);
        assert_eq!(b.pass(t1), Pass::No);
    }

    #[test]
    fn late_failures_while_open_do_not_extend_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.record_failure(t0);
        }
        let until = b.open_until().unwrap();
        assert!(!b.record_failure(t0 + Duration::from_millis(100)));
        assert_eq!(b.open_until(), Some(until));
        // Nor does a late success close it before the probe.
        b.record_success(t0 + Duration::from_millis(200));
        assert_eq!(b.state(t0 + Duration::from_millis(200)), CircuitState::Open);
    }
}
