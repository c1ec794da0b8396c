//! Relay cost of `FrameScanner` over typical PostgreSQL message mixes.
//!
//! Each mix is a byte stream as it would cross the proxy, fed to the scanner in socket-read
//! sized chunks. Criterion reports bytes/s; a counting global allocator reports heap
//! allocations per message (printed, never asserted: the number is for the reader).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgsluice::protocol::FrameScanner;
use std::alloc::{GlobalAlloc, Layout, System};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct CountingAlloc;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Typical read size of a relay buffer.
const READ_CHUNK: usize = 8192;
/// Types the relay inspects on the server-to-client side.
const SERVER_CAPTURE: &[u8] = b"ZE";
/// Types the relay inspects on the client-to-server side (prepared statement names).
const CLIENT_CAPTURE: &[u8] = b"PBC";

fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

fn row_description(out: &mut Vec<u8>, cols: &[&str]) {
    let mut b = Vec::new();
    b.extend_from_slice(&(cols.len() as i16).to_be_bytes());
    for c in cols {
        cstr(&mut b, c);
        b.extend_from_slice(&0i32.to_be_bytes()); // table oid
        b.extend_from_slice(&0i16.to_be_bytes()); // column number
        b.extend_from_slice(&23i32.to_be_bytes()); // int4
        b.extend_from_slice(&4i16.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
    }
    msg(out, b'T', &b);
}

fn data_row(out: &mut Vec<u8>, fields: &[&[u8]]) {
    let mut b = Vec::new();
    b.extend_from_slice(&(fields.len() as i16).to_be_bytes());
    for f in fields {
        b.extend_from_slice(&(f.len() as i32).to_be_bytes());
        b.extend_from_slice(f);
    }
    msg(out, b'D', &b);
}

/// A built stream and how many messages it holds.
struct Mix {
    name: &'static str,
    bytes: Vec<u8>,
    messages: u64,
    capture: &'static [u8],
}

fn count_messages(bytes: &[u8]) -> u64 {
    let mut s = FrameScanner::new(b"");
    let mut n = 0;
    s.scan(bytes, |_| {
        n += 1;
        ControlFlow::Continue(())
    })
    .expect("well-formed mix");
    n
}

fn mix(name: &'static str, capture: &'static [u8], bytes: Vec<u8>) -> Mix {
    let messages = count_messages(&bytes);
    Mix {
        name,
        bytes,
        messages,
        capture,
    }
}

/// 100 responses to pgbench -S in simple-query mode, as a busy server connection sends them.
fn simple_select_responses() -> Mix {
    let mut one = Vec::new();
    row_description(&mut one, &["abalance"]);
    data_row(&mut one, &[b"-2817"]);
    msg(&mut one, b'C', b"SELECT 1\0");
    msg(&mut one, b'Z', b"I");
    mix("simple_select_response", SERVER_CAPTURE, one.repeat(100))
}

/// 100 extended-protocol batches (Parse/Bind/Describe/Execute/Sync, unnamed statement).
fn extended_batches() -> Mix {
    let mut one = Vec::new();
    let mut p = Vec::new();
    cstr(&mut p, "");
    cstr(
        &mut p,
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
    );
    p.extend_from_slice(&0i16.to_be_bytes());
    msg(&mut one, b'P', &p);
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, "");
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&6i32.to_be_bytes());
    b.extend_from_slice(b"731842");
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(&mut one, b'B', &b);
    msg(&mut one, b'D', b"P\0");
    let mut e = Vec::new();
    cstr(&mut e, "");
    e.extend_from_slice(&0i32.to_be_bytes());
    msg(&mut one, b'E', &e);
    msg(&mut one, b'S', b"");
    mix(
        "extended_parse_bind_execute_sync",
        CLIENT_CAPTURE,
        one.repeat(100),
    )
}

/// A 10,000-row result of ~100-byte rows (pgbench_accounts shape), then completion.
fn large_datarow_stream() -> Mix {
    let mut out = Vec::new();
    row_description(&mut out, &["aid", "bid", "abalance", "filler"]);
    let filler = [b' '; 84];
    for i in 0..10_000u32 {
        let aid = i.to_string();
        data_row(&mut out, &[aid.as_bytes(), b"1", b"0", &filler]);
    }
    msg(&mut out, b'C', b"SELECT 10000\0");
    msg(&mut out, b'Z', b"I");
    mix("large_datarow_stream", SERVER_CAPTURE, out)
}

/// COPY FROM STDIN: 10,000 CopyData lines then CopyDone, client to server.
fn copy_in() -> Mix {
    let mut out = Vec::new();
    for i in 0..10_000u32 {
        let line = format!("{i}\t1\t0\t{:84}\n", "");
        msg(&mut out, b'd', line.as_bytes());
    }
    msg(&mut out, b'c', b"");
    mix("copy_data_in", CLIENT_CAPTURE, out)
}

/// Feeds the whole stream in read-sized chunks, as the relay would; returns a checksum so the
/// work cannot be optimised away.
fn relay_pass(scanner: &mut FrameScanner, bytes: &[u8]) -> u64 {
    let mut seen = 0u64;
    for chunk in bytes.chunks(READ_CHUNK) {
        let mut off = 0;
        while off < chunk.len() {
            let n = scanner
                .scan(&chunk[off..], |ev| {
                    seen = seen.wrapping_add(ev.len as u64);
                    if let Some(body) = ev.body {
                        seen = seen.wrapping_add(body.first().copied().unwrap_or(0) as u64);
                    }
                    ControlFlow::Continue(())
                })
                .expect("well-formed mix");
            off += n;
        }
    }
    seen
}

fn report_allocations(m: &Mix) {
    const PASSES: u64 = 20;
    let before = ALLOCS.load(Ordering::Relaxed);
    let mut s = FrameScanner::new(m.capture);
    black_box(relay_pass(&mut s, &m.bytes));
    let first = ALLOCS.load(Ordering::Relaxed) - before;
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..PASSES {
        black_box(relay_pass(&mut s, black_box(&m.bytes)));
    }
    let steady = ALLOCS.load(Ordering::Relaxed) - before;
    println!(
        "allocations {:<34} messages/pass={:<6} bytes/pass={:<8} first pass={} steady={:.6} per message",
        m.name,
        m.messages,
        m.bytes.len(),
        first,
        steady as f64 / (PASSES * m.messages) as f64
    );
}

fn bench(c: &mut Criterion) {
    let mixes = [
        simple_select_responses(),
        extended_batches(),
        large_datarow_stream(),
        copy_in(),
    ];
    for m in &mixes {
        report_allocations(m);
    }
    let mut g = c.benchmark_group("frame_scan");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for m in &mixes {
        g.throughput(Throughput::Bytes(m.bytes.len() as u64));
        let mut s = FrameScanner::new(m.capture);
        g.bench_function(m.name, |b| {
            b.iter(|| relay_pass(&mut s, black_box(&m.bytes)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
