//! A counting global allocator that counts only on threads marked as the proxy's (a
//! thread-local flag set when each proxy runtime worker starts), and the three query loops
//! whose allocations are counted. Shared by tests/allocations.rs and benches/allocs.rs; never
//! part of `tests/common` (a global allocator would apply to every test binary).
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

struct Counting;

pub static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    pub static PROXY_THREAD: Cell<bool> = const { Cell::new(false) };
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

/// `ALLOCS_TRACE=N`: print where the first N counted allocations of each measured run come
/// from (a backtrace each; resolving it allocates, which is not counted).
pub static TRACE_LEFT: AtomicU64 = AtomicU64::new(0);

fn count() {
    if PROXY_THREAD.try_with(Cell::get).unwrap_or(false)
        && !IN_TRACE.try_with(Cell::get).unwrap_or(true)
    {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        if TRACE_LEFT.load(Ordering::Relaxed) > 0 {
            TRACE_LEFT.fetch_sub(1, Ordering::Relaxed);
            IN_TRACE.with(|t| t.set(true));
            eprintln!("{}\n----", std::backtrace::Backtrace::force_capture());
            IN_TRACE.with(|t| t.set(false));
        }
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; counting touches only
// an atomic and a const-initialised thread-local (no allocation inside the allocator).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count();
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count();
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Clone, Copy)]
pub enum Mode {
    /// Query 'Q'.
    Simple,
    /// Parse/Bind/Execute/Sync of the unnamed statement each time (`query_typed`).
    Extended,
    /// Bind/Execute/Sync of a statement prepared once.
    Prepared,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Extended => "extended",
            Mode::Prepared => "prepared",
        }
    }
}

pub async fn run(c: &tokio_postgres::Client, st: &tokio_postgres::Statement, mode: Mode, n: usize) {
    for i in 0..n as i32 {
        let v: i32 = match mode {
            Mode::Simple => {
                let m = c.simple_query("SELECT 41 + 1").await.expect("simple");
                match &m[1] {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        r.get(0).and_then(|v| v.parse().ok()).unwrap_or(-1) - 42 + i + 1
                    }
                    _ => -1,
                }
            }
            Mode::Extended => c
                .query_typed_one(
                    "SELECT $1::int4 + 1",
                    &[(&i, tokio_postgres::types::Type::INT4)],
                )
                .await
                .expect("extended")
                .get(0),
            Mode::Prepared => c.query_one(st, &[&i]).await.expect("prepared").get(0),
        };
        assert_eq!(v, i + 1, "wrong answer in {} mode", mode.name());
    }
}

/// A proxy on a runtime whose threads are counted, in front of `upstream`; and the URL a
/// client connects to.
pub fn start_counted_proxy(
    upstream: &str,
) -> (
    tokio::runtime::Runtime,
    pgsluice::server::ProxyHandle,
    String,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| PROXY_THREAD.with(|p| p.set(true)))
        .build()
        .expect("proxy runtime");
    let cfg = pgsluice::config::Config::from_args([
        "pgsluice",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--upstream",
        upstream,
        "--pool-size",
        "2",
        "--health-interval",
        "60s",
    ])
    .expect("config");
    let handle = rt
        .block_on(pgsluice::server::start(cfg))
        .expect("proxy start");
    let url = format!("postgres://postgres@{}/postgres", handle.addr());
    (rt, handle, url)
}
