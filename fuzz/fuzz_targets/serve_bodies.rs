#![no_main]
//! Body: `elder::util::fuzz_entry::serve_bodies` (replayed on stable by tests/fuzz_corpora.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = elder::util::fuzz_entry::serve_bodies(data);
});
