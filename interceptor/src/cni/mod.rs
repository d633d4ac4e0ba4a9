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

/// Bind the socket (replacing a stale one) and serve until aborted.
pub fn serve(path: &Path, agent: Arc<Agent>) -> Result<JoinHandle<()>, CniServerError> {
    let bind_err = |source| CniServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(bind_err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
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
    let result = match &request {
        AgentRequest::Add(sandbox) => agent.add(sandbox).await,
        AgentRequest::Del(sandbox) => Ok(agent.del(sandbox)),
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

fn error(code: u32, msg: impl Into<String>) -> AgentResponse {
    AgentResponse::Error {
        code,
        msg: msg.into(),
        details: String::new(),
    }
}
