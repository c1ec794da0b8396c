//! parse_error_fields takes any bytes; fields it reports must round-trip via the builder.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgsluice::protocol::{self, Severity};

fuzz_target!(|data: &[u8]| {
    let fields = protocol::parse_error_fields(data);
    if fields.code.len() == 5 && !fields.message.contains('\0') {
        let mut buf = BytesMut::new();
        protocol::error_response(
            &mut buf,
            Severity::Error,
            &fields.code,
            &fields.message,
            None,
        );
        let again = protocol::parse_error_fields(&buf[5..]);
        assert_eq!(again.code, fields.code);
        assert_eq!(again.message, fields.message);
    }
});
