use super::*;

fn cfg(args: &[&str]) -> Result<Config> {
    let mut v = vec!["pgsluice"];
    v.extend_from_slice(args);
    Config::from_args(v)
}

#[test]
fn defaults_follow_the_contract() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.listen, "127.0.0.1:6432".parse().unwrap());
    assert_eq!(c.pool_size, 20);
    assert_eq!(c.max_active, 20);
    assert_eq!(c.max_queue, 1000);
    assert_eq!(c.queue_timeout, Duration::from_secs(5));
    assert_eq!(c.query_timeout, None);
    assert_eq!(c.pool_mode, PoolMode::Transaction);
    assert_eq!(c.auth, AuthMethod::Trust);
    assert_eq!(c.upstream.first().port, 5432);
}

#[test]
fn byte_sizes() {
    assert_eq!(parse_bytes("1048576"), Some(1 << 20));
    assert_eq!(parse_bytes("16MB"), Some(16 << 20));
    assert_eq!(parse_bytes("512kB"), Some(512 << 10));
    assert_eq!(parse_bytes("1 GB"), Some(1 << 30));
    assert_eq!(parse_bytes("lots"), None);
    assert_eq!(parse_bytes("5TB"), None);
    let c = cfg(&["--max-replica-lag", "0"]).unwrap();
    assert_eq!(c.max_replica_lag, None);
    assert!(cfg(&["--max-replica-lag", "far"]).is_err());
}

#[test]
fn bad_values_name_themselves() {
    let e = cfg(&["--queue-timeout", "soon"]).unwrap_err().to_string();
    assert!(e.contains("--queue-timeout \"soon\""), "{e}");
    let e = cfg(&["--share", "a=0"]).unwrap_err().to_string();
    assert!(e.contains("--share"), "{e}");
    let e = cfg(&["--listen", "0.0.0.0:6432"]).unwrap_err().to_string();
    assert!(e.contains("--auth"), "{e}");
    let e = cfg(&["--upstream", "mysql://x"]).unwrap_err().to_string();
    assert!(e.contains("scheme"), "{e}");
    assert!(cfg(&["--pool-size", "0"]).is_err());
    assert!(cfg(&["--pool-size", "many"]).is_err());
}

#[test]
fn file_fills_what_flags_leave() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "pool_size = 7\nmax-queue = 3\nshare = [\"a=2\"]\nqueue-timeout = \"300ms\"\n",
    )
    .unwrap();
    let c = cfg(&["--config", p.to_str().unwrap(), "--max-queue", "9"]).unwrap();
    assert_eq!(c.pool_size, 7);
    assert_eq!(c.max_queue, 9);
    assert_eq!(c.shares.get("a"), Some(&2));
    assert_eq!(c.queue_timeout, Duration::from_millis(300));
    std::fs::write(&p, "pool-sise = 7\n").unwrap();
    let e = cfg(&["--config", p.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("pool-sise"), "{e}");
}

#[test]
fn max_active_auto_from_flags_and_toml() {
    let c = cfg(&["--max-active", "auto", "--pool-size", "8"]).unwrap();
    assert_eq!(c.adaptive, Some((2, usize::MAX)));
    assert_eq!(c.max_active, 8);
    let c = cfg(&[
        "--max-active",
        "AUTO",
        "--max-active-min",
        "3",
        "--max-active-max",
        "6",
    ])
    .unwrap();
    assert_eq!(c.adaptive, Some((3, 6)));
    assert_eq!(c.max_active, 6);
    let c = Config::from_toml_str("max-active = \"auto\"\nmax_active_max = 5\n").unwrap();
    assert_eq!(c.adaptive, Some((2, 5)));
    let c = Config::from_toml_str("max-active = 7\n").unwrap();
    assert_eq!((c.max_active, c.adaptive), (7, None));
    assert!(cfg(&["--max-active", "sometimes"]).is_err());
    assert!(cfg(&["--max-active", "4", "--max-active-min", "2"]).is_err());
    assert!(cfg(&[
        "--max-active",
        "auto",
        "--max-active-min",
        "5",
        "--max-active-max",
        "4"
    ])
    .is_err());
    assert!(cfg(&["--max-active", "auto", "--max-active-min", "0"]).is_err());
    assert!(Config::from_toml_str("max-active = \"x\"\n").is_err());
    assert_eq!(cfg(&[]).unwrap().adaptive, None);
}

#[test]
fn toml_text_builds_without_a_file() {
    let c = Config::from_toml_str("pool_size = 3\nqueue-timeout = \"250ms\"\n").unwrap();
    assert_eq!(c.pool_size, 3);
    assert_eq!(c.queue_timeout, Duration::from_millis(250));
    assert!(Config::from_toml_str("pool-size = 0\n").is_err());
    assert!(Config::from_toml_str("pool-size = [\n").is_err());
    assert!(Config::from_toml_str("nonsense = 1\n").is_err());
}
