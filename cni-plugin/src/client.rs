//! Blocking client for the agent's unix socket: one JSON request line out, one JSON
//! response line back (see [`crate::protocol`]).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::protocol::{AgentRequest, AgentResponse, MAX_MESSAGE_BYTES};

/// Why a call to the agent produced no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("send: {0}")]
    Send(#[source] io::Error),
    #[error("receive: {0}")]
    Receive(#[source] io::Error),
    #[error("no answer within {} ms", .0.as_millis())]
    TimedOut(Duration),
    #[error("connection closed before a response")]
    ClosedWithoutResponse,
    #[error("request of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    RequestTooLarge(usize),
    #[error("response exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    ResponseTooLarge,
    #[error("cannot encode request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("cannot decode response: {0}")]
    Decode(#[source] serde_json::Error),
}

impl ClientError {
    /// True when the agent is down, hung or went away mid-call: the cases the failure
    /// policy governs. False when it answered something we cannot use, which points
    /// at a protocol mismatch that no policy should paper over.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Connect(_)
                | Self::Send(_)
                | Self::Receive(_)
                | Self::TimedOut(_)
                | Self::ClosedWithoutResponse
        )
    }
}

/// Talks to the agent at one socket path with one overall timeout per call.
#[derive(Clone, Debug)]
pub struct AgentClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `request` and waits for the agent's single response line.
    ///
    /// The timeout bounds the whole exchange, not each read: a per-read timeout alone
    /// would let an agent that trickles bytes hold a pod's sandbox creation forever.
    /// Connecting a unix socket does not block unless the agent's backlog is full, so
    /// std's untimed connect is acceptable.
    pub fn call(&self, request: &AgentRequest) -> Result<AgentResponse, ClientError> {
        let deadline = Instant::now() + self.timeout;

        let mut line = serde_json::to_vec(request).map_err(ClientError::Encode)?;
        if line.len() > MAX_MESSAGE_BYTES {
            return Err(ClientError::RequestTooLarge(line.len()));
        }
        line.push(b'\n');

        let mut stream = UnixStream::connect(&self.socket).map_err(ClientError::Connect)?;

        stream
            .set_write_timeout(Some(self.remaining(deadline)?))
            .map_err(ClientError::Send)?;
        stream
            .write_all(&line)
            .map_err(|e| self.classify(e, ClientError::Send))?;

        let response = self.read_line(&mut stream, deadline)?;
        serde_json::from_slice(&response).map_err(ClientError::Decode)
    }

    fn read_line(
        &self,
        stream: &mut UnixStream,
        deadline: Instant,
    ) -> Result<Vec<u8>, ClientError> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            stream
                .set_read_timeout(Some(self.remaining(deadline)?))
                .map_err(ClientError::Receive)?;
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.classify(e, ClientError::Receive)),
            };
            if n == 0 {
                // The agent closes after answering; an unterminated final line is still
                // a whole answer.
                if buf.iter().all(u8::is_ascii_whitespace) {
                    return Err(ClientError::ClosedWithoutResponse);
                }
                return Ok(buf);
            }
            let scanned = buf.len();
            buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = buf[scanned..].iter().position(|&b| b == b'\n') {
                buf.truncate(scanned + pos);
                if buf.len() > MAX_MESSAGE_BYTES {
                    return Err(ClientError::ResponseTooLarge);
                }
                return Ok(buf);
            }
            if buf.len() > MAX_MESSAGE_BYTES {
                return Err(ClientError::ResponseTooLarge);
            }
        }
    }

    fn remaining(&self, deadline: Instant) -> Result<Duration, ClientError> {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ClientError::TimedOut(self.timeout))
    }

    /// Socket timeouts surface as `WouldBlock` (or `TimedOut`) io errors.
    fn classify(&self, e: io::Error, other: fn(io::Error) -> ClientError) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ClientError::TimedOut(self.timeout)
            }
            _ => other(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PodSandbox;
    use crate::test_support::{temp_socket_path, FakeAgent, Reply};

    fn status_client(path: &Path, timeout_ms: u64) -> AgentClient {
        AgentClient::new(path, Duration::from_millis(timeout_ms))
    }

    #[test]
    fn round_trip() {
        let agent = FakeAgent::start(vec![Reply::ok(true)]);
        let req = AgentRequest::Add(PodSandbox {
            container_id: "c".into(),
            netns: "/n".into(),
            ifname: "eth0".into(),
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            ips: vec!["10.0.0.5/24".into()],
        });
        let resp = status_client(agent.path(), 2000).call(&req).unwrap();
        assert_eq!(
            resp,
            AgentResponse::Ok {
                enrolled: true,
                detail: String::new()
            }
        );
        assert_eq!(agent.finish(), vec![req]);
    }

    #[test]
    fn missing_socket_is_unavailable() {
        let path = temp_socket_path();
        let err = status_client(&path, 500)
            .call(&AgentRequest::Status)
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect(_)), "{err}");
        assert!(err.is_unavailable());
    }

    #[test]
    fn silent_agent_times_out() {
        let agent = FakeAgent::start(vec![Reply::Hang]);
        let started = Instant::now();
        let err = status_client(agent.path(), 100)
            .call(&AgentRequest::Status)
            .unwrap_err();
        assert!(matches!(err, ClientError::TimedOut(_)), "{err}");
        assert!(err.is_unavailable());
        assert!(started.elapsed() < Duration::from_millis(1000));
        assert_eq!(err.to_string(), "no answer within 100 ms");
    }

    #[test]
    fn close_without_answer_is_unavailable() {
        let agent = FakeAgent::start(vec![Reply::Close]);
        let err = status_client(agent.path(), 2000)
            .call(&AgentRequest::Status)
            .unwrap_err();
        assert!(matches!(err, ClientError::ClosedWithoutResponse), "{err}");
        assert!(err.is_unavailable());
    }

    #[test]
    fn unterminated_final_line_is_accepted() {
        let agent = FakeAgent::start(vec![Reply::Raw(
            br#"{"result":"ok","enrolled":false}"#.to_vec(),
        )]);
        let resp = status_client(agent.path(), 2000)
            .call(&AgentRequest::Status)
            .unwrap();
        assert!(matches!(
            resp,
            AgentResponse::Ok {
                enrolled: false,
                ..
            }
        ));
    }

    #[test]
    fn garbage_and_oversized_answers_are_protocol_errors() {
        let agent = FakeAgent::start(vec![
            Reply::Raw(b"hello\n".to_vec()),
            Reply::Raw(vec![b'x'; MAX_MESSAGE_BYTES + 10]),
        ]);
        let client = status_client(agent.path(), 2000);
        let err = client.call(&AgentRequest::Status).unwrap_err();
        assert!(matches!(err, ClientError::Decode(_)), "{err}");
        assert!(!err.is_unavailable());
        let err = client.call(&AgentRequest::Status).unwrap_err();
        assert!(matches!(err, ClientError::ResponseTooLarge), "{err}");
        assert!(!err.is_unavailable());
    }
}
