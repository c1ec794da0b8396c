//! Incremental frame scanner for the relay. It reads only message headers (type byte and
//! length) as bytes stream past, so frames can be forwarded in bulk straight from the read
//! buffer; it copies out the bodies of the few message types the proxy must inspect, and
//! only when they are small. No allocation after construction.

use super::{ProtocolError, MAX_MESSAGE_LEN};
use std::ops::ControlFlow;

/// Bodies larger than this are never captured (they are forwarded without inspection).
pub const CAPTURE_LIMIT: usize = 4096;

/// A message that has been fully seen.
#[derive(Debug)]
pub struct ScanEvent<'a> {
    pub tag: u8,
    /// Body length (without the type byte and length field).
    pub len: usize,
    /// Offset in the current chunk where this message started, when it started in it.
    pub start: Option<usize>,
    /// Offset in the current chunk just past this message.
    pub end: usize,
    /// The body, for captured types no longer than [`CAPTURE_LIMIT`].
    pub body: Option<&'a [u8]>,
}

#[derive(Debug)]
pub struct FrameScanner {
    capture: [bool; 256],
    hdr: [u8; 5],
    hdr_have: usize,
    tag: u8,
    len: usize,
    remaining: usize,
    started_here: bool,
    capturing: bool,
    body: Vec<u8>,
    in_body: bool,
}

impl FrameScanner {
    /// `capture` lists the message types whose (small) bodies are handed to the callback.
    pub fn new(capture: &[u8]) -> Self {
        let mut set = [false; 256];
        for &t in capture {
            set[t as usize] = true;
        }
        FrameScanner {
            capture: set,
            hdr: [0; 5],
            hdr_have: 0,
            tag: 0,
            len: 0,
            remaining: 0,
            started_here: false,
            capturing: false,
            body: Vec::new(),
            in_body: false,
        }
    }

    /// True when the scanner sits exactly on a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.hdr_have == 0 && !self.in_body
    }

    /// Bytes of the current, incomplete message seen so far (0 at a boundary).
    pub fn partial_len(&self) -> usize {
        if self.in_body {
            5 + self.len - self.remaining
        } else {
            self.hdr_have
        }
    }

    /// Tag of the message currently being passed through, if inside one.
    pub fn current_tag(&self) -> Option<u8> {
        (self.hdr_have > 0 || self.in_body).then_some(if self.in_body {
            self.tag
        } else {
            self.hdr[0]
        })
    }

    /// Walks `chunk`, calling `on_msg` for every message that completes in it. Returns the
    /// number of bytes consumed: all of them, unless the callback broke early, in which case
    /// scanning stopped right after that message.
    pub fn scan<F>(&mut self, chunk: &[u8], mut on_msg: F) -> Result<usize, ProtocolError>
    where
        F: FnMut(ScanEvent<'_>) -> ControlFlow<()>,
    {
        let mut pos = 0;
        if !self.at_boundary() {
            // The message in progress began in an earlier chunk.
            self.started_here = false;
        }
        while pos < chunk.len() {
            if !self.in_body {
                let take = (5 - self.hdr_have).min(chunk.len() - pos);
                self.hdr[self.hdr_have..self.hdr_have + take]
                    .copy_from_slice(&chunk[pos..pos + take]);
                if self.hdr_have == 0 {
                    self.started_here = true;
                }
                self.hdr_have += take;
                pos += take;
                if self.hdr_have < 5 {
                    break;
                }
                let len = i32::from_be_bytes([self.hdr[1], self.hdr[2], self.hdr[3], self.hdr[4]]);
                if len < 4 || len as usize > MAX_MESSAGE_LEN {
                    return Err(ProtocolError::BadLength(len as i64));
                }
                self.tag = self.hdr[0];
                self.len = len as usize - 4;
                self.remaining = self.len;
                self.hdr_have = 0;
                self.in_body = true;
                self.capturing = self.capture[self.tag as usize] && self.len <= CAPTURE_LIMIT;
                self.body.clear();
            }
            let take = self.remaining.min(chunk.len() - pos);
            if self.capturing {
                self.body.extend_from_slice(&chunk[pos..pos + take]);
            }
            pos += take;
            self.remaining -= take;
            if self.remaining == 0 {
                self.in_body = false;
                let start = if self.started_here {
                    pos.checked_sub(self.len + 5)
                } else {
                    None
                };
                let ev = ScanEvent {
                    tag: self.tag,
                    len: self.len,
                    start,
                    end: pos,
                    body: self.capturing.then_some(self.body.as_slice()),
                };
                if on_msg(ev).is_break() {
                    return Ok(pos);
                }
            }
        }
        Ok(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    type Seen = (u8, usize, Option<usize>, usize, Option<Vec<u8>>);

    fn collect(s: &mut FrameScanner, chunk: &[u8]) -> Vec<Seen> {
        let mut out = vec![];
        let n = s
            .scan(chunk, |e| {
                out.push((e.tag, e.len, e.start, e.end, e.body.map(|b| b.to_vec())));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(n, chunk.len());
        out
    }

    #[test]
    fn whole_and_split_frames() {
        let mut stream = msg(b'D', b"hello");
        stream.extend(msg(b'Z', b"I"));
        let mut s = FrameScanner::new(b"Z");
        let ev = collect(&mut s, &stream);
        assert_eq!(
            ev,
            vec![
                (b'D', 5, Some(0), 10, None),
                (b'Z', 1, Some(10), 16, Some(b"I".to_vec()))
            ]
        );
        // Every split point gives the same messages.
        for cut in 0..stream.len() {
            let mut s = FrameScanner::new(b"Z");
            let mut all = collect(&mut s, &stream[..cut]);
            all.extend(collect(&mut s, &stream[cut..]));
            let tags: Vec<_> = all.iter().map(|e| (e.0, e.1, e.4.clone())).collect();
            assert_eq!(
                tags,
                vec![(b'D', 5, None), (b'Z', 1, Some(b"I".to_vec()))],
                "cut {cut}"
            );
            assert!(s.at_boundary());
        }
    }

    #[test]
    fn break_stops_after_message() {
        let mut stream = msg(b'Z', b"I");
        stream.extend(msg(b'N', b"x"));
        let mut s = FrameScanner::new(b"Z");
        let n = s.scan(&stream, |_| ControlFlow::Break(())).unwrap();
        assert_eq!(n, 6);
        assert!(s.at_boundary());
    }

    #[test]
    fn bad_lengths() {
        let mut s = FrameScanner::new(b"");
        assert!(s
            .scan(&[b'Q', 0, 0, 0, 3], |_| ControlFlow::Continue(()))
            .is_err());
        let mut s = FrameScanner::new(b"");
        assert!(s
            .scan(&[b'Q', 0xff, 0xff, 0xff, 0xff], |_| ControlFlow::Continue(
                ()
            ))
            .is_err());
        let mut s = FrameScanner::new(b"");
        assert!(s
            .scan(&[b'Q', 0x40, 0, 0, 5], |_| ControlFlow::Continue(()))
            .is_err());
    }

    #[test]
    fn large_body_not_captured() {
        let big = vec![7u8; CAPTURE_LIMIT + 1];
        let stream = msg(b'E', &big);
        let mut s = FrameScanner::new(b"E");
        let ev = collect(&mut s, &stream);
        assert_eq!(ev.len(), 1);
        assert!(ev[0].4.is_none());
    }
}
