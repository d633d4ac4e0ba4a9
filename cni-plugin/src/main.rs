//! `interceptor-cni`: the CNI chained plugin binary; all logic lives in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(interceptor_cni::run_process())
}
