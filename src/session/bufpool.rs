//! Relay buffers are taken only while a client has work in flight and returned when it goes
//! idle, so an idle client costs no buffer memory. A per-thread free list keeps the steady
//! state free of allocation and locks.

use std::cell::RefCell;

pub const BUF_SIZE: usize = 32 * 1024;
const MAX_FREE: usize = 256;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

pub fn take() -> Box<[u8]> {
    FREE.with(|f| f.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

pub fn give(buf: Box<[u8]>) {
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        if f.len() < MAX_FREE {
            f.push(buf);
        }
    });
}

/// A byte window over a pooled buffer: data lives in `pos..end`.
pub struct Buf {
    data: Option<Box<[u8]>>,
    pub pos: usize,
    pub end: usize,
}

impl Default for Buf {
    fn default() -> Self {
        Self::new()
    }
}

impl Buf {
    pub const fn new() -> Self {
        Buf {
            data: None,
            pos: 0,
            end: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.end
    }

    pub fn len(&self) -> usize {
        self.end - self.pos
    }

    /// Unsent bytes.
    pub fn data(&self) -> &[u8] {
        match &self.data {
            Some(d) => &d[self.pos..self.end],
            None => &[],
        }
    }

    /// Bytes from absolute offset `from` to the end of the filled region.
    pub fn filled_from(&self, from: usize) -> &[u8] {
        match &self.data {
            Some(d) => &d[from..self.end],
            None => &[],
        }
    }

    /// Free space after the data, allocating the buffer on first use.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
        let d = self.data.get_or_insert_with(take);
        &mut d[self.end..]
    }

    pub fn has_spare(&self) -> bool {
        self.pos == self.end || self.end < BUF_SIZE
    }

    pub fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
    }

    pub fn clear(&mut self) {
        self.pos = 0;
        self.end = 0;
    }

    /// Drops the bytes in absolute range `from..to` (rare paths: Terminate, discards).
    pub fn remove(&mut self, from: usize, to: usize) {
        if let Some(d) = &mut self.data {
            d.copy_within(to..self.end, from);
            self.end -= to - from;
        }
    }

    /// Returns the memory to the pool if nothing is buffered.
    pub fn release(&mut self) {
        if self.is_empty() {
            if let Some(d) = self.data.take() {
                give(d);
            }
            self.pos = 0;
            self.end = 0;
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(d) = self.data.take() {
            give(d);
        }
    }
}

impl Buf {
    /// Replaces absolute range `from..to` with `with` (rare path: rewriting one message).
    pub fn splice(&mut self, from: usize, to: usize, with: &[u8]) {
        let Some(d) = &mut self.data else { return };
        let tail = self.end - to;
        let new_end = from + with.len() + tail;
        if new_end > d.len() {
            // No room to grow in place: keep the original message.
            return;
        }
        d.copy_within(to..self.end, from + with.len());
        d[from..from + with.len()].copy_from_slice(with);
        self.end = new_end;
    }
}
