//! The agent side of the CNI plugin protocol: a unix socket (mode 0600) answering one
//! JSON request per connection.
pub mod install;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use interceptor_cni::protocol::{codes, AgentRequest, AgentResponse, MAX_MESSAGE_BYTES};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::agent::Agent;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CniServerError {
    #[error("CNI socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Bind the socket and serve until aborted. The socket is bound under a temporary name
/// and renamed over `path`, so a client always finds a socket there: a stale one is
/// replaced, and at a hand-over the previous agent's socket is swapped for this one in
/// one step (the previous agent keeps its own, now nameless, until it exits).
pub fn serve(path: &Path, agent: Arc<Agent>) -> Result<JoinHandle<()>, CniServerError> {
    let bind_err = |source| CniServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    let staged = path.with_extension(format!("{}.new", std::process::id()));
    match std::fs::remove_file(&staged) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(bind_err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(&staged).map_err(bind_err)?;
    let installed = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&staged, path));
    if let Err(error) = installed {
        let _ = std::fs::remove_file(&staged);
        return Err(bind_err(error));
    }
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let agent = Arc::clone(&agent);
                    tokio::spawn(async move { handle(stream, agent).await });
                }
                Err(error) => {
                    tracing::warn!(%error, "CNI socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }))
}

async fn handle(stream: UnixStream, agent: Arc<Agent>) {
    let (read, mut write) = stream.into_split();
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(read)).await {
        Err(_) => error(codes::IO_FAILURE, "timed out waiting for the request"),
        Ok(Err(response)) => response,
        Ok(Ok(request)) => dispatch(request, &agent).await,
    };
    let mut line = serde_json::to_vec(&response).unwrap_or_default();
    line.push(b'\n');
    if let Err(error) = write.write_all(&line).await {
        tracing::warn!(%error, "writing CNI response");
    }
}

async fn read_request(
    read: tokio::net::unix::OwnedReadHalf,
) -> Result<AgentRequest, AgentResponse> {
    // One byte over the cap tells an oversized request from one exactly at the cap.
    let mut reader = BufReader::new(read).take(MAX_MESSAGE_BYTES as u64 + 1);
    let mut buf = Vec::new();
    reader
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| error(codes::IO_FAILURE, format!("reading the request: {e}")))?;
    if buf.len() > MAX_MESSAGE_BYTES {
        return Err(error(
            codes::DECODING_FAILURE,
            format!("request exceeds {MAX_MESSAGE_BYTES} bytes"),
        ));
    }
    serde_json::from_slice(&buf)
        .map_err(|e| error(codes::DECODING_FAILURE, format!("malformed request: {e}")))
}

async fn dispatch(request: AgentRequest, agent: &Agent) -> AgentResponse {
    // After a hand-over the new agent owns the socket path; a request that still reached
    // this one is answered "try again", and kubelet's retry dials the new agent.
    if let Some(successor) = agent.superseded() {
        return handed_over(successor);
    }
    let result = match &request {
        AgentRequest::Add(sandbox) => {
            let added = agent.add(sandbox).await;
            // Handed over while adding: the new agent read the pod list before this pod
            // was in it, so it would never know the pod. Undone; the retry goes there.
            if let (Ok(_), Some(successor)) = (&added, agent.superseded()) {
                agent.del(sandbox).await;
                return handed_over(successor);
            }
            added
        }
        AgentRequest::Del(sandbox) => Ok(agent.del(sandbox).await),
        AgentRequest::Check(sandbox) => agent.check(sandbox),
        AgentRequest::Status => Ok(AgentResponse::Ok {
            enrolled: false,
            detail: format!("agent ready, mode {}", agent.datapath().mode()),
        }),
    };
    result.unwrap_or_else(|failure| {
        tracing::warn!(code = failure.code, msg = %failure.msg, "CNI request failed");
        failure.into_response()
    })
}

fn handed_over(successor: i32) -> AgentResponse {
    error(
        codes::TRY_AGAIN_LATER,
        format!("this agent has handed over to agent pid {successor}: try again"),
    )
}

fn error(code: u32, msg: impl Into<String>) -> AgentResponse {
    AgentResponse::Error {
        code,
        msg: msg.into(),
        details: String::new(),
    }
}
