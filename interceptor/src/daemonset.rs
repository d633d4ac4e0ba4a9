//! Whether a stopping agent is being updated or uninstalled: it asks the API server about
//! its own DaemonSet (`--on-exit auto`).
//!
//! A rolling update, a node drain or a deleted agent pod all end with the same SIGTERM,
//! and the data path must stay through them (enrolled pods fail closed until the next
//! agent adopts them). Only an uninstall removes it, and an uninstall is the one case
//! where the DaemonSet itself is gone: `kubectl delete` with background propagation (the
//! default) removes the object before the garbage collector stops its pods, and foreground
//! propagation marks it with a `deletionTimestamp` until they are stopped. Istio's CNI
//! agent tells the two apart the same way. When the API server cannot answer, nothing is
//! removed: a kept data path fails closed, a removed one would let traffic bypass the
//! mesh while the DaemonSet still exists.

use std::fmt;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::Api;

/// The agent's DaemonSet: `--daemonset` in the pod's namespace (`POD_NAMESPACE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonSetRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for DaemonSetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the API server says about the DaemonSet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonSetState {
    /// It exists and is not being deleted: a rolling update, a drain, a deleted pod.
    Present,
    /// It carries a `deletionTimestamp` (foreground deletion): an uninstall.
    Deleting,
    /// It is not there (404): an uninstall.
    Gone,
}

impl DaemonSetState {
    /// Whether this agent's exit is an uninstall.
    pub fn is_uninstall(self) -> bool {
        !matches!(self, DaemonSetState::Present)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonSetCheckError {
    #[error("reading DaemonSet {daemonset}: {source}")]
    Api {
        daemonset: DaemonSetRef,
        #[source]
        source: kube::Error,
    },
    #[error("reading DaemonSet {daemonset}: no answer within {timeout:?}")]
    Timeout {
        daemonset: DaemonSetRef,
        timeout: Duration,
    },
}

/// How long a stopping agent waits for the API server (well inside the grace period).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the API server whether `daemonset` is there, and not being deleted.
pub async fn check(
    client: kube::Client,
    daemonset: &DaemonSetRef,
    timeout: Duration,
) -> Result<DaemonSetState, DaemonSetCheckError> {
    let api: Api<DaemonSet> = Api::namespaced(client, &daemonset.namespace);
    let answer = tokio::time::timeout(timeout, api.get_opt(&daemonset.name))
        .await
        .map_err(|_| DaemonSetCheckError::Timeout {
            daemonset: daemonset.clone(),
            timeout,
        })?
        .map_err(|source| DaemonSetCheckError::Api {
            daemonset: daemonset.clone(),
            source,
        })?;
    Ok(match answer {
        None => DaemonSetState::Gone,
        Some(ds) if ds.metadata.deletion_timestamp.is_some() => DaemonSetState::Deleting,
        Some(_) => DaemonSetState::Present,
    })
}
