//! Fuzz target `mesh_config`: the agent's mesh configuration file and its dump.
//! The body lives in `interceptor::fuzzing::mesh_config`, which the stable regression test
//! (interceptor/tests/fuzz_corpus.rs) also runs over fuzz/corpus/mesh_config and fuzz/regressions/mesh_config.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::mesh_config(data));
