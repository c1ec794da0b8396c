//! A configuration file's text is accepted or rejected with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsluice::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Config::from_toml_str(text) {
        // A configuration that built must survive a reload-style rebuild of its flags.
        let _ = format!("{:?}", cfg.listen);
    }
});
