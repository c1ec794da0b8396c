//! Scripts: what a client writes and exactly what PostgreSQL must answer, message by message,
//! and the executor that runs one against a connection and judges every answer.
//!
//! A mismatch is a wrong answer unless it is an ErrorResponse whose SQLSTATE is documented
//! for the situation (see `Policy::judge`); then the operation counts as refused, the rest of
//! what was already sent is drained, and the client moves on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::faults::FaultLog;
use super::wire::{cancel, Conn, Fields, Msg, Out, WireErr};

/// Longest wait for any one answer beyond the operation's own known run time.
pub const STALL: Duration = Duration::from_secs(10);

type Row = Vec<Option<Vec<u8>>>;

#[derive(Clone, Debug)]
pub enum Exp {
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    EmptyQuery,
    PortalSuspended,
    ParamDesc(usize),
    RowDesc(usize),
    Row(Row),
    /// One DataRow equal to one of these (a state the oracle cannot pin down to one).
    RowOneOf(Vec<Row>),
    Complete(String),
    Error(&'static str),
    Notice(String),
    CopyIn,
    CopyOut,
    CopyData(Vec<u8>),
    CopyDone,
    Ready(u8),
}

fn row_eq(want: &Row, got: &[Option<Bytes>]) -> bool {
    want.len() == got.len()
        && want
            .iter()
            .zip(got)
            .all(|(w, g)| w.as_deref() == g.as_deref())
}

impl Exp {
    fn matches(&self, m: &Msg) -> bool {
        match (self, m) {
            (Exp::ParseComplete, Msg::ParseComplete)
            | (Exp::BindComplete, Msg::BindComplete)
            | (Exp::CloseComplete, Msg::CloseComplete)
            | (Exp::NoData, Msg::NoData)
            | (Exp::EmptyQuery, Msg::EmptyQuery)
            | (Exp::PortalSuspended, Msg::PortalSuspended)
            | (Exp::CopyIn, Msg::CopyIn)
            | (Exp::CopyOut, Msg::CopyOut)
            | (Exp::CopyDone, Msg::CopyDone) => true,
            (Exp::ParamDesc(a), Msg::ParamDesc(b)) | (Exp::RowDesc(a), Msg::RowDesc(b)) => a == b,
            (Exp::Row(w), Msg::Row(g)) => row_eq(w, g),
            (Exp::RowOneOf(ws), Msg::Row(g)) => ws.iter().any(|w| row_eq(w, g)),
            (Exp::Complete(a), Msg::Complete(b)) => a == b,
            (Exp::Error(c), Msg::Error(f)) => *c == f.code,
            (Exp::Notice(a), Msg::Notice(f)) => *a == f.message,
            (Exp::CopyData(a), Msg::CopyData(b)) => a[..] == b[..],
            (Exp::Ready(a), Msg::Ready(b)) => a == b,
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Exp::Row(r) => {
                Msg::Row(r.iter().map(|v| v.clone().map(Bytes::from)).collect()).describe()
            }
            Exp::RowOneOf(rs) => format!(
                "one of {} rows, e.g. {}",
                rs.len(),
                Exp::Row(rs[0].clone()).describe()
            ),
            Exp::CopyData(b) => Msg::CopyData(Bytes::from(b.clone())).describe(),
            Exp::Ready(s) => format!("Ready {}", *s as char),
            e => format!("{e:?}"),
        }
    }
}

pub enum Item {
    /// One write; `commit` marks the write that may commit the operation's changes.
    Send {
        out: Out,
        commit: bool,
    },
    Expect(Exp),
    Pause(Duration),
    /// A CancelRequest for this connection after the delay, while the script goes on.
    Cancel(Duration),
    /// Drop the socket here (a client killed mid-work); ends the operation.
    Kill,
}

pub struct Script {
    pub name: &'static str,
    pub items: Vec<Item>,
    /// SQLSTATEs this operation may be refused with beyond the general rules (57014 when it
    /// cancels itself).
    pub allow: &'static [&'static str],
    /// Known run time (pg_sleep) added to the per-answer bound.
    pub extra: Duration,
    /// Touches only table rows: after a refusal the connection's session state is still
    /// known and the client carries on with it.
    pub pure: bool,
}

