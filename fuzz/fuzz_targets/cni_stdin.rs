//! Fuzz target `cni_stdin`: the CNI plugin's stdin (the network configuration) and a GC call on it.
//! The body lives in `interceptor::fuzzing::cni_stdin`, which the stable regression test
//! (interceptor/tests/fuzz_corpus.rs) also runs over fuzz/corpus/cni_stdin and fuzz/regressions/cni_stdin.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::cni_stdin(data));
