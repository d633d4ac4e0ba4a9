//! Working inside a pod's network namespace: the calling thread enters it for a short
//! synchronous job (a socket keeps its netns for life) and returns, the way ztunnel's
//! in-pod mode does; no thread per pod. [`InPodSockets`] is the proxy's socket factory
//! for a pod. [`discover`] finds the netns of pods that ran before the agent (in `/proc`).
pub mod discover;
mod netns;
mod sockets;

pub use netns::{netns_cookie_of_current, probe_connect, PodNetns};
pub use sockets::InPodSockets;

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
