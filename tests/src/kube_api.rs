//! A stand-in for the Kubernetes API server's GET endpoints, for agents that run as
//! processes or containers on the testbed (no API server can run on these machines): it
//! answers `GET <path>` with the JSON object set for that path, or the API server's own
//! 404 `Status` body, over plain HTTP/1.1, on a listener the caller made (in a node's
//! netns, say). [`kubeconfig`] writes the file an agent's `KUBECONFIG` names to reach it.
//!
//! It serves single objects only (what `--on-exit auto` reads); the kube source's
//! list/watch protocol is tested against the mock in `interceptor/tests/kube_source.rs`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

#[derive(Default)]
struct Objects {
    by_path: HashMap<String, String>,
    requests: Vec<String>,
}

/// The server; it stops answering (its thread ends at the next request) when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    objects: Arc<Mutex<Objects>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeApiServer {
    /// Serves on `listener` from a thread of its own.
    pub fn start(listener: TcpListener) -> Result<FakeApiServer> {
        let addr = listener.local_addr().context("fake API server address")?;
        let objects = Arc::new(Mutex::new(Objects::default()));
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (served, stop) = (Arc::clone(&objects), Arc::clone(&stopped));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                if let Ok(stream) = stream {
                    let served = Arc::clone(&served);
                    std::thread::spawn(move || {
                        let _ = serve(stream, &served);
                    });
                }
            }
        });
        Ok(FakeApiServer {
            addr,
            objects,
            stopped,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers `GET path` with `object` (JSON) from now on.
    pub fn set(&self, path: &str, object: &serde_json::Value) {
        let mut objects = self.objects.lock().unwrap();
        objects.by_path.insert(path.to_owned(), object.to_string());
    }

    /// Answers `GET path` with 404 from now on.
    pub fn delete(&self, path: &str) {
        self.objects.lock().unwrap().by_path.remove(path);
    }

    /// The paths requested so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.objects.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// One connection: requests until the client closes it (hyper keeps connections alive).
fn serve(stream: TcpStream, objects: &Mutex<Objects>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut content_length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; content_length];
        std::io::Read::read_exact(&mut reader, &mut body)?;
        let mut parts = request_line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("").to_owned();
        let answer = {
            let mut objects = objects.lock().unwrap();
            objects.requests.push(format!("{method} {path}"));
            match (method, objects.by_path.get(&path)) {
                ("GET", Some(object)) => Some(object.clone()),
                _ => None,
            }
        };
        let (status, body) = match answer {
            Some(object) => ("200 OK", object),
            None => (
                "404 Not Found",
                serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "NotFound", "code": 404,
                    "message": format!("{path} not found"),
                })
                .to_string(),
            ),
        };
        write!(
            out,
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )?;
        out.flush()?;
    }
}

/// Writes a kubeconfig at `path` whose one context reaches `server` over plain HTTP.
pub fn kubeconfig(path: &Path, server: SocketAddr) -> Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: testbed\n  cluster:\n    server: http://{server}\n\
         users:\n- name: agent\n  user: {{}}\n\
         contexts:\n- name: testbed\n  context:\n    cluster: testbed\n    user: agent\n\
         current-context: testbed\n"
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The path of a namespaced object of an `apps/v1`-style group: `daemonset_path("ns",
/// "name")` is `/apis/apps/v1/namespaces/ns/daemonsets/name`.
pub fn daemonset_path(namespace: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}")
}
