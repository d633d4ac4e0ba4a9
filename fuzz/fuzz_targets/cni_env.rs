//! Fuzz target `cni_env`: the CNI plugin's `CNI_*` environment and `CNI_ARGS`.
//! The body lives in `interceptor::fuzzing::cni_env`, which the stable regression test
//! (interceptor/tests/fuzz_corpus.rs) also runs over fuzz/corpus/cni_env and fuzz/regressions/cni_env.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::cni_env(data));
