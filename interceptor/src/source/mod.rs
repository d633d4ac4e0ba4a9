//! Sources that feed the model (DESIGN.md section 4): the manifest directory and the
//! Kubernetes API server, publishing the same state, converting the same objects in the
//! same way (`objects`).

pub mod kube;
pub mod manifests;
pub mod objects;
