//! StartupPacket::parse must return Ok or Err for any body, never panic; a parsed
//! StartupMessage must round-trip through the builder.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgsluice::protocol::{self, StartupPacket};

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = StartupPacket::parse(data) else {
        return;
    };
    if let StartupPacket::Startup { params } = &packet {
        let pairs: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut buf = BytesMut::new();
        protocol::startup_message(&mut buf, &pairs);
        // The builder writes length + body; parsing the body again gives the same packet.
        assert_eq!(StartupPacket::parse(&buf[4..]).ok().as_ref(), Some(&packet));
    }
});
