//! The client's bytes: scanning them for batch ends and Terminate, dropping refused
//! batches, and rewriting statement messages for the server before they go upstream.

use super::RelayState;
use crate::protocol::ProtocolError;
use crate::session::prepared::{self, ServerStatements};
use std::ops::ControlFlow;

impl RelayState {
    /// Rewrites complete client messages up to the end of the buffer for `server`.
    pub(super) fn advance_rewrite(&mut self, server: &mut ServerStatements) {
        if !self.rewrite_on {
            return;
        }
        self.rw_pos = self.rw_pos.clamp(self.c2s.pos, self.c2s.end);
        loop {
            let end = self.c2s.end;
            if self.rw_stream > 0 {
                let take = self.rw_stream.min(end - self.rw_pos);
                let last = take == self.rw_stream;
                let bytes = self.c2s.slice(self.rw_pos, self.rw_pos + take);
                self.stmts.watch_tail(bytes, last, server);
                self.rw_pos += take;
                self.rw_stream -= take;
                if self.rw_stream > 0 {
                    return;
                }
                continue;
            }
            if end - self.rw_pos < 5 {
                // A header cut by the end of the buffer: make sure the rest can be read.
                self.c2s.grow_to(self.rw_pos + 5);
                return;
            }
            let h = self.c2s.slice(self.rw_pos, self.rw_pos + 5);
            let tag = h[0];
            let total = 1 + i32::from_be_bytes([h[1], h[2], h[3], h[4]]).max(4) as usize;
            // Headers are read again only for messages held incomplete, never for these.
            if matches!(tag, b'S' | b'c' | b'f') {
                let ignored = self.copy_rw.on_message(tag);
                self.expect.forget_syncs(ignored);
            } else {
                self.copy_rw.on_message(tag);
            }
            let need = match tag {
                b'P' | b'B' | b'D' | b'C' | b'S' => total,
                b'Q' => total.min(5 + prepared::QUERY_HOLD),
                b'F' => 5,
                _ => {
                    self.rw_stream = total;
                    continue;
                }
            };
            if end - self.rw_pos < need {
                // Hold the message until it is complete.
                self.c2s.grow_to(self.rw_pos + need);
                return;
            }
            let at = self.rw_pos;
            self.scratch.clear();
            let msg = self.c2s.slice(at, at + need);
            let replaced = prepared::rewrite(
                msg,
                &mut self.stmts,
                server,
                &mut self.expect,
                self.stmt_cap,
                &mut self.scratch,
            );
            if !replaced && matches!(tag, b'Q' | b'F') {
                self.rw_stream = total;
                continue;
            }
            if replaced {
                let new_len = self.scratch.len();
                let scratch = std::mem::take(&mut self.scratch);
                self.c2s.splice(at, at + total, &scratch);
                self.scratch = scratch;
                for e in self.ends.iter_mut() {
                    if *e > at {
                        *e = *e + new_len - total;
                    }
                }
                self.rw_pos = at + new_len;
            } else {
                self.rw_pos = at + total;
            }
        }
    }

