//! The interceptor CNI chained plugin: its protocol with the node agent, and the
//! plugin logic that `interceptor-cni` runs.
pub mod client;
pub mod config;
pub mod env;
pub mod error;
pub mod plugin;
pub mod protocol;

#[cfg(test)]
mod test_support;

pub use client::{AgentClient, ClientError};
pub use config::{parse_config, FailurePolicy, NetConf};
pub use env::{CniArgs, CniEnv};
pub use error::CniError;
pub use plugin::{run, run_process};
