//! Arbitrary text (UTF-8, lossily) into every code, date and identifier parser: the
//! domain codes, partial dates, pseudonyms, API keys, BSNs, name folding and research
//! filter values. See `properties::string_parsers` for what is asserted.

#![no_main]

mod properties;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    properties::string_parsers(&text);
    // Also each line on its own: short inputs reach the format checks more often.
    if text.contains('\n') {
        for line in text.lines() {
            properties::string_parsers(line);
        }
    }
});
