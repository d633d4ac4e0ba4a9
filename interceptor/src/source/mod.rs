//! Sources that feed the model (DESIGN.md section 4); for now the manifest directory.

pub mod manifests;
