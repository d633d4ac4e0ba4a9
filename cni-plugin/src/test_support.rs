//! Test helpers: a scripted fake agent on a real unix socket, so tests exercise the
//! plugin's side of the protocol exactly as the agent process would see it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::protocol::{AgentRequest, AgentResponse};

/// Upper bound on any wait in the fake agent, so a broken test fails instead of hanging.
const GUARD: Duration = Duration::from_secs(10);

/// A socket path no other test (or test process) uses.
pub fn temp_socket_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "icni-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir();
    let path = dir.join(&name);
    if path.as_os_str().len() < 100 {
        path
    } else {
        Path::new("/tmp").join(name)
    }
}

/// What the fake agent does with one connection after reading the request line.
pub enum Reply {
    Respond(AgentResponse),
    /// Write these bytes verbatim, then close.
    Raw(Vec<u8>),
    /// Close without answering.
    Close,
    /// Never answer; wait until the client gives up and closes.
    Hang,
}

impl Reply {
    pub fn ok(enrolled: bool) -> Self {
        Self::Respond(AgentResponse::Ok {
            enrolled,
            detail: String::new(),
        })
    }

    pub fn error(code: u32, msg: &str, details: &str) -> Self {
        Self::Respond(AgentResponse::Error {
            code,
            msg: msg.into(),
            details: details.into(),
        })
    }
}

/// Serves exactly one connection per scripted reply, in order.
pub struct FakeAgent {
    path: PathBuf,
    thread: Option<JoinHandle<(UnixListener, Vec<AgentRequest>)>>,
}

impl FakeAgent {
    pub fn start(replies: Vec<Reply>) -> Self {
        let path = temp_socket_path();
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind fake agent socket");
        listener.set_nonblocking(true).expect("nonblocking");
        let thread = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for reply in replies {
                let stream = accept_with_guard(&listener);
                if let Some(req) = serve(stream, reply) {
                    requests.push(req);
                }
            }
            (listener, requests)
        });
        Self {
            path,
            thread: Some(thread),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the scripted connections and returns the requests received. Panics if
    /// the plugin connected more often than scripted.
    pub fn finish(mut self) -> Vec<AgentRequest> {
        let thread = self.thread.take().expect("finish once");
        let (listener, requests) = thread.join().expect("fake agent thread panicked");
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("fake agent accept: {e}"),
            Ok(_) => panic!("plugin connected more often than scripted"),
        }
        requests
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_with_guard(listener: &UnixListener) -> UnixStream {
    let deadline = Instant::now() + GUARD;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking stream");
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "plugin never connected to the fake agent"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("fake agent accept: {e}"),
        }
    }
}

fn serve(stream: UnixStream, reply: Reply) -> Option<AgentRequest> {
    stream.set_read_timeout(Some(GUARD)).expect("read timeout");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read request line");
    let request = serde_json::from_str(line.trim_end()).ok();
    let mut stream = reader.into_inner();
    // Write errors are ignored: some tests have the client hang up first on purpose.
    match reply {
        Reply::Respond(resp) => {
            let mut out = serde_json::to_vec(&resp).expect("encode response");
            out.push(b'\n');
            let _ = stream.write_all(&out);
        }
        Reply::Raw(bytes) => {
            let _ = stream.write_all(&bytes);
        }
        Reply::Close => {}
        Reply::Hang => {
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        }
    }
    request
}
