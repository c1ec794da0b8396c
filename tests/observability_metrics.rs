//! What `/metrics` and `/pools` report under a small overload matches what clients saw.
//!
//! The metrics recorder is process-wide, so this file holds a single test and compares
//! deltas taken before and after the load.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{connect, TempPostgres, TestProxy};

const POOL: &str = "postgres/postgres";
const CLIENTS: usize = 12;
const IDENTITIES: [&str; 4] = ["obs-a", "obs-b", "obs-c", "obs-d"];

/// One sample line: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn parse_labels(s: &str) -> Vec<(String, String)> {
    // Label values here never contain commas or escaped quotes.
    s.split(',')
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.trim_matches('"').to_string()))
        })
        .collect()
}

fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            Some((name.to_string(), labels, value))
        })
        .collect()
}

/// Sum of every sample of `name` whose labels include all of `want`.
fn sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

fn label_values(text: &str, name: &str, label: &str) -> BTreeSet<String> {
    samples(text)
        .into_iter()
        .filter(|(n, _, _)| n == name)
        .flat_map(|(_, labels, _)| labels.into_iter().filter(|(k, _)| k == label))
        .map(|(_, v)| v)
        .collect()
}

async fn scrape(proxy: &TestProxy) -> String {
    let (status, body) = proxy.http_get("/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_counts_match_what_clients_saw() {
    let pg = tokio::task::spawn_blocking(TempPostgres::new)
        .await
        .unwrap();
    let proxy = TestProxy::start(
        &pg,
        &[
            "--max-active",
            "1",
            "--max-queue",
            "2",
            "--queue-timeout",
            "200ms",
            "--identity-label-cap",
            "2",
            "--health-interval",
            "200ms",
        ],
    )
    .await;

    // Connect everyone first so the load is only the queries.
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let url = format!(
            "{}&application_name={}",
            proxy.url(),
            IDENTITIES[i % IDENTITIES.len()]
        );
        clients.push(connect(&url).await);
    }
    let before = scrape(&proxy).await;

    let runs = clients
        .iter()
        .map(|c| c.batch_execute("SELECT pg_sleep(0.3)"));
    let results = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(runs))
        .await
        .expect("overload finished within 20 s");
    let mut ok = 0usize;
    let mut busy = 0usize;
    for r in &results {
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                let code = e.as_db_error().map(|d| d.code().code().to_string());
                assert_eq!(code.as_deref(), Some("53400"), "unexpected error: {e:?}");
                busy += 1;
            }
        }
    }
    eprintln!("ok {ok}, 53400 {busy}");
    assert_eq!(ok + busy, CLIENTS);
    assert!(ok >= 1, "at least the first query runs");
    assert!(
        busy >= 1,
        "1 slot + 2 queue places cannot take {CLIENTS} queries"
    );

    // Gauges are published by the health loop; counters at once. Poll until consistent.
    let mut after = String::new();
    for _ in 0..25 {
        after = scrape(&proxy).await;
        if sum(&after, "pgsluice_active_queries", &[("pool", POOL)]) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delta =
        |name: &str, want: &[(&str, &str)]| sum(&after, name, want) - sum(&before, name, want);

    let shed = delta("pgsluice_shed_total", &[("pool", POOL)]);
    assert_eq!(
        shed, busy as f64,
        "shed_total over all reasons vs 53400s seen"
    );
    assert_eq!(
        delta(
            "pgsluice_queries_total",
            &[("pool", POOL), ("outcome", "ok")]
        ),
        ok as f64
    );
    assert_eq!(
        delta(
            "pgsluice_queries_total",
            &[("pool", POOL), ("outcome", "shed")]
        ),
        busy as f64
    );
    assert_eq!(
        sum(&after, "pgsluice_concurrency_limit", &[("pool", POOL)]),
        1.0
    );
    assert_eq!(
        sum(&after, "pgsluice_active_queries", &[("pool", POOL)]),
        0.0
    );
    let waited = delta("pgsluice_queue_wait_seconds_count", &[("pool", POOL)]);
    assert!(waited >= 1.0, "queue wait histogram did not move: {waited}");
    assert!(
        delta("pgsluice_query_duration_seconds_count", &[("pool", POOL)]) >= ok as f64,
        "query duration histogram missed queries"
    );

    // Per-identity sheds add up, and the label cap of 2 folds the rest into "other".
    assert_eq!(delta("pgsluice_identity_shed_total", &[]), busy as f64);
    let ids = label_values(&after, "pgsluice_identity_shed_total", "identity");
    let named: Vec<_> = ids.iter().filter(|v| v.as_str() != "other").collect();
    assert!(named.len() <= 2, "label cap exceeded: {ids:?}");
    assert!(
        ids.iter()
            .all(|v| v == "other" || IDENTITIES.contains(&v.as_str())),
        "{ids:?}"
    );
    assert_eq!(sum(&after, "pgsluice_upstream_up", &[]), 1.0);
    assert_eq!(sum(&after, "pgsluice_paused", &[]), 0.0);

    // /pools: the pool and the guard's view of it.
    let (status, body) = proxy.http_get("/pools").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/pools is JSON");
    let pools = v["pools"].as_array().expect("pools array");
    let p = pools
        .iter()
        .find(|p| p["pool"] == POOL)
        .unwrap_or_else(|| panic!("no {POOL} in {body}"));
    assert_eq!(p["database"], "postgres");
    assert_eq!(p["user"], "postgres");
    assert!(
        p["server_connections"].as_u64().is_some_and(|n| n >= 1),
        "{p}"
    );
    let g = &v["guard"];
    assert_eq!(g["limit"], 1, "{g}");
    assert_eq!(g["active"], 0, "{g}");
    assert_eq!(g["queued"], 0, "{g}");
    assert_eq!(g["paused"], false, "{g}");
    assert_eq!(g["circuit"], "closed", "{g}");
    assert!(g["pools"][POOL].is_object(), "{g}");
    let shed_by_identity: u64 = IDENTITIES
        .iter()
        .map(|i| g["identities"][*i]["shed_total"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(shed_by_identity, busy as u64, "{g}");
    assert_eq!(v["upstream_up"], true);
    assert_eq!(v["clients"]["total"], CLIENTS);

    drop(clients);
    proxy.shutdown().await;
}
