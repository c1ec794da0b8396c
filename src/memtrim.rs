//! Hands memory freed by a connection spike back to the operating system.
//!
//! glibc keeps freed chunks in its per-thread arenas and only shrinks an arena from the top,
//! so after thousands of sessions end the process keeps their memory resident (reused by the
//! next spike, but never returned). `malloc_trim` releases the free pages of every arena. It
//! walks all arenas, so it runs only after the client count has fallen well below its peak.

/// Client counts below this never trigger a trim: the memory involved is small.
const MIN_DROP: usize = 1_000;

#[derive(Debug, Default)]
pub struct Trimmer {
    peak: usize,
}

impl Trimmer {
    /// Feeds the current client count; trims once it is at most half a peak that was at least
    /// `MIN_DROP` higher. Returns true when it trimmed.
    pub fn observe(&mut self, clients: usize) -> bool {
        if clients >= self.peak {
            self.peak = clients;
            return false;
        }
        if self.peak - clients < MIN_DROP || clients > self.peak / 2 {
            return false;
        }
        self.peak = clients;
        trim();
        true
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim has no preconditions; it only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::Trimmer;

    #[test]
    fn trims_only_after_a_large_drop() {
        let mut t = Trimmer::default();
        assert!(!t.observe(500));
        assert!(
            !t.observe(0),
            "a drop below the minimum is not worth a trim"
        );
        assert!(!t.observe(10_000));
        assert!(!t.observe(6_000), "still above half the peak");
        assert!(t.observe(4_000));
        assert!(
            !t.observe(3_000),
            "the peak restarts from the trimmed count"
        );
        assert!(!t.observe(12_000));
        assert!(t.observe(0));
    }
}