impl Script {
    pub fn new(name: &'static str) -> Script {
        Script {
            name,
            items: Vec::new(),
            allow: &[],
            extra: Duration::ZERO,
            pure: true,
        }
    }

    /// The write being assembled (a new one after any expectation).
    pub fn out(&mut self) -> &mut Out {
        if !matches!(self.items.last(), Some(Item::Send { .. })) {
            self.items.push(Item::Send {
                out: Out::default(),
                commit: false,
            });
        }
        match self.items.last_mut() {
            Some(Item::Send { out, .. }) => out,
            _ => unreachable!(),
        }
    }

    /// Marks the write being assembled as the one that may commit.
    pub fn commit_point(&mut self) {
        self.out();
        if let Some(Item::Send { commit, .. }) = self.items.last_mut() {
            *commit = true;
        }
    }

    pub fn exp(&mut self, e: Exp) {
        self.items.push(Item::Expect(e));
    }

    pub fn push(&mut self, i: Item) {
        self.items.push(i);
    }

    /// RowDescription, one DataRow of text values, CommandComplete `SELECT 1`.
    pub fn select1(&mut self, vals: &[&str]) {
        self.exp(Exp::RowDesc(vals.len()));
        self.exp(Exp::Row(text_row(vals)));
        self.exp(Exp::Complete("SELECT 1".into()));
    }

    /// The error codes this script itself expects (they may also appear while draining).
    fn own_errors(&self) -> Vec<&'static str> {
        self.items
            .iter()
            .filter_map(|i| match i {
                Item::Expect(Exp::Error(c)) => Some(*c),
                _ => None,
            })
            .collect()
    }
}

pub fn text_row(vals: &[&str]) -> Row {
    vals.iter().map(|v| Some(v.as_bytes().to_vec())).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fail {
    WrongAnswer,
    UndocumentedError,
    Stall,
    ClosedWithoutError,
    ShedInsideTransaction,
    ShedWithoutOverload,
    Transport,
    Leak,
    Atomicity,
}

impl Fail {
    pub fn label(self) -> &'static str {
        match self {
            Fail::WrongAnswer => "wrong answer",
            Fail::UndocumentedError => "undocumented error",
            Fail::Stall => "stall",
            Fail::ClosedWithoutError => "closed without error",
            Fail::ShedInsideTransaction => "53400 inside a transaction",
            Fail::ShedWithoutOverload => "53400 without overload",
            Fail::Transport => "transport error",
            Fail::Leak => "leak after run",
            Fail::Atomicity => "atomicity",
        }
    }
}

pub enum Outcome {
    Correct,
    /// Refused with a documented SQLSTATE; `closed` when the connection ended with it.
    Refused {
        code: String,
        closed: bool,
    },
    Failed {
        kind: Fail,
        detail: String,
    },
    Killed,
}

pub struct Run {
    pub outcome: Outcome,
    /// Whether a write marked as commit point was sent (so changes may have committed).
    pub commit_sent: bool,
    /// The DataRows that matched, in order.
    pub rows: Vec<Vec<Option<Bytes>>>,
}

/// Decides whether an error is a documented refusal here.
pub struct Policy {
    pub faults: Arc<FaultLog>,
    /// Since when a fault could have hit the server work of this client: the start of the
    /// operation (transaction mode), or of the connection (session mode, direct).
    pub exposed_since: Instant,
    /// Whether the guard may shed here (a workload that keeps its queue standing); where no
    /// query runs long, a refusal means the proxy failed to serve a feasible load.
    pub shed_ok: bool,
}

