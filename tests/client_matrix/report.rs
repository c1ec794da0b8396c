//! Results of the client matrix: one check per JSON line, a cell per (client, mode), and
//! the markdown table written to `target/client-matrix.md`.

use std::fmt::Write as _;

/// One check a workload reported.
#[derive(Clone, Debug)]
pub struct Check {
    pub check: String,
    pub ok: bool,
    /// The driver has no way to do this; `detail` says why.
    pub not_applicable: bool,
    pub detail: String,
}

impl Check {
    pub fn new(check: &str, ok: bool, detail: impl Into<String>) -> Check {
        Check {
            check: check.to_string(),
            ok,
            not_applicable: false,
            detail: detail.into(),
        }
    }

    pub fn not_applicable(check: &str, why: impl Into<String>) -> Check {
        Check {
            not_applicable: true,
            ..Check::new(check, true, why)
        }
    }
}

#[derive(Clone, Debug)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

/// One client in one pool mode.
#[derive(Clone, Debug)]
pub struct Cell {
    pub outcome: Outcome,
    pub checks: Vec<Check>,
}

impl Cell {
    pub fn skip(reason: impl Into<String>) -> Cell {
        Cell {
            outcome: Outcome::Skip(reason.into()),
            checks: Vec::new(),
        }
    }

    /// Pass only when the workload ended cleanly, reported checks and none of them failed.
    pub fn judge(checks: Vec<Check>, ended: Result<(), String>) -> Cell {
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.check, c.detail))
            .collect();
        let outcome = if !failed.is_empty() {
            Outcome::Fail(failed.join("; "))
        } else if let Err(e) = ended {
            Outcome::Fail(e)
        } else if checks.is_empty() {
            Outcome::Fail("the workload reported no checks".into())
        } else {
            Outcome::Pass
        };
        Cell { outcome, checks }
    }

    pub fn summary(&self) -> String {
        match &self.outcome {
            Outcome::Pass => {
                let names: Vec<String> = self
                    .checks
                    .iter()
                    .map(|c| {
                        if c.not_applicable {
                            format!("{} n/a", c.check)
                        } else {
                            c.check.clone()
                        }
                    })
                    .collect();
                format!("pass ({})", names.join(", "))
            }
            Outcome::Fail(why) => format!("**FAIL** {}", one_line(why)),
            Outcome::Skip(why) => format!("skipped: {}", one_line(why)),
        }
    }
}

/// Parses a workload's stdout: one JSON object per line with `check`, `ok`, `detail`;
/// any other line is ignored.
pub fn parse_checks(stdout: &str) -> Vec<Check> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter_map(|v| {
            Some(Check {
                check: v.get("check")?.as_str()?.to_string(),
                ok: v.get("ok")?.as_bool()?,
                not_applicable: v
                    .get("not_applicable")
                    .and_then(|n| n.as_bool())
                    .unwrap_or(false),
                detail: v
                    .get("detail")
                    .and_then(|d| d.as_str())
                    .unwrap_or("")
                    .to_string(),
            })
        })
        .collect()
}

fn one_line(s: &str) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c == '\n' || c == '|' { ' ' } else { c })
        .collect();
    if flat.chars().count() > 300 {
        let cut: String = flat.chars().take(300).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

/// A client's row: its name, what it ran with, and its two cells.
pub struct Row {
    pub client: String,
    pub version: String,
    pub transaction: Cell,
    pub session: Cell,
}

/// The table spliced into README, then every check's detail.
pub fn markdown(rows: &[Row], context: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| client | version | transaction mode | session mode |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            r.client,
            one_line(&r.version),
            r.transaction.summary(),
            r.session.summary()
        );
    }
    let _ = writeln!(out, "\n{context}");
    let _ = writeln!(out, "\n<!-- details -->\n");
    for r in rows {
        for (mode, cell) in [("transaction", &r.transaction), ("session", &r.session)] {
            let _ = writeln!(out, "### {} — {mode} mode\n", r.client);
            if let Outcome::Skip(why) = &cell.outcome {
                let _ = writeln!(out, "- skipped: {}", one_line(why));
            }
            if let Outcome::Fail(why) = &cell.outcome {
                if cell.checks.iter().all(|c| c.ok) {
                    let _ = writeln!(out, "- failed: {}", one_line(why));
                }
            }
            for c in &cell.checks {
                let mark = match (c.ok, c.not_applicable) {
                    (_, true) => "n/a",
                    (true, false) => "ok",
                    (false, false) => "FAILED",
                };
                let _ = writeln!(out, "- `{}` {mark}: {}", c.check, one_line(&c.detail));
            }
            out.push('\n');
        }
    }
    out
}

/// The plain-text table printed by the test.
pub fn text_table(rows: &[Row]) -> String {
    let mut out = String::new();
    let w = rows
        .iter()
        .map(|r| r.client.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        out,
        "{:w$}  {:11}  {:11}",
        "client", "transaction", "session"
    );
    for r in rows {
        let word = |c: &Cell| match &c.outcome {
            Outcome::Pass => "pass".to_string(),
            Outcome::Fail(_) => "FAIL".to_string(),
            Outcome::Skip(_) => "skip".to_string(),
        };
        let _ = writeln!(
            out,
            "{:w$}  {:11}  {:11}",
            r.client,
            word(&r.transaction),
            word(&r.session)
        );
        for (mode, cell) in [("transaction", &r.transaction), ("session", &r.session)] {
            match &cell.outcome {
                Outcome::Pass => {}
                Outcome::Fail(why) | Outcome::Skip(why) => {
                    let _ = writeln!(out, "    {mode}: {}", one_line(why));
                }
            }
        }
    }
    out
}

#[test]
fn judging_needs_clean_exit_and_all_checks() {
    let ok = Check::new("a", true, "");
    let bad = Check::new("b", false, "boom");
    assert!(matches!(
        Cell::judge(vec![ok.clone()], Ok(())).outcome,
        Outcome::Pass
    ));
    assert!(matches!(
        Cell::judge(vec![], Ok(())).outcome,
        Outcome::Fail(_)
    ));
    assert!(matches!(
        Cell::judge(vec![ok.clone()], Err("exit 1".into())).outcome,
        Outcome::Fail(_)
    ));
    match Cell::judge(vec![ok, bad], Ok(())).outcome {
        Outcome::Fail(why) => assert!(why.contains("b: boom")),
        o => panic!("{o:?}"),
    }
    let parsed = parse_checks("noise\n{\"check\":\"x\",\"ok\":false,\"detail\":\"d\"}\n");
    assert_eq!(parsed.len(), 1);
    assert!(!parsed[0].ok);
}
