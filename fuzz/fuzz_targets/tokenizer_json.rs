#![no_main]
//! Body: `elder::util::fuzz_entry::tokenizer_json` (replayed on stable by tests/fuzz_corpora.rs).
libfuzzer_sys::fuzz_target!(
    init: {
        // `Tokenizer::from_json` catches the panics of the tokenizers crate and returns them as
        // errors; libfuzzer-sys's hook would abort on those before they are caught. A panic that
        // nothing catches still aborts (libfuzzer-sys wraps each input in `catch_unwind`).
        std::panic::set_hook(Box::new(|info| eprintln!("caught? {info}")));
    },
    |data: &[u8]| {
        let _ = elder::util::fuzz_entry::tokenizer_json(data);
    }
);
