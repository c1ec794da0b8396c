//! Every metric name in one place, with its help text. Label `pool` is `database/user`.
//!
//! [`install`] sets up the process-wide Prometheus recorder; [`LabelCap`] bounds the number
//! of distinct values a caller-chosen label (client identity) can take.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::RwLock;

pub const CLIENT_CONNECTIONS: &str = "pgsluice_client_connections";
pub const SERVER_CONNECTIONS: &str = "pgsluice_server_connections";
pub const ACTIVE_QUERIES: &str = "pgsluice_active_queries";
pub const CONCURRENCY_LIMIT: &str = "pgsluice_concurrency_limit";
pub const QUEUE_DEPTH: &str = "pgsluice_queue_depth";
pub const QUEUE_WAIT_SECONDS: &str = "pgsluice_queue_wait_seconds";
pub const QUERY_DURATION_SECONDS: &str = "pgsluice_query_duration_seconds";
pub const QUERIES_TOTAL: &str = "pgsluice_queries_total";
pub const SHED_TOTAL: &str = "pgsluice_shed_total";
pub const CANCELS_TOTAL: &str = "pgsluice_cancels_total";
pub const UPSTREAM_UP: &str = "pgsluice_upstream_up";
pub const CIRCUIT_STATE: &str = "pgsluice_circuit_state";
pub const HOST_UP: &str = "pgsluice_upstream_host_up";
pub const HOST_PRIMARY: &str = "pgsluice_upstream_host_primary";
pub const HOST_LAG_BYTES: &str = "pgsluice_upstream_host_lag_bytes";
pub const SERVER_CONNECTS_TOTAL: &str = "pgsluice_server_connects_total";
pub const PAUSED: &str = "pgsluice_paused";
pub const CONFIG_RELOADS_TOTAL: &str = "pgsluice_config_reloads_total";
pub const IDENTITY_SHED_TOTAL: &str = "pgsluice_identity_shed_total";
pub const LIMITER_BASE: &str = "pgsluice_limiter_base_limit";
pub const LIMITER_THROUGHPUT: &str = "pgsluice_limiter_throughput";
pub const LIMITER_INFLIGHT: &str = "pgsluice_limiter_inflight";
pub const LIMITER_LATENCY: &str = "pgsluice_limiter_latency_seconds";
pub const LIMITER_SCALING: &str = "pgsluice_limiter_scaling";
pub const LIMITER_DECISIONS: &str = "pgsluice_limiter_decisions_total";

/// (name, help) for every metric, used to describe them to the exporter.
pub const ALL: &[(&str, &str)] = &[
    (CLIENT_CONNECTIONS, "Client connections by state (active: attached to a server, idle, waiting)."),
    (SERVER_CONNECTIONS, "Server connections by pool and state (active, idle)."),
    (ACTIVE_QUERIES, "Queries holding a concurrency slot (sent upstream, ReadyForQuery not yet back)."),
    (CONCURRENCY_LIMIT, "Current cap on active queries for the pool's upstream."),
    (QUEUE_DEPTH, "Queries waiting for a concurrency slot."),
    (QUEUE_WAIT_SECONDS, "Time a query waited for a slot, admitted or not."),
    (QUERY_DURATION_SECONDS, "Time from a query's first byte upstream to its ReadyForQuery."),
    (QUERIES_TOTAL, "Queries by outcome (ok, error, shed, timeout, cancelled, upstream_lost, abandoned)."),
    (SHED_TOTAL, "Queries refused before running, by reason (queue_full, standing_queue, queue_timeout, circuit_open, paused, cohort, statement_timeout)."),
    (CANCELS_TOTAL, "Cancels pgsluice sent upstream on its own, by cause (client_gone, query_timeout, idle_in_transaction, protocol_error)."),
    (UPSTREAM_UP, "1 when the upstream answered its latest health check."),
    (CIRCUIT_STATE, "Circuit breaker state: 0 closed, 1 half-open, 2 open."),
    (HOST_UP, "Several upstream hosts: 1 when the host answered its latest role check."),
    (HOST_PRIMARY, "Several upstream hosts: 1 when the host's latest role check found a primary."),
    (HOST_LAG_BYTES, "Several upstream hosts: a standby's replay position behind the primary's WAL, bytes."),
    (SERVER_CONNECTS_TOTAL, "Attempts to open a server connection, by pool and outcome (ok, error)."),
    (PAUSED, "1 while the proxy is paused (new queries wait instead of going upstream)."),
    (CONFIG_RELOADS_TOTAL, "Configuration reloads (SIGHUP or POST /reload), by outcome (ok, error)."),
    (IDENTITY_SHED_TOTAL, "Queries refused before running, by client identity (capped by --identity-label-cap, the rest folded into identity=other) and reason."),
    (LIMITER_BASE, "--max-active auto: the limit held between probes (pgsluice_concurrency_limit is the one in force, a probe's during a probe)."),
    (LIMITER_THROUGHPUT, "--max-active auto: completions per second in the last judged window."),
    (LIMITER_INFLIGHT, "--max-active auto: mean running queries in the last judged window."),
    (LIMITER_LATENCY, "--max-active auto: mean running time in the last judged window."),
    (LIMITER_SCALING, "--max-active auto: throughput change over concurrency change in the last probe (1 scales linearly, 0 plateau, below 0 past the knee); a step up is kept at 0.5 or more, a step down at 0.25 or less."),
    (LIMITER_DECISIONS, "--max-active auto: limiter decisions (keep_up, keep_down, refuse_up, refuse_down, inconclusive, app_limited, shift, probe_up, probe_down, probe_done, bounds)."),
];