impl Policy {
    pub fn judge(&self, f: &Fields, in_tx: bool, allow: &[&str]) -> Result<(), String> {
        if allow.contains(&f.code.as_str()) {
            return Ok(());
        }
        match f.code.as_str() {
            "53400" if in_tx => Err("53400 for a statement of an open transaction: a client \
                 holding a server connection must be able to finish its transaction"
                .into()),
            "53400" if self.shed_ok => Ok(()),
            "53400" => Err(
                "53400 although no query runs long enough to make the queue stand: \
                 the clients' load is feasible"
                    .into(),
            ),
            "57P01" | "57P02" | "57P03" | "08006" => {
                if self.faults.excuses(&f.code, self.exposed_since) {
                    Ok(())
                } else {
                    Err(format!("{} with no fault that could explain it", f.code))
                }
            }
            _ => Err("not a documented outcome".into()),
        }
    }
}

fn failed(kind: Fail, detail: String, commit_sent: bool, rows: Vec<Vec<Option<Bytes>>>) -> Run {
    Run {
        outcome: Outcome::Failed { kind, detail },
        commit_sent,
        rows,
    }
}

/// Runs a script to its end, or to the first refusal or failure.
pub async fn execute(conn: &mut Conn, s: &Script, p: &Policy) -> Run {
    let bound = STALL + s.extra;
    let mut sent_readys = 0usize;
    let mut got_readys = 0usize;
    let mut commit_sent = false;
    let mut rows = Vec::new();
    let mut status = conn.status;
    let mut cancels = Vec::new();
    // An extended-protocol batch is open: after an error the server skips to its Sync.
    let mut open = false;
    for item in &s.items {
        match item {
            Item::Send { out, commit } => {
                if let Err(e) = conn.send(&out.buf, &out.what, bound).await {
                    // The other side may have said why before closing.
                    let why = match conn.recv(Duration::from_millis(500)).await {
                        Ok(Msg::Error(f)) => Some(f),
                        _ => None,
                    };
                    return match why {
                        Some(f) => match p.judge(&f, status != b'I', s.allow) {
                            Ok(()) => Run {
                                outcome: Outcome::Refused {
                                    code: f.label(),
                                    closed: true,
                                },
                                commit_sent,
                                rows,
                            },
                            Err(why) => failed(
                                Fail::UndocumentedError,
                                format!("{} {}: {why}", f.code, f.message),
                                commit_sent,
                                rows,
                            ),
                        },
                        None => {
                            failed(transport_kind(&e), format!("write: {e}"), commit_sent, rows)
                        }
                    };
                }
                sent_readys += out.readys;
                commit_sent |= *commit;
                if !out.what.iter().all(|w| w.starts_with("Copy")) {
                    open = out.open;
                }
            }
            Item::Pause(d) => tokio::time::sleep(*d).await,
            Item::Cancel(d) => {
                let (addr, key, d) = (conn.addr, conn.key, *d);
                cancels.push(tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    cancel(addr, key).await;
                }));
            }
            Item::Kill => {
                return Run {
                    outcome: Outcome::Killed,
                    commit_sent,
                    rows,
                }
            }
            Item::Expect(e) => {
                let m = loop {
                    let m = match conn.recv(bound).await {
                        Ok(m) => m,
                        Err(err) => {
                            let detail = format!("expected {}, got {err}", e.describe());
                            return failed(transport_kind(&err), detail, commit_sent, rows);
                        }
                    };
                    // PostgreSQL warns before an immediate shutdown; the error follows.
                    match &m {
                        Msg::Notice(f)
                            if !e.matches(&m) && p.faults.excuses(&f.code, p.exposed_since) => {}
                        _ => break m,
                    }
                };
                if e.matches(&m) {
                    match &m {
                        Msg::Ready(st) => {
                            got_readys += 1;
                            status = *st;
                        }
                        Msg::Row(r) => rows.push(r.clone()),
                        _ => {}
                    }
                    continue;
                }
                let Msg::Error(f) = &m else {
                    let detail = format!("expected {}, got {}", e.describe(), m.describe());
                    return failed(Fail::WrongAnswer, detail, commit_sent, rows);
                };
                if let Err(why) = p.judge(f, status != b'I', s.allow) {
                    let kind = if f.code == "53400" && status != b'I' {
                        Fail::ShedInsideTransaction
                    } else if f.code == "53400" {
                        Fail::ShedWithoutOverload
                    } else {
                        Fail::UndocumentedError
                    };
                    let detail = format!("expected {}, got {}: {why}", e.describe(), m.describe());
                    return failed(kind, detail, commit_sent, rows);
                }
                let code = f.label();
                let fatal = f.severity == "FATAL";
                let mut owed = sent_readys.saturating_sub(got_readys);
                if open && !fatal {
                    let mut sync = Out::default();
                    sync.sync();
                    if let Err(e) = conn.send(&sync.buf, &sync.what, bound).await {
                        return failed(
                            transport_kind(&e),
                            format!("write: {e}"),
                            commit_sent,
                            rows,
                        );
                    }
                    owed += 1;
                }
                let outcome = drain(conn, s, p, fatal, owed, bound).await;
                for c in cancels {
                    let _ = c.await;
                }
                return Run {
                    outcome: match outcome {
                        Ok(closed) => Outcome::Refused { code, closed },
                        Err((kind, detail)) => Outcome::Failed { kind, detail },
                    },
                    commit_sent,
                    rows,
                };
            }
        }
    }
    // A cancel still in flight could hit the next operation: wait for its delivery.
    for c in cancels {
        let _ = c.await;
    }
    Run {
        outcome: Outcome::Correct,
        commit_sent,
        rows,
    }
}

