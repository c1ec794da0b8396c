//! The steps of one query: admission, the relay, and what happens after it — release,
//! refusal, cancellation, recovery from a lost server.

use super::*;
use crate::cancel::send_cancel;
use tokio::io::AsyncWriteExt;

/// Why a cancel was sent upstream (metric label).
#[derive(Clone, Copy)]
pub(super) enum CancelCause {
    ClientGone,
    QueryTimeout,
    IdleInTransaction,
    ProtocolError,
}

impl CancelCause {
    fn as_str(self) -> &'static str {
        match self {
            CancelCause::ClientGone => "client_gone",
            CancelCause::QueryTimeout => "query_timeout",
            CancelCause::IdleInTransaction => "idle_in_transaction",
            CancelCause::ProtocolError => "protocol_error",
        }
    }
}

impl Session {
    pub(super) fn admit_request(&self) -> AdmitRequest {
        let in_transaction = self.server.is_some() && self.st.status != b'I';
        // A query queued past the client's statement_timeout is refused (57014), not started.
        // Not inside a transaction: an error there would leave the server's transaction
        // open while the client believes its statement failed.
        let deadline = (!in_transaction)
            .then(|| self.st.params.statement_timeout())
            .flatten()
            .map(|d| Instant::now() + d);
        AdmitRequest {
            pool: self.pool.label.clone(),
            identity: self.identity.clone(),
            client_id: self.client_id,
            in_transaction,
            last_admitted: self.last_admitted,
            deadline,
            slot: true,
            lease: self.server.is_none(),
            capacity: self.pool.capacity,
        }
    }

