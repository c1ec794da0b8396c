//! FrameScanner fed the same stream whole and in fuzzer-chosen chunks: it must never panic,
//! must report the same messages either way, and must fail on the same input either way.
//! Half of the inputs are turned into well-formed frame streams first so the body paths get
//! exercised, not just header rejection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsluice::protocol::FrameScanner;
use std::ops::ControlFlow;

const CAPTURE: &[u8] = b"ZECSTKt1";

type Event = (u8, usize, Option<Vec<u8>>);

fn run(chunks: &[&[u8]]) -> (Vec<Event>, bool) {
    let mut scanner = FrameScanner::new(CAPTURE);
    let mut events = Vec::new();
    for chunk in chunks {
        let res = scanner.scan(chunk, |ev| {
            assert!(ev.end <= chunk.len());
            if let Some(start) = ev.start {
                assert_eq!(ev.end - start, ev.len + 5);
            }
            events.push((ev.tag, ev.len, ev.body.map(<[u8]>::to_vec)));
            ControlFlow::Continue(())
        });
        match res {
            Ok(n) => assert_eq!(n, chunk.len()),
            Err(_) => return (events, true),
        }
    }
    (events, false)
}

/// Builds frames from (tag, length byte, body) triples taken from the input.
fn well_formed(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let (tag, len) = (data[0], data[1] as usize);
        data = &data[2..];
        let take = len.min(data.len());
        out.push(tag);
        out.extend_from_slice(&((take + 4) as i32).to_be_bytes());
        out.extend_from_slice(&data[..take]);
        data = &data[take..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (mode, nsplits) = (data[0], (data[1] % 16) as usize);
    let rest = &data[2..];
    if rest.len() < nsplits {
        return;
    }
    let (split_bytes, body) = rest.split_at(nsplits);
    let stream = if mode & 1 == 1 {
        well_formed(body)
    } else {
        body.to_vec()
    };
    let mut cuts: Vec<usize> = split_bytes
        .iter()
        .map(|&b| (b as usize * stream.len()) / 255)
        .collect();
    cuts.sort_unstable();
    let mut chunks = Vec::with_capacity(cuts.len() + 1);
    let mut prev = 0;
    for c in cuts {
        chunks.push(&stream[prev..c]);
        prev = c;
    }
    chunks.push(&stream[prev..]);

    let (whole, whole_err) = run(&[&stream]);
    let (split, split_err) = run(&chunks);
    assert_eq!(whole_err, split_err, "error depends on chunking");
    assert_eq!(whole, split, "events depend on chunking");
    if mode & 1 == 1 {
        assert!(!whole_err, "well-formed stream rejected");
    }
});
