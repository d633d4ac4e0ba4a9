//! Working inside a pod's network namespace: the calling thread enters it for a short
//! synchronous job (a socket keeps its netns for life) and returns, the way ztunnel's
//! in-pod mode does; no thread per pod.
mod netns;

pub use netns::{netns_cookie_of_current, probe_connect, PodNetns};

#[derive(Debug, thiserror::Error)]
pub enum InpodError {
    #[error("opening netns {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering netns {path}: {source}")]
    Enter {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("in netns {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
