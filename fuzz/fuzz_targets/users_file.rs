//! UserStore::parse accepts or rejects any text with a one-line error that never repeats a
//! secret; accepted entries answer every accessor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsluice::auth::UserStore;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Cleartext entries cost a PBKDF2 derivation each; keep inputs small enough to stay fast.
    if text.len() > 2048 {
        return;
    }
    match UserStore::parse(text) {
        Ok(store) => {
            for name in store.names() {
                let entry = store.get(name).expect("listed user is present");
                let _ = entry.plain_password();
                let _ = entry.scram_verifier();
                let _ = entry.md5_hash();
            }
        }
        Err(e) => assert!(!e.contains('\n'), "multi-line error: {e:?}"),
    }
});
