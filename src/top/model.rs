//! What `pgsluice top` shows, computed from two polls of the admin API (`/pools` and
//! `/metrics`): levels from the latest, rates and queue-wait quantiles from the difference.

use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// One poll of the admin API.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Time since the first poll.
    pub at: Duration,
    pub pools: Value,
    pub metrics: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolRow {
    pub name: String,
    pub active: u64,
    pub queued: u64,
    pub leased: u64,
    pub capacity: u64,
    pub servers: u64,
    pub idle: u64,
    /// Queue wait quantiles over the last interval (since start on the first poll), ms.
    pub wait_p50_ms: Option<f64>,
    pub wait_p99_ms: Option<f64>,
    pub shed_per_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct IdentityRow {
    pub name: String,
    pub active: u64,
    pub queued: u64,
    pub weight: u64,
    pub admitted_per_s: f64,
    pub shed_per_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    pub upstream: String,
    pub upstream_up: bool,
    pub active: u64,
    pub limit: u64,
    pub queued: u64,
    pub paused: bool,
    pub circuit: String,
    pub standing_queue: bool,
    pub clients: u64,
    pub clients_waiting: u64,
    pub cancels_per_s: f64,
    pub pools: Vec<PoolRow>,
    pub identities: Vec<IdentityRow>,
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Prometheus text samples: (name, labels, value).
fn samples(text: &str) -> Vec<(&str, BTreeMap<&str, &str>, f64)> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter_map(|kv| {
                let (k, v) = kv.split_once("=\"")?;
                Some((k, v.trim_end_matches('"')))
            })
            .collect();
        out.push((name, labels, value));
    }
    out
}

/// Sum of a counter by one label's value.
fn by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for (n, l, v) in samples(text) {
        if n == name {
            *m.entry(l.get(label).copied().unwrap_or("").to_string())
                .or_default() += v;
        }
    }
    m
}

/// Cumulative histogram buckets of one pool: (upper bound, count), ascending.
fn buckets(text: &str, name: &str, pool: &str) -> Vec<(f64, f64)> {
    let mut b: Vec<(f64, f64)> = samples(text)
        .into_iter()
        .filter(|(n, l, _)| *n == name && l.get("pool") == Some(&pool))
        .filter_map(|(_, l, v)| {
            let le = l.get("le")?;
            let le = if *le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v))
        })
        .collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    b
}

