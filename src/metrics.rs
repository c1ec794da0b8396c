//! Every metric name in one place, with its help text. Label `pool` is `database/user`.

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
pub const SERVER_CONNECTS_TOTAL: &str = "pgsluice_server_connects_total";

/// (name, help) for every metric, used to describe them to the exporter.
pub const ALL: &[(&str, &str)] = &[
    (CLIENT_CONNECTIONS, "Client connections by state (active: attached to a server, idle, waiting)."),
    (SERVER_CONNECTIONS, "Server connections by pool and state (active, idle)."),
    (ACTIVE_QUERIES, "Queries holding a concurrency slot (sent upstream, ReadyForQuery not yet back)."),
    (CONCURRENCY_LIMIT, "Current cap on active queries for the pool's upstream."),
    (QUEUE_DEPTH, "Queries waiting for a concurrency slot."),
    (QUEUE_WAIT_SECONDS, "Time a query waited for a slot, admitted or not."),
    (QUERY_DURATION_SECONDS, "Time from a query's first byte upstream to its ReadyForQuery."),
    (QUERIES_TOTAL, "Queries by outcome (ok, error, shed, timeout, cancelled, upstream_lost)."),
    (SHED_TOTAL, "Queries refused before running, by reason (queue_full, standing_queue, queue_timeout, circuit_open, paused, cohort)."),
    (CANCELS_TOTAL, "Cancels sent upstream, by cause (client_gone, client_request, query_timeout, idle_in_transaction)."),
    (UPSTREAM_UP, "1 when the upstream answered its latest health check."),
    (CIRCUIT_STATE, "Circuit breaker state: 0 closed, 1 half-open, 2 open."),
    (SERVER_CONNECTS_TOTAL, "Upstream login attempts by pool and outcome (ok, error)."),
];

/// Installs the Prometheus recorder once per process. (Interim.)
pub fn install() -> metrics_exporter_prometheus::PrometheusHandle {
    static H: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    H.get_or_init(|| {
        let r = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let h = r.handle();
        let _ = metrics::set_global_recorder(r);
        h
    })
    .clone()
}
