//! Fuzz target `manifests`: one manifest file, then the model, routes and gateways built from it.
//! The body lives in `interceptor::fuzzing::manifests`, which the stable regression test
//! (interceptor/tests/fuzz_corpus.rs) also runs over fuzz/corpus/manifests and fuzz/regressions/manifests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::manifests(data));