fn transport_kind(e: &WireErr) -> Fail {
    match e {
        WireErr::Timeout => Fail::Stall,
        WireErr::Closed => Fail::ClosedWithoutError,
        _ => Fail::Transport,
    }
}

/// After a refusal: reads what is still owed for the batches already sent. Errors there must
/// be documented too (or 25P02, or one the script expects). Ok(true) if the connection closed.
async fn drain(
    conn: &mut Conn,
    s: &Script,
    p: &Policy,
    fatal: bool,
    mut owed: usize,
    bound: Duration,
) -> Result<bool, (Fail, String)> {
    let own = s.own_errors();
    if fatal {
        owed = usize::MAX;
    }
    while owed > 0 {
        // PostgreSQL closes right after a FATAL error.
        let wait = if owed == usize::MAX {
            Duration::from_secs(2)
        } else {
            bound
        };
        let m = conn.recv(wait).await;
        if owed == usize::MAX {
            let another_fatal = matches!(&m, Ok(Msg::Error(f)) if f.severity == "FATAL");
            if let (Ok(m), false) = (&m, another_fatal) {
                return Err((
                    Fail::UndocumentedError,
                    format!(
                        "after a FATAL error the session went on ({}): a client takes FATAL to mean the connection is over",
                        m.describe()
                    ),
                ));
            }
        }
        match m {
            Ok(Msg::Ready(_)) => owed -= 1,
            Ok(Msg::Error(f)) => {
                let ok = f.code == "25P02"
                    || own.contains(&f.code.as_str())
                    || p.judge(&f, conn.status != b'I', s.allow).is_ok();
                if !ok {
                    return Err((
                        Fail::UndocumentedError,
                        format!("after a refusal: {} {}", f.code, f.message),
                    ));
                }
                if f.severity == "FATAL" {
                    owed = usize::MAX;
                }
            }
            Ok(_) => {}
            Err(WireErr::Closed) if owed == usize::MAX => return Ok(true),
            Err(WireErr::Timeout) if owed == usize::MAX => {
                return Err((
                    Fail::UndocumentedError,
                    "a FATAL error, then the connection stayed open".into(),
                ))
            }
            Err(e) => return Err((transport_kind(&e), format!("draining after a refusal: {e}"))),
        }
    }
    Ok(false)
}
