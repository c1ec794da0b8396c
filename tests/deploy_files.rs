//! Static checks of the deploy files (no container engine needed): they parse, every file
//! they mount exists, and every metric they query is one the proxy exports. When `promtool`
//! is installed, the Prometheus config, alert rules and dashboard queries are also checked by
//! Prometheus' own parser.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use pgsluice::metrics::ALL;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn yaml(rel: &str) -> Yaml {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn str_of<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v:?}"))
}

/// Every `pgsluice_*` metric referenced in a PromQL expression, with histogram series
/// suffixes stripped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while let Some(pos) = expr[i..].find("pgsluice_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && is_ident(bytes[end]) {
            end += 1;
        }
        if start == 0 || !is_ident(bytes[start - 1]) {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(base.to_string());
        }
        i = end;
    }
    out
}

fn assert_known_metrics(expr: &str, context: &str) -> usize {
    let known: BTreeSet<&str> = ALL.iter().map(|(n, _)| *n).collect();
    let used = metric_names(expr);
    for name in &used {
        assert!(
            known.contains(name.as_str()),
            "{context}: metric {name} is not exported (not in pgsluice::metrics::ALL): {expr}"
        );
    }
    used.len()
}

/// Host and container side of a compose volume (short or long syntax) when it is a bind mount.
fn bind_source(vol: &Yaml) -> Option<(String, String)> {
    match vol {
        Yaml::String(s) => {
            let mut parts = s.splitn(3, ':');
            let host = parts.next()?;
            let target = parts.next()?;
            (host.starts_with('.') || host.starts_with('/'))
                .then(|| (host.to_string(), target.to_string()))
        }
        Yaml::Mapping(_) if vol.get("type").and_then(Yaml::as_str) == Some("bind") => Some((
            str_of(&vol["source"], "volume source").to_string(),
            str_of(&vol["target"], "volume target").to_string(),
        )),
        _ => None,
    }
}

fn compose_path(host: &str) -> PathBuf {
    let p = Path::new(host);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root().join(p)
    }
}

