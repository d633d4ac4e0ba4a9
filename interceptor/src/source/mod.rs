//! Sources that feed the model (DESIGN.md section 4): the manifest directory and the
//! Kubernetes API server, publishing the same state.

pub mod kube;
pub mod manifests;