    /// Scans client bytes just read at absolute offsets `from..c2s.end`.
    pub fn scan_client(&mut self, from: usize) -> Result<(), ProtocolError> {
        let mut cut_terminate: Option<usize> = None;
        let mut discard_to: Option<usize> = None;
        let mut split = false;
        let mut discarding = self.discarding;
        let mut silent = self.discard_silent;
        let unsent_from = self.c2s.pos;
        let ends = &mut self.ends;
        let open_batch = &mut self.open_batch;
        let params = &mut self.params;
        let pending = &mut self.pending;
        let copy = &mut self.copy_scan;
        let counts = &mut self.counts;
        let unstarted = &mut self.unstarted_copy;
        let chunk = self.c2s.filled_from(from);
        counts.received += chunk.len() as u64;
        let mut flow = |tag: u8, start: Option<usize>, end: usize, len: usize| {
            let abs_end = from + end;
            // None for a message whose start was forwarded already (or cut from the buffer).
            let abs_start = abs_end.checked_sub(5 + len);
            if unstarted.ends_copy(tag)
                && !discarding
                && abs_start == Some(unsent_from)
                && ends.is_empty()
                && *pending == 0
                && !*open_batch
            {
                // Dropped with what follows up to its Sync; the COPY's answer went out.
                discarding = true;
                silent = true;
                copy.on_message(tag);
                return ControlFlow::Continue(());
            }
            match tag {
                b'P' => counts.client_parses += 1,
                b'B' => counts.binds += 1,
                _ => {}
            }
            match tag {
                b'X' => {
                    match start {
                        Some(s) => cut_terminate = Some(from + s),
                        None => {
                            split = true;
                            cut_terminate = Some(from);
                        }
                    }
                    return ControlFlow::Break(());
                }
                b'Q' | b'S' | b'F' => {
                    if discarding && discard_to.is_none() {
                        discard_to = Some(abs_end);
                    } else {
                        ends.push_back(abs_end);
                    }
                    *open_batch = false;
                }
                b'P' | b'B' | b'D' | b'E' | b'C' => *open_batch = true,
                _ => {}
            }
            let ignored = copy.on_message(tag);
            if ignored > 0 {
                // The end of an extended-protocol COPY FROM STDIN: its batch goes on to the
                // next Sync. The ignored Syncs are the newest batch ends: unsent ones stop
                // ending a batch, sent ones are owed no ReadyForQuery.
                for _ in 0..ignored {
                    if ends.pop_back().is_none() {
                        *pending = pending.saturating_sub(1);
                    }
                }
                *open_batch = true;
            }
            ControlFlow::Continue(())
        };
        self.cscan.scan(chunk, |ev| {
            if matches!(ev.tag, b'Q' | b'P' | b'B' | b'C') {
                let whole = ev.start.map(|s| &chunk[s..ev.end]);
                params.on_client_msg(ev.tag, ev.body, whole);
            }
            flow(ev.tag, ev.start, ev.end, ev.len)
        })?;
        if let Some(at) = cut_terminate {
            // Nothing after Terminate matters; never forward it (the server would close).
            self.c2s.end = at.max(self.c2s.pos);
            self.terminated = true;
            self.terminate_split = split;
        }
        if discarding {
            let drop_to = discard_to.unwrap_or(self.c2s.end);
            let base = self.c2s.pos;
            self.c2s.remove(base, drop_to);
            let shift = drop_to - base;
            for e in self.ends.iter_mut() {
                *e -= shift;
            }
            self.discarding = discard_to.is_none();
            self.discard_silent = silent && self.discarding;
            if discard_to.is_some() {
                self.discard_done = !silent;
                self.open_batch = false;
            }
        }
        Ok(())
    }

    /// Drops the first unsent batch (a refused query). Returns true when its end was in the
    /// buffer; otherwise everything was dropped and the rest is discarded as it arrives.
    pub fn drop_first_batch(&mut self) -> bool {
        match self.ends.pop_front() {
            Some(end) => {
                let base = self.c2s.pos;
                self.c2s.remove(base, end);
                let shift = end - base;
                for e in self.ends.iter_mut() {
                    *e -= shift;
                }
                true
            }
            None => {
                self.c2s.clear();
                self.discarding = true;
                self.discard_silent = false;
                false
            }
        }
    }

    /// The proxy refused the client's first batch: when it was the last one, its tail is
    /// the stream's.
    pub(in crate::session) fn after_refusal(&mut self) {
        if self.ends.is_empty() && !self.open_batch && self.cscan.at_boundary() {
            self.unstarted_copy.arm(&self.copy_scan);
        }
    }

    pub(super) fn after_client_write(&mut self) {
        if self.c2s.is_empty() {
            self.rw_pos = 0;
        }
        while let Some(&e) = self.ends.front() {
            if e <= self.c2s.pos || self.c2s.is_empty() {
                self.ends.pop_front();
                self.pending += 1;
            } else {
                break;
            }
        }
    }
}