fn mounts_of(compose: &Yaml, service: &str) -> Vec<(String, String)> {
    compose["services"][service]["volumes"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{service} has no volumes"))
        .iter()
        .filter_map(bind_source)
        .collect()
}

#[test]
fn compose_parses_and_everything_it_mounts_or_builds_exists() {
    let doc = yaml("docker-compose.yml");
    let services = doc["services"]
        .as_mapping()
        .expect("docker-compose.yml has a services mapping");
    let names: BTreeSet<&str> = services.keys().filter_map(Yaml::as_str).collect();
    for want in ["postgres", "pgsluice", "prometheus", "grafana"] {
        assert!(names.contains(want), "service {want} missing: {names:?}");
    }

    let mut mounts = 0;
    for (name, svc) in services {
        let name = str_of(name, "service name");
        match &svc["build"] {
            Yaml::Null => {}
            Yaml::String(ctx) => assert!(
                compose_path(ctx).join("Dockerfile").is_file(),
                "{name}: no Dockerfile in {ctx}"
            ),
            b => {
                let ctx = b["context"].as_str().unwrap_or(".");
                let file = b["dockerfile"].as_str().unwrap_or("Dockerfile");
                assert!(
                    compose_path(ctx).join(file).is_file(),
                    "{name}: no {file} in {ctx}"
                );
            }
        }
        if let Some(vols) = svc["volumes"].as_sequence() {
            for v in vols {
                if let Some((host, _)) = bind_source(v) {
                    assert!(compose_path(&host).exists(), "{name} mounts missing {host}");
                    mounts += 1;
                }
            }
        }
    }
    assert!(mounts >= 5, "expected the config mounts, found {mounts}");

    let pg = &doc["services"]["postgres"];
    assert_eq!(pg["image"].as_str(), Some("postgres:15"));
    assert!(pg["environment"]["POSTGRES_PASSWORD"].as_str().is_some());
    let hc = serde_norway::to_string(&pg["healthcheck"]["test"]).unwrap_or_default();
    assert!(hc.contains("pg_isready"), "postgres healthcheck: {hc}");

    // A proxy listening beyond loopback must name its client auth method.
    let cmd: Vec<&str> = doc["services"]["pgsluice"]["command"]
        .as_sequence()
        .expect("pgsluice command is a list")
        .iter()
        .map(|a| str_of(a, "command argument"))
        .collect();
    let arg = |flag: &str| {
        cmd.iter()
            .position(|a| *a == flag)
            .and_then(|i| cmd.get(i + 1).copied())
    };
    assert_eq!(arg("--listen"), Some("0.0.0.0:6432"));
    assert_eq!(arg("--admin-listen"), Some("0.0.0.0:9930"));
    assert_eq!(arg("--auth"), Some("scram-sha-256"));
    assert!(arg("--upstream").is_some_and(|u| u.contains("@postgres:5432/")));
    let users = arg("--users").expect("--users given");
    let px_mounts = mounts_of(&doc, "pgsluice");
    assert!(
        px_mounts.iter().any(|(_, target)| target == users),
        "--users {users} is not mounted: {px_mounts:?}"
    );
}

#[test]
fn prometheus_rule_files_resolve_beside_the_config_on_disk_and_in_the_container() {
    let prom = yaml("deploy/prometheus.yml");
    let jobs = prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|j| j["job_name"].as_str() == Some("pgsluice"))
        .expect("a pgsluice scrape job");
    assert_eq!(job["scrape_interval"].as_str(), Some("5s"));
    let targets = serde_norway::to_string(&job["static_configs"]).unwrap_or_default();
    assert!(targets.contains("pgsluice:9930"), "{targets}");

    let compose = yaml("docker-compose.yml");
    let mounts = mounts_of(&compose, "prometheus");
    let config_target = mounts
        .iter()
        .find(|(h, _)| h.trim_start_matches("./") == "deploy/prometheus.yml")
        .map(|(_, t)| t.clone())
        .expect("deploy/prometheus.yml is mounted");
    let config_dir = Path::new(&config_target).parent().expect("config dir");

    let rules = prom["rule_files"].as_sequence().expect("rule_files");
    assert!(!rules.is_empty());
    for r in rules {
        let r = str_of(r, "rule file");
        assert!(!r.starts_with('/'), "keep rule file paths relative: {r}");
        let on_disk = root().join("deploy").join(r);
        assert!(on_disk.is_file(), "{} missing", on_disk.display());
        let in_container = config_dir.join(r);
        let mounted = mounts.iter().any(|(h, t)| {
            Path::new(t) == in_container && root().join(h.trim_start_matches("./")) == on_disk
        });
        assert!(
            mounted,
            "{r} resolves to {} in the container, which does not mount deploy/{r}",
            in_container.display()
        );
    }
}

#[test]
fn alert_rules_parse_and_use_exported_metrics() {
    let doc = yaml("deploy/alerts.yml");
    let mut alerts = BTreeSet::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = str_of(&rule["alert"], "alert name");
            let expr = str_of(&rule["expr"], "alert expr");
            assert_known_metrics(expr, name);
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name} severity"
            );
            alerts.insert(name.to_string());
        }
    }
    for want in [
        "PgsluiceSaturated",
        "PgsluiceShedding",
        "PgsluiceCircuitOpen",
        "PgsluiceUpstreamDown",
    ] {
        assert!(alerts.contains(want), "alert {want} missing: {alerts:?}");
    }
}

fn dashboard_exprs() -> Vec<(String, String)> {
    let dash: Json = serde_json::from_str(&read("deploy/grafana/dashboards/pgsluice.json"))
        .expect("dashboard is valid JSON");
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("panel title").to_string();
        assert_eq!(panel["datasource"]["uid"], "prometheus", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no queries");
        for t in targets {
            let expr = t["expr"].as_str().expect("target expr").to_string();
            out.push((title.clone(), expr));
        }
    }
    out
}