    /// Waits for a concurrency slot while watching the client: a client that leaves or
    /// cancels leaves the queue at once and no work starts for it.
    pub(super) async fn admit(&mut self) -> Admission {
        let guard = self.shared.guard.clone();
        let fut = guard.admit(self.admit_request());
        tokio::pin!(fut);
        // A slot free at once (the common case) needs none of the queue's bookkeeping.
        // Polled once with the task's own waker, which stays registered if it must wait.
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(fut.as_mut(), cx))
        })
        .await;
        if let std::task::Poll::Ready(r) = first {
            return match r {
                Ok(p) => Admission::Admitted(p),
                Err(shed) => self.shed(shed).await,
            };
        }
        // Registered before the client shows as queued, so a cancel cannot slip between.
        let entry = self.entry.clone();
        let cancelled = entry.queued_cancelled();
        tokio::pin!(cancelled);
        cancelled.as_mut().enable();
        self.entry.set_queued(true);
        self.shared.clients_waiting.fetch_add(1, Ordering::Relaxed);
        let out = loop {
            let watch_client =
                !self.st.terminated && !self.st.client_eof && self.st.c2s.has_spare();
            tokio::select! {
                biased;
                r = &mut fut => break match r {
                    Ok(p) => Admission::Admitted(p),
                    Err(shed) => self.shed(shed).await,
                },
                _ = &mut cancelled => {
                    self.entry.set_queued(false);
                    self.shared.count_query(&self.pool, "cancelled");
                    info!(identity = %self.identity, cause = "client_request", "query cancelled while queued");
                    break match self.refuse_batch("57014", "canceling statement due to user request (pgsluice: the query was still queued)", None).await {
                        Ok(()) => Admission::Refused,
                        Err(()) => Admission::ClientGone,
                    };
                }
                _ = self.entry.killed() => {
                    Box::pin(self.end_killed(None)).await;
                    break Admission::ClientGone;
                }
                r = self.client.readable(), if watch_client => {
                    if r.is_err() {
                        self.st.client_eof = true;
                    } else if let Err(msg) = self.read_client_nonblocking() {
                        startup::send_fatal(&mut self.client, "08P01", &msg).await;
                        self.st.client_eof = true;
                    }
                    if self.st.client_eof {
                        debug!(identity = %self.identity, "client left while queued");
                        self.shared.count_query(&self.pool, "abandoned");
                        break Admission::ClientGone;
                    }
                }
            }
        };
        self.entry.set_queued(false);
        self.shared.clients_waiting.fetch_sub(1, Ordering::Relaxed);
        out
    }

    async fn shed(&mut self, shed: Shed) -> Admission {
        self.shared.count_query(&self.pool, "shed");
        self.shared.log_shed(&self.identity, &shed);
        let msg = shed.message();
        match self
            .refuse_batch(shed.reason.sqlstate(), &msg, Some(&shed.hint()))
            .await
        {
            Ok(()) => Admission::Refused,
            Err(()) => Admission::ClientGone,
        }
    }

    /// Answers the first unsent batch with an error instead of running it. The client's
    /// connection stays usable.
    pub(super) async fn refuse_batch(
        &mut self,
        code: &str,
        msg: &str,
        hint: Option<&str>,
    ) -> Result<(), ()> {
        let mut b = BytesMut::with_capacity(256);
        protocol::error_response(&mut b, Severity::Error, code, msg, hint);
        if self.st.drop_first_batch() {
            protocol::ready_for_query(&mut b, self.st.status);
            self.st.after_refusal();
        }
        startup::send(&mut self.client, &b).await.map_err(|_| ())
    }

    /// Sends ReadyForQuery with the current status, optionally after an error.
    pub(super) async fn ready(&mut self, error: Option<(&str, &str)>) -> Result<(), ()> {
        let mut b = BytesMut::with_capacity(128);
        if let Some((code, msg)) = error {
            protocol::error_response(&mut b, Severity::Error, code, msg, None);
        }
        protocol::ready_for_query(&mut b, self.st.status);
        startup::send(&mut self.client, &b).await.map_err(|_| ())
    }

    /// Adds a finished batch (started at `t0`) to the pool's `SHOW STATS` counters;
    /// `xact_done` when it ended its transaction.
    fn count_batch(&mut self, t0: Instant, xact_done: bool) {
        let counts = std::mem::take(&mut self.st.counts);
        let xact = xact_done.then(|| self.tx_started.elapsed());
        self.pool.stats.batch(t0.elapsed(), &counts, xact);
    }

    /// Relays one admitted batch (and any pipelined after it) until nothing is in flight.
    /// Returns false when the session is over.
    pub(super) async fn run_query(&mut self, mut permit: Permit) -> bool {
        let Some(server) = self.server.as_mut() else {
            return false;
        };
        if std::mem::take(&mut server.untried) {
            // First batch on this checkout: keep it until the server answers.
            self.st.begin_hold();
        }
        let target = BackendTarget {
            addr: server.addr,
            pid: server.pid,
            secret: server.secret,
        };
        self.entry.start_query(target);
        self.shared.clients_active.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        if self.st.status == b'I' {
            // Outside a transaction: this batch starts one (autocommit included).
            self.tx_started = t0;
        }
        let deadline = self
            .cfg
            .query_timeout
            .map(|d| tokio::time::Instant::from_std(t0 + d));
        let mut timed_out = false;
        // Set once the query is cancelled: a server that still has not answered by then is
        // treated as lost, so a hung upstream cannot hold the client forever.
        let mut give_up: Option<tokio::time::Instant> = None;
        self.st.saw_error = false;
        let ev = loop {
            let fut = relay::relay(&mut self.client, server, &mut self.st);
            tokio::select! {
                ev = fut => break ev,
                _ = sleep_until_opt(give_up), if give_up.is_some() => {
                    break RelayEvent::ServerGone(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "upstream did not answer a cancelled query within cancel-grace",
                    ));
                }
                _ = self.entry.killed() => break RelayEvent::Killed,
                _ = sleep_until_opt(deadline), if !timed_out => {
                    timed_out = true;
                    self.shared.guard.record_waste();
                    self.st.rewrite_cancel = Some("pgsluice: query timeout");
                    self.shared.count_cancel(&self.pool, CancelCause::QueryTimeout.as_str());
                    info!(identity = %self.identity, cause = "query_timeout", age_ms = t0.elapsed().as_millis() as u64, "cancelling query");
                    if let Err(e) = send_cancel(target, self.cfg.cancel_grace).await {
                        warn!(error = %e, "could not deliver cancel");
                    }
                    give_up = Some(tokio::time::Instant::now() + self.cfg.cancel_grace);
                }
            }
        };
        self.shared.clients_active.fetch_sub(1, Ordering::Relaxed);
        self.entry.end_query();
        let outcome = if timed_out {
            "timeout"
        } else if self.st.saw_error {
            "error"
        } else {
            "ok"
        };
        match ev {
            RelayEvent::Idle => {
                self.entry
                    .wait_no_cancel_in_flight(self.cfg.cancel_grace)
                    .await;
                self.shared.guard.record_success();
                {
                    // Scoped: a local alive across the await below would enlarge the future.
                    let running = t0.elapsed();
                    if !timed_out {
                        // A cancelled query's time says nothing of the database's speed.
                        permit.completed(running);
                    }
                    self.shared.observe_query(&self.pool, outcome, running);
                }
                self.count_batch(t0, self.st.status == b'I');
                // Boxed, and only when needed: the read-back is rare, and would otherwise
                // enlarge every session's future (or cost an allocation per batch).
                if self.params_after_batch_quick() {
                    Box::pin(self.params_after_batch()).await;
                }
                self.after_idle(permit)
            }
            RelayEvent::ClientGone => {
                drop(permit);
                self.shared.guard.record_waste();
                self.shared
                    .observe_query(&self.pool, "abandoned", t0.elapsed());
                self.count_batch(t0, false);
                let age = t0.elapsed();
                self.release_server(CancelCause::ClientGone, Some(age))
                    .await;
                false
            }
            RelayEvent::ClientProtocol(e) => {
                drop(permit);
                startup::send_fatal(
                    &mut self.client,
                    "08P01",
                    &format!("pgsluice: invalid message from client: {e}"),
                )
                .await;
                self.release_server(CancelCause::ProtocolError, Some(t0.elapsed()))
                    .await;
                false
            }
            RelayEvent::ServerGone(e) => {
                warn!(identity = %self.identity, error = %e, "lost connection to upstream");
                drop(permit);
                self.shared
                    .observe_query(&self.pool, "upstream_lost", t0.elapsed());
                self.count_batch(t0, false);
                self.server_lost().await
            }
            RelayEvent::ServerProtocol(e) => {
                warn!(identity = %self.identity, error = %e, "upstream sent an invalid message");
                drop(permit);
                self.server_lost().await
            }
            RelayEvent::Killed => {
                drop(permit);
                self.shared.count_query(&self.pool, "cancelled");
                // Rebuilt rather than kept: a local alive across the relay would enlarge the future.
                let running = self.server.as_ref().map(|s| BackendTarget {
                    addr: s.addr,
                    pid: s.pid,
                    secret: s.secret,
                });
                Box::pin(self.end_killed(running)).await;
                false
            }
            RelayEvent::Stale => {
                // Nothing ran: no query outcome and no upstream failure (the breaker must
                // not open over a connection an admin or a timeout closed). The batch is
                // unsent again; the serve loop takes it to another server.
                info!(identity = %self.identity, "server connection was dead before the batch reached it; resending");
                drop(permit);
                if let Some(mut s) = self.server.take() {
                    s.broken = true;
                }
                true
            }
        }
    }

    /// After a batch completes: give the server back when the transaction is over.
    /// False when the session is over: the client received its server's FATAL.
    fn after_idle(&mut self, mut permit: Permit) -> bool {
        if self.st.server_fatal {
            if let Some(mut s) = self.server.take() {
                s.broken = true;
            }
            self.st.server_fatal = false;
            self.st.status = b'I';
            // A FATAL means "connection over" to the client, as on a direct connection.
            return !std::mem::take(&mut self.st.fatal_to_client);
        }
        if self.pool.mode == PoolMode::Transaction && self.st.status == b'I' {
            if let Some(mut s) = self.server.take() {
                if std::mem::take(&mut self.st.copy_syncs_unknown) {
                    // Its answers may be out of step with the count of owed ones: it
                    // goes to no other client (in session mode the client keeps it).
                    s.broken = true;
                } else {
                    // The slot and the connection's lease go back under one guard lock.
                    permit.return_lease(s.into_lease());
                }
            }
        }
        drop(permit);
        true
    }

    /// The server died under a query. Transaction pooling outside a transaction: the client
    /// gets 08006 for each batch it waits on and carries on with a fresh server. Inside a
    /// transaction it is disconnected, since running its later statements outside the lost
    /// transaction would break atomicity; in session mode too, since its session state
    /// (prepared statements, settings, temporary tables) died with the server; and when the
    /// server's own FATAL already reached it, since every client takes a FATAL to mean its
    /// connection is over. In each case it is what a direct connection would see.
    async fn server_lost(&mut self) -> bool {
        if let Some(mut s) = self.server.take() {
            s.broken = true;
        }
        self.shared.guard.record_failure();
        let in_tx = self.st.status != b'I';
        let clean = self.st.sscan.at_boundary() && self.st.s2c.is_empty();
        debug!(
            pending = self.st.pending,
            unsent = self.st.ends.len(),
            injected = self.st.params.injected_owed(),
            open_batch = self.st.open_batch,
            status = %(self.st.status as char),
            clean,
            fatal_to_client = self.st.fatal_to_client,
            "server lost: settling what the client is owed"
        );
        let owed = self.st.abandon_server();
        self.st.status = b'I';
        self.st.s2c.clear();
        // The FATAL was the lost server's. Left set (it is when the FATAL came with nothing
        // owed and was removed), it would drop the next server after its first batch:
        // a BEGIN answered there, the statements after it ran outside the transaction.
        self.st.server_fatal = false;
        if std::mem::take(&mut self.st.fatal_to_client) {
            // The client has the server's reason (e.g. 57P01 from pg_terminate_backend).
            return false;
        }
        if self.pool.mode == PoolMode::Session {
            startup::send_fatal(
                &mut self.client,
                "08006",
                "pgsluice: lost connection to upstream; the session's state is gone with it",
            )
            .await;
            return false;
        }
        if in_tx || !clean {
            startup::send_fatal(
                &mut self.client,
                "08006",
                "pgsluice: lost connection to upstream inside a transaction; the transaction was rolled back",
            )
            .await;
            return false;
        }
        if self.st.params.needs_read_back() {
            // A statement of the lost batch may have changed a setting: the client's
            // session state is not known, and no other server can be given it.
            startup::send_fatal(&mut self.client, "08006", LOST_SETTINGS).await;
            return false;
        }
        let mut b = BytesMut::with_capacity(256);
        let lost = |b: &mut BytesMut| {
            protocol::error_response(
                b,
                Severity::Error,
                "08006",
                "pgsluice: lost connection to upstream",
                None,
            )
        };
        // Nothing owed: the server closed right after its last ReadyForQuery (e.g. a fast
        // shutdown). The client waits on nothing, and an unasked ReadyForQuery would break
        // its protocol state.
        for _ in 0..owed {
            lost(&mut b);
            protocol::ready_for_query(&mut b, b'I');
        }
        if self.st.discarding && !self.st.discard_silent {
            // The unfinished batch gets its error now and its ReadyForQuery at its Sync.
            lost(&mut b);
        }
        startup::send(&mut self.client, &b).await.is_ok()
    }

    /// The client left (or broke the protocol) with a server attached: stop its work upstream
    /// at once, then clean the connection for the next client or close it.
    pub(super) async fn release_server(&mut self, cause: CancelCause, age: Option<Duration>) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        let target = BackendTarget {
            addr: server.addr,
            pid: server.pid,
            secret: server.secret,
        };
        // Bytes of a message already partly forwarded leave the server mid-message.
        let clean =
            self.st.c2s.is_empty() && self.st.cscan.at_boundary() && !self.st.terminate_split;
        let busy = self.st.pending > 0 || self.st.open_batch || !clean;
        // A server in copy-in mode is ended by the CopyFail below. A cancel would add a
        // race: the backend may then fail before it has read (and ignored) the Syncs sent
        // after an extended COPY's Execute, and answer each of them.
        let in_copy = self.st.copy_scan.server_in_copy;
        if busy {
            self.shared.count_cancel(&self.pool, cause.as_str());
            info!(
                identity = %self.identity,
                cause = cause.as_str(),
                age_ms = age.map(|a| a.as_millis() as u64),
                "{}",
                if in_copy {
                    "ending COPY of departed client"
                } else {
                    "cancelling query of departed client"
                }
            );
            if !in_copy {
                if let Err(e) = send_cancel(target, self.cfg.cancel_grace).await {
                    warn!(error = %e, "could not deliver cancel");
                }
            }
        }
        if !clean || std::mem::take(&mut self.st.copy_syncs_unknown) {
            server.broken = true;
            return;
        }
        self.st.c2s.clear();
        let session_mode = self.pool.mode == PoolMode::Session;
        let st = &mut self.st;
        let reset = async {
            if super::copyin::abort_copy_in(st) {
                server.stream.write_all(super::copyin::COPY_FAIL).await?;
            }
            if st.open_batch {
                let mut b = BytesMut::new();
                b.extend_from_slice(&[b'S', 0, 0, 0, 4]);
                server.stream.write_all(&b).await?;
                server.stream.flush().await?;
                st.pending += 1;
                // The answers still update the server's statement set: an error skips
                // the batch's eviction Closes, and those statements stay prepared.
                st.expect.push_sync(&mut server.prepared);
                st.open_batch = false;
            }
            relay::drain_server(&mut server, st).await?;
            if st.status != b'I' {
                relay::run_internal(&mut server, st, "ROLLBACK").await?;
            }
            if session_mode {
                relay::run_internal(&mut server, st, "DISCARD ALL").await?;
                server.prepared.clear();
                server.params = Default::default();
            } else if st.params.unsettled() {
                // The departed client may have changed a tracked setting mid-batch.
                relay::run_internal(&mut server, st, "RESET ALL").await?;
                server.params = Default::default();
            }
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(self.cfg.cancel_grace, reset).await {
            Ok(Ok(())) if !self.st.server_fatal && self.st.status == b'I' => {}
            other => {
                debug!(
                    ?other,
                    "server connection not reusable after client left; closing it"
                );
                server.broken = true;
            }
        }
    }

    pub(super) async fn idle_in_transaction_expired(&mut self) {
        self.shared
            .count_cancel(&self.pool, CancelCause::IdleInTransaction.as_str());
        info!(identity = %self.identity, cause = "idle_in_transaction", "rolling back idle transaction");
        startup::send_fatal(
            &mut self.client,
            "25P03",
            "pgsluice: terminating connection due to idle-in-transaction timeout",
        )
        .await;
        self.release_server(CancelCause::IdleInTransaction, None)
            .await;
    }

    /// Last words: whatever server is still attached is cleaned and returned.
    pub(super) async fn finish(&mut self) {
        if self.server.is_some() {
            self.release_server(CancelCause::ClientGone, None).await;
        }
        self.shared.cancels.unregister(self.entry.pid);
    }
}

/// The FATAL for a client whose changed session settings died unread with its server.
pub(super) const LOST_SETTINGS: &str =
    "pgsluice: lost connection to upstream after a statement that may have changed session settings; they could not be read back";

async fn sleep_until_opt(d: Option<tokio::time::Instant>) {
    match d {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
