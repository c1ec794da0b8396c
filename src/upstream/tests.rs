use super::*;
use crate::config::Upstream;

fn topo(url: &str, max_lag: Option<u64>) -> Arc<Topology> {
    Topology::new(&Upstream::parse(url).unwrap(), max_lag)
}

fn three() -> Arc<Topology> {
    topo("postgres://u@a:1,b:2,c:3/app", Some(100))
}

#[test]
fn one_host_is_never_judged() {
    let t = topo("postgres://u@a:1/app", None);
    t.observe(0, Role::Down, None);
    assert_eq!(t.candidates(Route::Primary), Ok(vec![0]));
    assert_eq!(t.candidates(Route::Replica), Ok(vec![0]));
    assert!(t.still_fits(0, Route::Primary));
    let standby = [("in_hot_standby".to_string(), "on".to_string())];
    assert!(t.accepts_login(Route::Primary, &standby));
}

#[test]
fn before_any_check_every_host_is_tried_and_logins_prove_the_role() {
    let t = three();
    assert_eq!(t.candidates(Route::Primary), Ok(vec![0, 1, 2]));
    let standby = [("in_hot_standby".to_string(), "on".to_string())];
    let primary = [("in_hot_standby".to_string(), "off".to_string())];
    assert!(!t.accepts_login(Route::Primary, &standby));
    assert!(t.accepts_login(Route::Primary, &primary));
    assert!(t.accepts_login(Route::Replica, &standby));
    assert!(t.primary_route_up().is_err(), "nothing checked yet");
}

#[test]
fn writes_follow_the_primary_and_reads_the_least_loaded_standby() {
    let t = three();
    t.observe(0, Role::Primary, Some(1000));
    t.observe(1, Role::Standby, Some(990));
    t.observe(2, Role::Standby, Some(1000));
    assert_eq!(t.candidates(Route::Primary), Ok(vec![0]));
    assert!(t.primary_route_up().is_ok());
    // Both standbys fit; equal load keeps the listed order, the primary comes last.
    assert_eq!(t.candidates(Route::Replica), Ok(vec![1, 2, 0]));
    let _open = t.count_open(1);
    assert_eq!(t.candidates(Route::Replica), Ok(vec![2, 1, 0]));
    assert!(t.still_fits(0, Route::Primary));
    assert!(!t.still_fits(1, Route::Primary));
    assert!(t.still_fits(1, Route::Replica));
    drop(_open);
    assert_eq!(t.host(1).open_connections(), 0);

    // Failover: the primary goes, then host 2 is promoted.
    let changes = t.subscribe();
    t.observe(0, Role::Down, None);
    assert!(changes.has_changed().unwrap());
    assert!(matches!(
        t.candidates(Route::Primary),
        Err(NoHost::NoPrimary(_))
    ));
    assert!(!t.still_fits(0, Route::Primary));
    t.observe(2, Role::Primary, Some(1200));
    assert_eq!(t.candidates(Route::Primary), Ok(vec![2]));
    // Host 1 is 210 bytes behind the new primary: past the bound, reads go to the primary.
    assert_eq!(t.lag_bytes(1), Some(210));
    assert_eq!(t.candidates(Route::Replica), Ok(vec![2]));
    assert!(!t.still_fits(1, Route::Replica));
    assert!(
        t.still_fits(2, Route::Replica),
        "the primary reads while no standby can"
    );
    t.observe(1, Role::Standby, Some(1150));
    assert_eq!(t.candidates(Route::Replica), Ok(vec![1, 2]));
    assert!(
        !t.still_fits(2, Route::Replica),
        "reads move back to the standby"
    );
    assert_eq!(t.host(0).role_changes.load(Ordering::Relaxed), 2);
}

#[test]
fn two_primaries_stop_writes_but_not_reads() {
    let t = three();
    t.observe(0, Role::Primary, Some(10));
    t.observe(1, Role::Primary, Some(10));
    t.observe(2, Role::Standby, Some(10));
    let e = t.candidates(Route::Primary).unwrap_err();
    assert!(matches!(e, NoHost::TwoPrimaries(_)));
    assert!(e.to_string().contains("a:1, b:2"), "{e}");
    assert!(!t.still_fits(0, Route::Primary));
    assert!(t.primary_route_up().is_err());
    assert_eq!(t.candidates(Route::Replica).unwrap()[0], 2);
}

#[test]
fn target_any_takes_the_first_live_host() {
    let t = topo("postgres://u@a:1,b:2/app?target_session_attrs=any", None);
    t.observe(0, Role::Down, None);
    t.observe(1, Role::Standby, Some(1));
    assert_eq!(t.candidates(Route::Primary), Ok(vec![1]));
    assert!(t.still_fits(1, Route::Primary));
    t.observe(1, Role::Down, None);
    assert!(matches!(
        t.candidates(Route::Primary),
        Err(NoHost::AllDown(_))
    ));
    // Two primaries are no conflict when any host will do (one server under two names).
    t.observe(0, Role::Primary, Some(5));
    t.observe(1, Role::Primary, Some(5));
    assert_eq!(t.candidates(Route::Primary), Ok(vec![0, 1]));
    assert_eq!(t.candidates(Route::Replica), Ok(vec![0, 1]));
    assert!(t.still_fits(1, Route::Primary));
}

#[test]
fn read_suffix_names_the_route() {
    assert_eq!(Route::of_database("app@ro"), ("app", Route::Replica));
    assert_eq!(Route::of_database("app"), ("app", Route::Primary));
    assert_eq!(Route::of_database("@ro"), ("@ro", Route::Primary));
}
