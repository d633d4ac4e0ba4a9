//! A stand-in for the Kubernetes API server, for agents that run as processes or
//! containers on the testbed (no API server can run on these machines), over plain
//! HTTP/1.1 on a listener the caller made (in a node's netns, say):
//! - `GET <path>` of a single object set with [`FakeApiServer::set`];
//! - collections ([`FakeApiServer::collection`]): a list (`kind: <Kind>List`, every item
//!   and the collection's `resourceVersion`) and `?watch=true` streams, chunked, one
//!   `{"type":…,"object":…}` line per change made with [`FakeApiServer::apply`] or
//!   [`FakeApiServer::remove`], as the API server sends them; query parameters (limit,
//!   resourceVersion, bookmarks, timeouts) are accepted and ignored;
//! - anything else: the API server's 404 `Status` body (a CRD the cluster lacks).
//!
//! [`kubeconfig`] writes the file that names it (`--kubeconfig`, `KUBECONFIG`). The kube
//! source's protocol edge cases (410, dropped watches, bookmarks) are tested against the
//! mock in `interceptor/tests/kube_source.rs`; this one serves agents end to end.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

#[derive(Default)]
struct Objects {
    by_path: HashMap<String, String>,
    collections: HashMap<String, Collection>,
    /// The last resourceVersion handed out, shared by all collections as in etcd.
    resource_version: u64,
    requests: Vec<String>,
}

/// A collection's objects by namespace/name, and its open watches.
#[derive(Default)]
struct Collection {
    list_kind: String,
    items: std::collections::BTreeMap<String, serde_json::Value>,
    watches: Vec<mpsc::Sender<String>>,
}

impl Objects {
    fn next_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }
}

/// `namespace/name` (or `name`) of an object.
fn object_key(object: &serde_json::Value) -> String {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().expect("an object has metadata.name");
    match meta["namespace"].as_str() {
        Some(namespace) => format!("{namespace}/{name}"),
        None => name.to_owned(),
    }
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

    /// Serves a collection at `path` (`/api/v1/namespaces`), listed as `list_kind`
    /// (`NamespaceList`), holding `items`.
    pub fn collection(&self, path: &str, list_kind: &str, items: Vec<serde_json::Value>) {
        let mut objects = self.objects.lock().unwrap();
        let mut collection = Collection {
            list_kind: list_kind.to_owned(),
            ..Collection::default()
        };
        for mut item in items {
            item["metadata"]["resourceVersion"] = objects.next_version().into();
            collection.items.insert(object_key(&item), item);
        }
        objects.collections.insert(path.to_owned(), collection);
    }

    /// Adds or replaces `object` in the collection at `path`, and sends `ADDED` or
    /// `MODIFIED` to its watches.
    pub fn apply(&self, path: &str, mut object: serde_json::Value) {
        let mut objects = self.objects.lock().unwrap();
        object["metadata"]["resourceVersion"] = objects.next_version().into();
        let collection = objects
            .collections
            .get_mut(path)
            .unwrap_or_else(|| panic!("no collection {path}"));
        let kind = match collection.items.insert(object_key(&object), object.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        collection.notify(kind, object);
    }

    /// Removes `namespace/name` (or `name`) from the collection at `path`, and sends
    /// `DELETED` to its watches.
    pub fn remove(&self, path: &str, key: &str) {
        let mut objects = self.objects.lock().unwrap();
        let version = objects.next_version();
        let collection = objects
            .collections
            .get_mut(path)
            .unwrap_or_else(|| panic!("no collection {path}"));
        let mut object = collection
            .items
            .remove(key)
            .unwrap_or_else(|| panic!("no {key} in {path}"));
        object["metadata"]["resourceVersion"] = version.into();
        collection.notify("DELETED", object);
    }

    /// How many watches of the collection at `path` are open.
    pub fn watches(&self, path: &str) -> usize {
        let mut objects = self.objects.lock().unwrap();
        objects.collections.get_mut(path).map_or(0, |c| {
            c.watches.retain(|w| w.send(String::new()).is_ok());
            c.watches.len()
        })
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
        // Ends the watch streams (their threads see the channel closed).
        if let Ok(mut objects) = self.objects.lock() {
            for collection in objects.collections.values_mut() {
                collection.watches.clear();
            }
        }
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

impl Collection {
    fn notify(&mut self, kind: &str, object: serde_json::Value) {
        let line = serde_json::json!({"type": kind, "object": object}).to_string();
        self.watches.retain(|w| w.send(line.clone()).is_ok());
    }

    fn list(&self, resource_version: u64) -> String {
        let items: Vec<&serde_json::Value> = self.items.values().collect();
        serde_json::json!({
            "kind": self.list_kind, "apiVersion": "v1",
            "metadata": {"resourceVersion": resource_version.to_string()},
            "items": items,
        })
        .to_string()
    }
}

/// What a request gets.
enum Answer {
    Body(&'static str, String),
    /// A watch: its events arrive here (an empty string is a liveness check, not sent).
    Watch(mpsc::Receiver<String>),
}

fn answer(objects: &Mutex<Objects>, method: &str, target: &str) -> Answer {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let watch = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let mut objects = objects.lock().unwrap();
    objects.requests.push(format!(
        "{method} {path}{}",
        if watch { " (watch)" } else { "" }
    ));
    if method == "GET" {
        if let Some(object) = objects.by_path.get(path) {
            return Answer::Body("200 OK", object.clone());
        }
        let version = objects.resource_version;
        if let Some(collection) = objects.collections.get_mut(path) {
            if watch {
                let (tx, rx) = mpsc::channel();
                collection.watches.push(tx);
                return Answer::Watch(rx);
            }
            return Answer::Body("200 OK", collection.list(version));
        }
    }
    Answer::Body(
        "404 Not Found",
        serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "NotFound", "code": 404,
            "message": format!("{path} not found"),
        })
        .to_string(),
    )
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
        match answer(objects, method, target) {
            Answer::Body(status, body) => {
                write!(
                    out,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\n\r\n{body}",
                    body.len()
                )?;
                out.flush()?;
            }
            Answer::Watch(events) => {
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     transfer-encoding: chunked\r\n\r\n"
                )?;
                out.flush()?;
                // Until the client goes away (a write fails) or the server is dropped.
                for line in events {
                    if line.is_empty() {
                        continue;
                    }
                    let chunk = format!("{line}\n");
                    write!(out, "{:x}\r\n{chunk}\r\n", chunk.len())?;
                    out.flush()?;
                }
                return Ok(());
            }
        }
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
