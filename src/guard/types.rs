//! Requests, refusals and circuit states exchanged with the session relay.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// One query asking for a slot.
#[derive(Clone, Debug)]
pub struct AdmitRequest {
    /// `database/user`, the metric label.
    pub pool: Arc<str>,
    /// `application_name`, else the user name.
    pub identity: Arc<str>,
    /// Stable per client connection; hashed into a cohort.
    pub client_id: u64,
    /// Statement of an already-open transaction: served ahead of new work.
    pub in_transaction: bool,
    /// When this client last had a query admitted (mid-request detection).
    pub last_admitted: Option<Instant>,
    /// The client's own deadline (its `statement_timeout`): the query never waits past it,
    /// and is refused with 57014 when it is reached in the queue.
    pub deadline: Option<Instant>,
    /// Needs a concurrency slot (false: only a server connection, e.g. at login).
    pub slot: bool,
    /// Needs a server connection of `pool` (the client holds none yet).
    pub lease: bool,
    /// Server connections `pool` may have at once (its connection budget).
    pub capacity: usize,
}

/// Why a query was refused before it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedReason {
    QueueFull,
    StandingQueue,
    QueueTimeout,
    Cohort,
    CircuitOpen,
    Paused,
    /// Queued longer than the client's own `statement_timeout`.
    StatementTimeout,
}

impl ShedReason {
    pub const ALL: [ShedReason; 7] = [
        ShedReason::QueueFull,
        ShedReason::StandingQueue,
        ShedReason::QueueTimeout,
        ShedReason::Cohort,
        ShedReason::CircuitOpen,
        ShedReason::Paused,
        ShedReason::StatementTimeout,
    ];

    /// Metric label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue_full",
            ShedReason::StandingQueue => "standing_queue",
            ShedReason::QueueTimeout => "queue_timeout",
            ShedReason::Cohort => "cohort",
            ShedReason::CircuitOpen => "circuit_open",
            ShedReason::Paused => "paused",
            ShedReason::StatementTimeout => "statement_timeout",
        }
    }

    /// SQLSTATE sent to the client.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ShedReason::CircuitOpen | ShedReason::Paused => "57P03",
            // What PostgreSQL itself says when statement_timeout fires.
            ShedReason::StatementTimeout => "57014",
            _ => "53400",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A refused query: it never ran, so retrying is safe.
#[derive(Debug, Clone)]
pub struct Shed {
    pub reason: ShedReason,
    pub waited: Duration,
    pub active: usize,
    pub limit: usize,
    pub queued: usize,
}

impl Shed {
    /// Primary error message.
    pub fn message(&self) -> String {
        match self.reason {
            ShedReason::CircuitOpen => "pgsluice: upstream unavailable".to_string(),
            ShedReason::Paused => "pgsluice: paused".to_string(),
            ShedReason::StatementTimeout => {
                "canceling statement due to statement timeout (pgsluice: the query was still queued)"
                    .to_string()
            }
            _ => "pgsluice: database busy".to_string(),
        }
    }

    /// Error hint with the state that led to the refusal.
    pub fn hint(&self) -> String {
        format!(
            "active {}/{}, queue {}, waited {} ms ({}); the query did not run, retrying is safe",
            self.active,
            self.limit,
            self.queued,
            self.waited.as_millis(),
            self.reason.as_str().replace('_', " "),
        )
    }
}

impl std::fmt::Display for Shed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message(), self.hint())
    }
}

impl std::error::Error for Shed {}

/// Circuit-breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}

impl CircuitState {
    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(&self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open => 2.0,
        }
    }
}
