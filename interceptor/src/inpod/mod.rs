//! Working inside a pod's network namespace: a dedicated thread parked in the netns
//! creates sockets there (a socket keeps its netns for life), the way ztunnel's in-pod
//! mode does, so no tokio worker ever changes namespace.
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
    #[error("netns thread for {path} is gone")]
    ThreadGone { path: String },
    #[error("in netns {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