/// How a metric is recorded, which decides how it is described to the exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The kind of a metric named in [`ALL`]; `None` for a name that is not ours.
pub fn kind(name: &str) -> Option<Kind> {
    Some(match name {
        CLIENT_CONNECTIONS | SERVER_CONNECTIONS | ACTIVE_QUERIES | CONCURRENCY_LIMIT
        | QUEUE_DEPTH | UPSTREAM_UP | CIRCUIT_STATE | HOST_UP | HOST_PRIMARY | HOST_LAG_BYTES
        | PAUSED | LIMITER_BASE | LIMITER_THROUGHPUT | LIMITER_INFLIGHT | LIMITER_LATENCY
        | LIMITER_SCALING => Kind::Gauge,
        QUEUE_WAIT_SECONDS | QUERY_DURATION_SECONDS => Kind::Histogram,
        QUERIES_TOTAL
        | SHED_TOTAL
        | CANCELS_TOTAL
        | SERVER_CONNECTS_TOTAL
        | CONFIG_RELOADS_TOTAL
        | IDENTITY_SHED_TOTAL
        | LIMITER_DECISIONS => Kind::Counter,
        _ => return None,
    })
}

/// Histogram bucket bounds in seconds: fine at the millisecond end, where pooled queries
/// live, and up to a minute, past any sensible queue timeout.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder and describes every metric in [`ALL`].
///
/// Idempotent: later calls return a clone of the first handle, so several proxies in one
/// process (tests) share one registry. If some other recorder was installed first, the
/// returned handle renders an empty registry and a warning is logged.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!("metrics recorder not installed, /metrics will be empty: {e}");
                return handle;
            }
            describe_all();
            handle
        })
        .clone()
}

/// How often histogram samples are folded into the exporter's buckets when nobody scrapes,
/// so memory stays bounded.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds histogram samples into their buckets on an interval. The exporter keeps every
/// sample until then: without this, a proxy run with `--admin-listen off` (never scraped)
/// grew by two samples per query for its whole life.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

fn builder() -> PrometheusBuilder {
    let mut b = PrometheusBuilder::new();
    for name in [QUEUE_WAIT_SECONDS, QUERY_DURATION_SECONDS] {
        // Only fails on an empty bucket list, which LATENCY_BUCKETS is not.
        b = match b.set_buckets_for_metric(Matcher::Full(name.to_string()), LATENCY_BUCKETS) {
            Ok(b) => b,
            Err(e) => unreachable!("non-empty bucket list rejected: {e}"),
        };
    }
    b
}

fn describe_all() {
    for &(name, help) in ALL {
        match kind(name) {
            Some(Kind::Counter) => describe_counter!(name, help),
            Some(Kind::Gauge) => describe_gauge!(name, help),
            Some(Kind::Histogram) => describe_histogram!(name, metrics::Unit::Seconds, help),
            None => tracing::warn!("metric {name} has no kind; left undescribed"),
        }
    }
}

/// Value used once a [`LabelCap`] is full.
pub const OTHER: &str = "other";

/// Bounds the distinct values of one label so a client choosing its own identity (e.g.
/// `application_name`) cannot grow the series count without limit. The first `max` values
/// seen keep their own label; later ones share [`OTHER`].
pub struct LabelCap {
    max: usize,
    seen: RwLock<HashSet<Arc<str>>>,
    other: Arc<str>,
}

impl Default for LabelCap {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX)
    }
}

impl LabelCap {
    pub const DEFAULT_MAX: usize = 50;

    pub fn new(max: usize) -> Self {
        Self {
            max,
            seen: RwLock::new(HashSet::new()),
            other: Arc::from(OTHER),
        }
    }