/// The bucket bound below which `q` of the observations fall (upper bound, as
/// histogram_quantile without interpolation); None without observations.
fn quantile(cur: &[(f64, f64)], prev: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = cur
        .iter()
        .map(|&(le, c)| {
            let before = prev.iter().find(|p| p.0 == le).map_or(0.0, |p| p.1);
            (le, (c - before).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

fn rate(cur: f64, prev: Option<f64>, secs: f64) -> f64 {
    match prev {
        Some(p) if secs > 0.0 => ((cur - p) / secs).max(0.0),
        _ => 0.0,
    }
}

pub fn view(prev: Option<&Sample>, cur: &Sample) -> View {
    let p = &cur.pools;
    let g = &p["guard"];
    let secs = prev.map_or(0.0, |s| cur.at.saturating_sub(s.at).as_secs_f64());
    let pm = prev.map(|s| s.metrics.as_str()).unwrap_or("");
    let shed_now = by_label(&cur.metrics, "pgsluice_shed_total", "pool");
    let shed_then = by_label(pm, "pgsluice_shed_total", "pool");
    let cancels = |t: &str| {
        by_label(t, "pgsluice_cancels_total", "pool")
            .values()
            .sum::<f64>()
    };
    let servers: BTreeMap<String, (u64, u64)> = p["pools"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let name = e["pool"].as_str().unwrap_or("").to_string();
                    (name, (u(&e["server_connections"]), u(&e["server_idle"])))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut pools = Vec::new();
    if let Some(m) = g["pools"].as_object() {
        for (name, v) in m {
            let cb = buckets(&cur.metrics, "pgsluice_queue_wait_seconds_bucket", name);
            let pb = buckets(pm, "pgsluice_queue_wait_seconds_bucket", name);
            let (sv, idle) = servers.get(name).copied().unwrap_or_default();
            pools.push(PoolRow {
                name: name.clone(),
                active: u(&v["active"]),
                queued: u(&v["queued"]),
                leased: u(&v["leased"]),
                capacity: u(&v["capacity"]),
                servers: sv,
                idle,
                wait_p50_ms: quantile(&cb, &pb, 0.5).map(|s| s * 1e3),
                wait_p99_ms: quantile(&cb, &pb, 0.99).map(|s| s * 1e3),
                shed_per_s: rate(
                    shed_now.get(name).copied().unwrap_or(0.0),
                    prev.map(|_| shed_then.get(name).copied().unwrap_or(0.0)),
                    secs,
                ),
            });
        }
    }
    let prev_ids = prev.map(|s| s.pools["guard"]["identities"].clone());
    let mut identities = Vec::new();
    if let Some(m) = g["identities"].as_object() {
        for (name, v) in m {
            let before = prev_ids.as_ref().map(|p| &p[name]);
            let was = |k: &str| before.map(|b| u(&b[k]) as f64);
            identities.push(IdentityRow {
                name: name.clone(),
                active: u(&v["active"]),
                queued: u(&v["queued"]),
                weight: u(&v["weight"]),
                admitted_per_s: rate(u(&v["admitted_total"]) as f64, was("admitted_total"), secs),
                shed_per_s: rate(u(&v["shed_total"]) as f64, was("shed_total"), secs),
            });
        }
    }
    identities.sort_by(|a, b| {
        (b.active + b.queued)
            .cmp(&(a.active + a.queued))
            .then(a.name.cmp(&b.name))
    });
    View {
        upstream: p["upstream"].as_str().unwrap_or("").to_string(),
        upstream_up: p["upstream_up"].as_bool().unwrap_or(false),
        active: u(&g["active"]),
        limit: u(&g["limit"]),
        queued: u(&g["queued"]),
        paused: g["paused"].as_bool().unwrap_or(false),
        circuit: g["circuit"].as_str().unwrap_or("?").to_string(),
        standing_queue: g["standing_queue"].as_bool().unwrap_or(false),
        clients: u(&p["clients"]["total"]),
        clients_waiting: u(&p["clients"]["waiting"]),
        cancels_per_s: rate(
            cancels(&cur.metrics),
            prev.map(|s| cancels(&s.metrics)),
            secs,
        ),
        pools,
        identities,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: u64, admitted: u64, shed: u64, waits: [u64; 3]) -> Sample {
        let pools = serde_json::json!({
            "upstream": "127.0.0.1:5432",
            "upstream_up": true,
            "clients": {"total": 5, "active": 2, "waiting": 3},
            "guard": {
                "active": 2, "limit": 2, "queued": 3, "paused": false, "circuit": "closed",
                "standing_queue": false,
                "pools": {"db/u": {"active": 2, "queued": 3, "leased": 2, "capacity": 4}},
                "identities": {"app": {"active": 2, "queued": 3, "weight": 1,
                    "admitted_total": admitted, "shed_total": shed}},
            },
            "pools": [{"pool": "db/u", "server_connections": 3, "server_idle": 1}],
        });
        let metrics = format!(
            "# TYPE pgsluice_queue_wait_seconds histogram\n\
             pgsluice_queue_wait_seconds_bucket{{pool=\"db/u\",le=\"0.001\"}} {}\n\
             pgsluice_queue_wait_seconds_bucket{{pool=\"db/u\",le=\"0.1\"}} {}\n\
             pgsluice_queue_wait_seconds_bucket{{pool=\"db/u\",le=\"+Inf\"}} {}\n\
             pgsluice_shed_total{{pool=\"db/u\",reason=\"queue_full\"}} {shed}\n",
            waits[0], waits[1], waits[2]
        );
        Sample {
            at: Duration::from_secs(at),
            pools,
            metrics,
        }
    }

    #[test]
    fn levels_rates_and_quantiles() {
        let a = sample(0, 100, 10, [50, 90, 100]);
        let b = sample(2, 140, 30, [50, 90, 200]);
        let v = view(Some(&a), &b);
        assert_eq!((v.active, v.limit, v.queued, v.clients), (2, 2, 3, 5));
        let p = &v.pools[0];
        assert_eq!((p.servers, p.idle, p.leased, p.capacity), (3, 1, 2, 4));
        assert_eq!(p.shed_per_s, 10.0);
        // All 100 waits of the interval were above 100 ms.
        assert_eq!(p.wait_p50_ms, Some(f64::INFINITY));
        let i = &v.identities[0];
        assert_eq!((i.admitted_per_s, i.shed_per_s), (20.0, 10.0));
        // The first poll: quantiles since start, no rates.
        let first = view(None, &a);
        assert_eq!(first.pools[0].wait_p50_ms, Some(1.0));
        assert_eq!(first.pools[0].wait_p99_ms, Some(f64::INFINITY));
        assert_eq!(first.identities[0].admitted_per_s, 0.0);
    }

    #[test]
    fn no_observations_no_quantile() {
        let a = sample(0, 0, 0, [0, 0, 0]);
        assert_eq!(view(None, &a).pools[0].wait_p99_ms, None);
    }
}
