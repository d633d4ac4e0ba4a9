//! Fuzz target `agent_protocol`: one line of the plugin/agent socket protocol, both directions.
//! The body lives in `interceptor::fuzzing::agent_protocol`, which the stable regression test
//! (interceptor/tests/fuzz_corpus.rs) also runs over fuzz/corpus/agent_protocol and fuzz/regressions/agent_protocol.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::agent_protocol(data));