    /// The label to record for `value`: itself while the cap allows, else [`OTHER`].
    /// A value already seen costs one shared read lock and a refcount bump.
    pub fn label(&self, value: &str) -> Arc<str> {
        if let Some(v) = self.seen.read().get(value) {
            return v.clone();
        }
        let mut seen = self.seen.write();
        if let Some(v) = seen.get(value) {
            return v.clone();
        }
        if seen.len() >= self.max {
            return self.other.clone();
        }
        let v: Arc<str> = Arc::from(value);
        seen.insert(v.clone());
        v
    }

    /// Distinct values that currently have their own label.
    pub fn len(&self) -> usize {
        self.seen.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_a_kind_and_a_unique_name() {
        let mut names = HashSet::new();
        for &(name, help) in ALL {
            assert!(kind(name).is_some(), "{name} has no kind");
            assert!(!help.is_empty(), "{name} has no help");
            assert!(name.starts_with("pgsluice_"), "{name}");
            assert!(names.insert(name), "{name} listed twice");
        }
    }

    #[test]
    fn render_contains_every_described_metric() {
        let handle = install();
        for &(name, _) in ALL {
            let labels = [("pool", "render_test/app")];
            match kind(name) {
                Some(Kind::Counter) => metrics::counter!(name, &labels).increment(1),
                Some(Kind::Gauge) => metrics::gauge!(name, &labels).set(3.0),
                Some(Kind::Histogram) => metrics::histogram!(name, &labels).record(0.003),
                None => unreachable!("checked by every_metric_has_a_kind_and_a_unique_name"),
            }
        }
        let text = handle.render();
        for &(name, help) in ALL {
            assert!(
                text.contains(&format!("# HELP {name} {help}")),
                "no HELP for {name}:\n{text}"
            );
            let kind_word = match kind(name) {
                Some(Kind::Counter) => "counter",
                Some(Kind::Gauge) => "gauge",
                _ => "histogram",
            };
            assert!(
                text.contains(&format!("# TYPE {name} {kind_word}")),
                "no TYPE {kind_word} for {name}:\n{text}"
            );
        }
    }

    #[test]
    fn latency_histograms_use_millisecond_to_minute_buckets() {
        let handle = install();
        metrics::histogram!(QUEUE_WAIT_SECONDS, "pool" => "bucket_test/app").record(0.002);
        let text = handle.render();
        let line = |le: &str| {
            format!("{QUEUE_WAIT_SECONDS}_bucket{{pool=\"bucket_test/app\",le=\"{le}\"}}")
        };
        // 2 ms is above the 1 ms bound and within the 2.5 ms bound.
        assert!(text.contains(&format!("{} 0", line("0.001"))), "{text}");
        assert!(text.contains(&format!("{} 1", line("0.0025"))), "{text}");
        assert!(text.contains(&format!("{} 1", line("60"))), "{text}");
    }

    #[test]
    fn install_twice_shares_one_registry() {
        let a = install();
        let b = install();
        metrics::gauge!(PAUSED, "probe" => "install_twice").set(1.0);
        assert!(b.render().contains("probe=\"install_twice\""));
        assert!(a.render().contains("probe=\"install_twice\""));
    }

    #[test]
    fn label_cap_folds_values_past_the_cap() {
        let cap = LabelCap::new(2);
        assert_eq!(&*cap.label("a"), "a");
        assert_eq!(&*cap.label("b"), "b");
        assert_eq!(&*cap.label("c"), OTHER);
        assert_eq!(&*cap.label("d"), OTHER);
        // Values admitted before the cap filled keep their own label.
        assert_eq!(&*cap.label("a"), "a");
        assert_eq!(cap.len(), 2);
    }

    #[test]
    fn label_cap_default_is_fifty_and_known_values_share_storage() {
        let cap = LabelCap::default();
        for i in 0..60 {
            let v = format!("id{i}");
            let want = if i < 50 { v.as_str() } else { OTHER };
            assert_eq!(&*cap.label(&v), want);
        }
        assert_eq!(cap.len(), 50);
        assert!(Arc::ptr_eq(&cap.label("id7"), &cap.label("id7")));
    }

    #[test]
    fn label_cap_is_consistent_across_threads() {
        let cap = Arc::new(LabelCap::new(10));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let cap = cap.clone();
                std::thread::spawn(move || {
                    (0..40)
                        .map(|i| cap.label(&format!("v{}", (i + t) % 20)))
                        .count()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().ok(), Some(40));
        }
        assert_eq!(cap.len(), 10);
    }
}
