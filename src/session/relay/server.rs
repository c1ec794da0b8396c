//! The server's replies: the scan that tracks ReadyForQuery and errors, and removes or
//! replaces the messages the client must not see as sent.

use super::RelayState;
use crate::protocol::{self, ProtocolError};
use crate::session::prepared::{ServerStatements, Verdict};
use std::ops::ControlFlow;

impl RelayState {
    pub(in crate::session) fn scan_server(
        &mut self,
        from: usize,
        server: &mut ServerStatements,
    ) -> Result<(), ProtocolError> {
        let mut at = from;
        loop {
            let mut rewrite: Option<(usize, usize)> = None;
            let pooled = self.rewrite_on;
            let to_client = &mut self.fatal_to_client;
            let mut strip: Option<(usize, usize)> = None;
            // A ParameterStatus to tell the client with another value.
            let mut status_rw: Option<(usize, usize, bytes::BytesMut)> = None;
            let want_rewrite = self.rewrite_cancel.is_some();
            let pos = self.s2c.pos;
            let pending = &mut self.pending;
            let status = &mut self.status;
            let fatal = &mut self.server_fatal;
            let saw_error = &mut self.saw_error;
            let copy = &mut self.copy_scan;
            let copy_syncs_unknown = &mut self.copy_syncs_unknown;
            let expect = &mut self.expect;
            let stmts = &mut self.stmts;
            let params = &mut self.params;
            let server_parses = &mut self.counts.server_parses;
            let chunk = self.s2c.filled_from(at);
            let n = self.sscan.scan(chunk, |ev| {
                if params.stripping() {
                    // An answer to an injected query: never reaches the client.
                    let span = params.strip_message(&ev, at, pending, status, fatal);
                    if let Some((start, end)) = span.filter(|&(start, _)| start >= pos) {
                        strip = Some((start, end));
                        return ControlFlow::Break(());
                    }
                    return ControlFlow::Continue(());
                }
                match ev.tag {
                    b'S' => {
                        if let Some(body) = ev.body {
                            let name = body.split(|&b| b == 0).next().unwrap_or_default();
                            if let Some(v) = params.on_status(body) {
                                let end = at + ev.end;
                                // None when the message began in bytes already forwarded and cut from the buffer.
                                let start = end.checked_sub(5 + ev.len).filter(|&s| s >= pos);
                                if let Some(start) = start {
                                    let mut m = bytes::BytesMut::new();
                                    protocol::parameter_status(
                                        &mut m,
                                        &String::from_utf8_lossy(name),
                                        v,
                                    );
                                    status_rw = Some((start, end, m));
                                    return ControlFlow::Break(());
                                }
                            }
                        }
                    }
                    b'G' => copy.server_in_copy = true,
                    b'Z' => {
                        copy.server_in_copy = false;
                        *pending = pending.saturating_sub(1);
                        if let Some(&[s]) = ev.body {
                            *status = s;
                        }
                        expect.on_ready(*status, stmts);
                        let end = at + ev.end;
                        // None when the message began in bytes already forwarded and cut from the buffer.
                        let start = end.checked_sub(5 + ev.len).filter(|&s| s >= pos);
                        if *saw_error || *status == b'E' {
                            // The RESET may have been rolled back: the read-back tells.
                            params.before_ready_skip();
                        } else if let Some(start) = start {
                            let mut m = bytes::BytesMut::new();
                            params.before_ready(&mut m);
                            if !m.is_empty() {
                                status_rw = Some((start, start, m));
                                return ControlFlow::Break(());
                            }
                        }
                    }
                    b'1' | b'3' | b'C' => {
                        if ev.tag == b'1' {
                            *server_parses += 1;
                        }
                        if expect.on_complete(ev.tag, stmts) == Verdict::Strip {
                            let end = at + ev.end;
                            // None when the message began in bytes already forwarded and cut from the buffer.
                            let start = end.checked_sub(5 + ev.len).filter(|&s| s >= pos);
                            if let Some(start) = start {
                                strip = Some((start, end));
                                return ControlFlow::Break(());
                            }
                        }
                    }
                    b'E' => {
                        *saw_error = true;
                        let open_copy_syncs = copy.syncs_of_open_copy();
                        copy.server_in_copy = false;
                        expect.on_error(server, stmts);
                        if let Some(body) = ev.body {
                            let f = protocol::parse_error_fields(body);
                            if open_copy_syncs > 0 && f.code == "57014" {
                                *copy_syncs_unknown = true;
                            }
                            if f.severity == "FATAL" || f.severity == "PANIC" {
                                *fatal = true;
                                *to_client = true;
                                if pooled && *pending == 0 && *status == b'I' {
                                    *to_client = false;
                                    // After the last owed ReadyForQuery: the pooled server
                                    // is going away on its own (a shutdown); the client
                                    // asked nothing and must not get an unasked answer.
                                    let end = at + ev.end;
                                    // None when the message began in bytes already forwarded and cut from the buffer.
                                    let start = end.checked_sub(5 + ev.len).filter(|&s| s >= pos);
                                    if let Some(start) = start {
                                        strip = Some((start, end));
                                        return ControlFlow::Break(());
                                    }
                                }
                            }
                            if want_rewrite && f.code == "57014" {
                                if let Some(s) = ev.start {
                                    rewrite = Some((at + s, at + ev.end));
                                }
                            }
                        }
                    }
                    _ => {}
                }
                ControlFlow::Continue(())
            })?;
            if let (Some((s, e)), Some(msg)) = (rewrite, self.rewrite_cancel.take()) {
                let mut m = bytes::BytesMut::new();
                protocol::error_response(&mut m, protocol::Severity::Error, "57014", msg, None);
                self.s2c.splice(s, e, &m);
            }
            if let Some((s, e, m)) = status_rw {
                let next = at + n;
                self.s2c.splice(s, e, &m);
                at = next - (e - s) + m.len();
                if at >= self.s2c.end {
                    return Ok(());
                }
                continue;
            }
            match strip {
                Some((s, e)) => {
                    let next = at + n;
                    self.s2c.remove(s, e);
                    at = next - (e - s);
                    if at >= self.s2c.end {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            }
        }
    }
}
