//! `Config::parse` on arbitrary text: an error or a config, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openrouter_proxy::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(error) = Config::parse(text) {
            assert!(!error.to_string().is_empty());
        }
    }
});
