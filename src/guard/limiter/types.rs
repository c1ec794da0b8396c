//! The limiter's vocabulary: samples in, window figures, decisions and limit changes out,
//! and the metrics that make every change explainable.

use std::time::Duration;

use metrics::{Counter, Gauge};

use crate::metrics as names;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    Up,
    Down,
}

/// One completed query, as the guard reports it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    /// Running time: from the query's first byte upstream to its ReadyForQuery.
    pub latency: Duration,
    /// The limit was binding when it finished: every slot taken.
    pub bound: bool,
}

/// What one window measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Stats {
    pub limit: usize,
    /// Completions per second.
    pub throughput: f64,
    /// Mean running queries (Little's law over the counted completions).
    pub inflight: f64,
    /// Mean running time, seconds.
    pub latency: f64,
}

/// Why the limit changed or stayed, for metrics and the debug log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// A probe's step was kept.
    Keep(Dir),
    /// A probe's step was undone.
    Refuse(Dir),
    /// The probe's concurrency did not really change (clients did not use it).
    Inconclusive,
    /// The limit was not binding in the window: nothing learnt.
    AppLimited,
    /// Throughput moved away from its average: probing resumes at once.
    Shift,
    /// A probe window starts.
    Probe(Dir),
    /// A probe window ended; it is judged after the base window that follows.
    ProbeDone,
    /// The bounds or the pools' capacity changed.
    Bounds,
}

impl Decision {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Decision::Keep(Dir::Up) => "keep_up",
            Decision::Keep(Dir::Down) => "keep_down",
            Decision::Refuse(Dir::Up) => "refuse_up",
            Decision::Refuse(Dir::Down) => "refuse_down",
            Decision::Inconclusive => "inconclusive",
            Decision::AppLimited => "app_limited",
            Decision::Shift => "shift",
            Decision::Probe(Dir::Up) => "probe_up",
            Decision::Probe(Dir::Down) => "probe_down",
            Decision::ProbeDone => "probe_done",
            Decision::Bounds => "bounds",
        }
    }

    pub(super) const ALL: [Decision; 11] = [
        Decision::Keep(Dir::Up),
        Decision::Keep(Dir::Down),
        Decision::Refuse(Dir::Up),
        Decision::Refuse(Dir::Down),
        Decision::Inconclusive,
        Decision::AppLimited,
        Decision::Shift,
        Decision::Probe(Dir::Up),
        Decision::Probe(Dir::Down),
        Decision::ProbeDone,
        Decision::Bounds,
    ];

    pub(super) fn index(self) -> usize {
        Self::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }
}

/// A change of the enforced limit, for the debug log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Change {
    pub from: usize,
    pub to: usize,
    pub decision: Decision,
    /// The window that led to it.
    pub window: Option<Stats>,
    /// Scaling of the probe judged, when one was.
    pub scaling: Option<f64>,
}

pub(super) struct LimiterMetrics {
    pub base: Gauge,
    pub throughput: Gauge,
    pub inflight: Gauge,
    pub latency: Gauge,
    pub scaling: Gauge,
    pub decisions: [Counter; 11],
}

impl LimiterMetrics {
    pub(super) fn new(upstream: &str) -> Self {
        let g = |name: &'static str| metrics::gauge!(name, "upstream" => upstream.to_string());
        LimiterMetrics {
            base: g(names::LIMITER_BASE),
            throughput: g(names::LIMITER_THROUGHPUT),
            inflight: g(names::LIMITER_INFLIGHT),
            latency: g(names::LIMITER_LATENCY),
            scaling: g(names::LIMITER_SCALING),
            decisions: Decision::ALL.map(|d| {
                metrics::counter!(names::LIMITER_DECISIONS, "upstream" => upstream.to_string(), "decision" => d.label())
            }),
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {} ({})",
            self.from,
            self.to,
            self.decision.label()
        )?;
        if let Some(w) = self.window {
            write!(
                f,
                ", window at {}: {:.1} q/s, {:.2} running, {:.2} ms",
                w.limit,
                w.throughput,
                w.inflight,
                w.latency * 1e3
            )?;
        }
        if let Some(s) = self.scaling {
            write!(f, ", scaling {s:.2}")?;
        }
        Ok(())
    }
}