#[test]
fn dashboard_queries_use_exported_metrics_from_the_provisioned_datasource() {
    let exprs = dashboard_exprs();
    let mut covered = BTreeSet::new();
    for (title, expr) in &exprs {
        let n = assert_known_metrics(expr, title);
        assert!(n > 0, "{title}: query uses no pgsluice metric: {expr}");
        covered.extend(metric_names(expr));
    }
    for want in [
        "pgsluice_active_queries",
        "pgsluice_concurrency_limit",
        "pgsluice_queue_depth",
        "pgsluice_queue_wait_seconds",
        "pgsluice_query_duration_seconds",
        "pgsluice_shed_total",
        "pgsluice_cancels_total",
        "pgsluice_upstream_up",
        "pgsluice_circuit_state",
        "pgsluice_client_connections",
        "pgsluice_server_connections",
    ] {
        assert!(covered.contains(want), "no panel shows {want}");
    }

    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let uids: Vec<&str> = ds["datasources"]
        .as_sequence()
        .expect("datasources")
        .iter()
        .filter_map(|d| d["uid"].as_str())
        .collect();
    assert_eq!(uids, ["prometheus"]);
    let provider = yaml("deploy/grafana/provisioning/dashboards/pgsluice.yml");
    let path = str_of(
        &provider["providers"][0]["options"]["path"],
        "provider path",
    );
    let compose = yaml("docker-compose.yml");
    let grafana_mounts = mounts_of(&compose, "grafana");
    assert!(
        grafana_mounts
            .iter()
            .any(|(h, t)| t == path && h.ends_with("deploy/grafana/dashboards")),
        "dashboard provider path {path} is not the mounted dashboards folder"
    );
    assert!(
        grafana_mounts
            .iter()
            .any(|(h, t)| t == "/etc/grafana/provisioning"
                && h.ends_with("deploy/grafana/provisioning")),
        "provisioning folder not mounted: {grafana_mounts:?}"
    );
}

#[test]
fn metric_name_scan_strips_histogram_suffixes() {
    let names = metric_names(
        "histogram_quantile(0.9, rate(pgsluice_queue_wait_seconds_bucket[1m])) / x_pgsluice_y + pgsluice_shed_total",
    );
    let want: BTreeSet<String> = ["pgsluice_queue_wait_seconds", "pgsluice_shed_total"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
}

#[test]
fn kubernetes_sidecar_points_the_app_at_loopback_and_probes_admin() {
    let doc = yaml("deploy/kubernetes/sidecar.yaml");
    assert_eq!(doc["kind"].as_str(), Some("Deployment"));
    let containers = doc["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    let by_name = |n: &str| {
        containers
            .iter()
            .find(|c| c["name"].as_str() == Some(n))
            .unwrap_or_else(|| panic!("container {n} missing"))
    };
    let app_env = serde_norway::to_string(&by_name("app")["env"]).unwrap_or_default();
    assert!(
        app_env.contains("DATABASE_URL") && app_env.contains("@127.0.0.1:6432/"),
        "{app_env}"
    );

    let px = by_name("pgsluice");
    let args = serde_norway::to_string(&px["args"]).unwrap_or_default();
    assert!(args.contains("--listen=127.0.0.1:6432"), "{args}");
    assert!(args.contains("--admin-listen=0.0.0.0:9930"), "{args}");
    assert_eq!(
        px["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        px["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    let env = serde_norway::to_string(&px["env"]).unwrap_or_default();
    assert!(
        env.contains("PGSLUICE_UPSTREAM") && env.contains("secretKeyRef"),
        "{env}"
    );
    assert!(px["resources"]["requests"].as_mapping().is_some());
}

#[test]
fn example_users_file_has_name_secret_lines() {
    let text = read("deploy/users.example.txt");
    let entries: Vec<_> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(!entries.is_empty());
    for l in entries {
        let (name, secret) = l.split_once(':').unwrap_or_else(|| panic!("no ':' in {l}"));
        assert!(!name.is_empty() && !secret.is_empty(), "{l}");
    }
}

fn promtool() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file())
}

fn run_promtool(bin: &Path, args: &[&str]) {
    let out = Command::new(bin)
        .args(args)
        .current_dir(root())
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_config_rules_and_dashboard_queries() {
    let Some(bin) = promtool() else {
        eprintln!("skipped: promtool not on PATH (Debian package `prometheus` provides it)");
        return;
    };
    run_promtool(&bin, &["check", "config", "deploy/prometheus.yml"]);
    run_promtool(&bin, &["check", "rules", "deploy/alerts.yml"]);

    // Dashboard queries as recording rules, so Prometheus' own parser sees each one.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in dashboard_exprs().iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "1m");
        let quoted = serde_json::to_string(&expr).expect("quote expr");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard_rules.yml");
    std::fs::write(&file, rules).expect("write rules");
    let file = file.to_str().expect("utf-8 temp path");
    run_promtool(&bin, &["check", "rules", file]);
}
