//! Fuzz target `annotations`: a pod's annotations: per-pod rules and the enrollment decision.
//! The body lives in `interceptor::fuzzing::annotations`, which the stable regression test
//! (interceptor/tests/fuzz_corpus.rs) also runs over fuzz/corpus/annotations and fuzz/regressions/annotations.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::annotations(data));
