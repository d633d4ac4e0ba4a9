//! Fuzz target `client_hello`: a TLS client's first bytes, as TLS passthrough peeks them.
//! The body lives in `interceptor::fuzzing::client_hello`, which the stable regression test
//! (interceptor/tests/fuzz_corpus.rs) also runs over fuzz/corpus/client_hello and fuzz/regressions/client_hello.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::client_hello(data));
