//! The Kubernetes source against a mock API server: real HTTP on 127.0.0.1, list bodies
//! and newline-delimited watch streams from `tests/fixtures/kube/` (shaped like a real API
//! server's, see the README there), a kube-rs client built with `kube::Config::new`.
//!
//! Covered: initial lists -> generation 1 (and the same model the manifest source builds
//! from the same objects), every node's pods (no field selector) and watch bookmarks on
//! every request, watch events -> new generations, an ERROR 410 -> re-list, a watch the server
//! ends -> resumed from the last bookmark without a re-list, a watch connection torn down
//! -> error then recovery, readiness only after all four lists, a failing list reported
//! in `last_error` until it recovers; routing CRDs: listed into the model, a missing CRD
//! (404, as every test but one has it) is an empty kind, a forbidden one (403) is reported
//! without holding the model back, and watch events add routing objects; FSM's MeshConfig:
//! listed and laid over the mesh config file, followed through the FSM docs' `kubectl
//! patch` examples, an invalid update rejected while the previous version stays, no CRD
//! (404) meaning the file alone.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use futures::channel::mpsc;
use interceptor::config::{self, ConfigState, MeshConfigName, MeshConfigObject};
use interceptor::model::{IpFamily, Model, PodKey, ServiceKey};
use interceptor::source::kube::{self as kube_source, KubeSourceConfig, KubeSourceError};
use interceptor::source::manifests::{self, ManifestState};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const KINDS: [&str; 4] = [NAMESPACES, PODS, SERVICES, SLICES];

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(20);

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kube")
        .join(name)
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The events of a `.jsonl` watch fixture, one per line.
fn events(name: &str) -> Vec<String> {
    fixture(name)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// One request the mock received.
#[derive(Clone, Debug)]
struct Seen {
    watch: bool,
    query: BTreeMap<String, String>,
}

#[derive(Default)]
struct Collection {
    /// The body of a successful list.
    list: String,
    /// Answers to give to the next list requests before succeeding: status and body.
    list_failures: VecDeque<(StatusCode, String)>,
    /// While set and false, list requests wait.
    gate: Option<watch::Receiver<bool>>,
    seen: Vec<Seen>,
    /// The open watch of this collection, if any: lines sent here reach the client.
    watch: Option<mpsc::UnboundedSender<Result<Bytes, io::Error>>>,
    watches_opened: usize,
}

#[derive(Default)]
struct Mock {
    collections: Mutex<HashMap<&'static str, Collection>>,
}

impl Mock {
    fn with<R>(&self, path: &str, f: impl FnOnce(&mut Collection) -> R) -> R {
        let mut all = self.collections.lock().unwrap();
        f(all.get_mut(path).expect("a known collection"))
    }

    fn set_list(&self, path: &str, body: String) {
        self.with(path, |c| c.list = body);
    }

    fn lists(&self, path: &str) -> Vec<Seen> {
        self.with(path, |c| {
            c.seen.iter().filter(|s| !s.watch).cloned().collect()
        })
    }

    fn watches(&self, path: &str) -> Vec<Seen> {
        self.with(path, |c| {
            c.seen.iter().filter(|s| s.watch).cloned().collect()
        })
    }

    fn watches_opened(&self, path: &str) -> usize {
        self.with(path, |c| c.watches_opened)
    }

    /// Sends one event line on the open watch of `path`.
    fn send(&self, path: &str, line: &str) {
        self.with(path, |c| {
            let tx = c.watch.as_ref().expect("an open watch");
            tx.unbounded_send(Ok(Bytes::from(format!("{line}\n"))))
                .expect("the watch is still being read");
        });
    }

    /// Ends the watch response of `path` cleanly, as an API server does at its timeout.
    fn end_watch(&self, path: &str) {
        self.with(path, |c| c.watch = None);
    }

    /// Tears down the connection of the watch of `path` mid-response.
    fn break_watch(&self, path: &str) {
        self.with(path, |c| {
            if let Some(tx) = c.watch.take() {
                let _ = tx.unbounded_send(Err(io::Error::other("connection torn down")));
            }
        });
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> String {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
    .to_string()
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn parse_query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

async fn api(State(mock): State<Arc<Mock>>, uri: Uri) -> Response {
    let path = uri.path().to_string();
    let known = mock
        .collections
        .lock()
        .unwrap()
        .keys()
        .copied()
        .find(|k| *k == path);
    let Some(path) = known else {
        return json_response(
            StatusCode::NOT_FOUND,
            status_body(
                404,
                "NotFound",
                &format!("the server could not find {path}"),
            ),
        );
    };
    let query = parse_query(&uri);
    let watch = query.get("watch").map(String::as_str) == Some("true");
    mock.with(path, |c| {
        c.seen.push(Seen {
            watch,
            query: query.clone(),
        })
    });

    if watch {
        let (tx, rx) = mpsc::unbounded();
        mock.with(path, |c| {
            c.watch = Some(tx);
            c.watches_opened += 1;
        });
        return json_response(StatusCode::OK, Body::from_stream(rx));
    }
    let gate = mock.with(path, |c| c.gate.clone());
    if let Some(mut gate) = gate {
        let _ = gate.wait_for(|open| *open).await;
    }
    mock.with(path, |c| match c.list_failures.pop_front() {
        Some((status, body)) => json_response(status, body),
        None => json_response(StatusCode::OK, c.list.clone()),
    })
}

/// Starts a mock API server holding the fixture lists; returns it and its address.
async fn start_mock(configure: impl FnOnce(&Mock)) -> (Arc<Mock>, SocketAddr) {
    let mock = Arc::new(Mock::default());
    {
        let mut all = mock.collections.lock().unwrap();
        for (path, file) in [
            (NAMESPACES, "namespaces-list.json"),
            (PODS, "pods-list.json"),
            (SERVICES, "services-list.json"),
            (SLICES, "endpointslices-list.json"),
        ] {
            all.insert(
                path,
                Collection {
                    list: fixture(file),
                    ..Collection::default()
                },
            );
        }
    }
    configure(&mock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(api).with_state(Arc::clone(&mock));
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (mock, addr)
}

fn client(addr: SocketAddr) -> kube::Client {
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

struct Source {
    rx: watch::Receiver<ManifestState>,
    task: JoinHandle<Result<(), KubeSourceError>>,
    _abort: AbortOnDrop,
}

/// Stops the source when a test ends, passed or failed.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn start_source(addr: SocketAddr) -> Source {
    start_source_with(addr, None)
}

fn start_source_with(addr: SocketAddr, mesh_config: Option<MeshConfigName>) -> Source {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "interceptor=debug".into()),
        )
        .try_init();
    let (tx, rx) = watch::channel(ManifestState::default());
    let task = kube_source::spawn(
        client(addr),
        KubeSourceConfig {
            node_name: NODE.into(),
            mesh_config,
        },
        tx,
    );
    let abort = AbortOnDrop(task.abort_handle());
    Source {
        rx,
        task,
        _abort: abort,
    }
}

impl Source {
    async fn wait(&mut self, what: &str, f: impl FnMut(&ManifestState) -> bool) -> ManifestState {
        let waited = tokio::time::timeout(WAIT, self.rx.wait_for(f))
            .await
            .map(|r| r.map(|state| state.clone()));
        match waited {
            Ok(Ok(state)) => state,
            Ok(Err(e)) => panic!("channel closed waiting for {what}: {e}"),
            Err(_) => panic!("timed out waiting for {what}: {:#?}", *self.rx.borrow()),
        }
    }

    fn now(&self) -> ManifestState {
        self.rx.borrow().clone()
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn keys<K: ToString + Ord + Clone, V: Clone>(map: &imbl::OrdMap<K, V>) -> Vec<String> {
    map.keys().map(ToString::to_string).collect()
}

/// `pod address` of each endpoint of the TCP service port `ip:port`.
fn endpoints(model: &Model, ip: [u8; 4], port: u16) -> Vec<String> {
    let (svc, sp) = model
        .service_for(Ipv4Addr::from(ip).into(), port)
        .unwrap_or_else(|| panic!("a service at {ip:?}:{port}"));
    model
        .endpoints(svc, sp, &HashMap::new(), IpFamily::V4)
        .iter()
        .map(|e| format!("{} {}", e.pod, e.addr))
        .collect()
}

/// The fixture lists rewritten as manifests (`kind: List`, items with apiVersion and kind),
/// for the manifest source to load.
fn fixtures_as_manifests(dir: &Path) {
    for (file, api_version, kind) in [
        ("namespaces-list.json", "v1", "Namespace"),
        ("pods-list.json", "v1", "Pod"),
        ("services-list.json", "v1", "Service"),
        (
            "endpointslices-list.json",
            "discovery.k8s.io/v1",
            "EndpointSlice",
        ),
    ] {
        let list: serde_json::Value = serde_json::from_str(&fixture(file)).unwrap();
        let items: Vec<serde_json::Value> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                let mut item = item.clone();
                item["apiVersion"] = api_version.into();
                item["kind"] = kind.into();
                item
            })
            .collect();
        let manifest = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        std::fs::write(dir.join(file), manifest.to_string()).unwrap();
    }
}

#[tokio::test]
async fn initial_lists_make_generation_one() {
    let (mock, addr) = start_mock(|_| {}).await;
    let mut source = start_source(addr);
    let state = source.wait("the first model", |s| s.generation > 0).await;
    assert_eq!(state.generation, 1);
    assert_eq!(state.last_error, None);

    let m = &*state.model;
    assert_eq!(
        keys(&m.namespaces),
        ["default", "demo", "kube-system", "legacy"]
    );
    assert_eq!(
        keys(&m.pods),
        ["demo/client", "demo/server-v1", "legacy/outsider"]
    );
    assert_eq!(
        keys(&m.services),
        ["default/kubernetes", "demo/echo", "kube-system/kube-dns"]
    );

    // Enrollment through the model, from the namespace label.
    let client = m.enrollment(&PodKey::new("demo", "client")).unwrap();
    assert!(client.enrolled, "{}", client.reason);
    assert_eq!(
        client.reason,
        "namespace demo label istio.io/dataplane-mode=ambient"
    );
    let outsider = m.enrollment(&PodKey::new("legacy", "outsider")).unwrap();
    assert!(!outsider.enrolled, "{}", outsider.reason);

    let server = m.pod(&PodKey::new("demo", "server-v1")).unwrap();
    assert_eq!(server.ip, Some(Ipv4Addr::new(10, 244, 0, 11)));
    assert_eq!(server.service_account, "echo");
    assert_eq!(server.container_port("tcp-echo"), Some(9000));

    // Endpoints come from the slices: the pod on node-b too, not the unready one.
    assert_eq!(
        endpoints(m, [10, 96, 120, 7], 80),
        [
            "demo/server-v1 10.244.0.11:9000",
            "demo/server-v2 10.244.1.12:9000"
        ]
    );
    assert_eq!(
        endpoints(m, [10, 96, 0, 10], 53),
        ["kube-system/coredns-7db6d8ff4d-2xk9p 10.244.1.2:53"]
    );
    assert_eq!(
        endpoints(m, [10, 96, 0, 1], 443),
        ["default/172.18.0.2 172.18.0.2:6443"]
    );

    // The manifest source makes the same model of the same objects.
    let dir = tempfile::tempdir().unwrap();
    fixtures_as_manifests(dir.path());
    let from_manifests = manifests::load_dir(dir.path()).unwrap();
    assert_eq!(*m, from_manifests);

    // What was asked of the API server.
    until("the four watches", || {
        KINDS.iter().all(|k| mock.watches_opened(k) == 1)
    })
    .await;
    for (path, list_version) in [
        (NAMESPACES, "1000"),
        (PODS, "1001"),
        (SERVICES, "1002"),
        (SLICES, "1003"),
    ] {
        let lists = mock.lists(path);
        assert_eq!(lists.len(), 1, "{path}: {lists:?}");
        assert_eq!(lists[0].query.get("limit").map(String::as_str), Some("500"));
        let watch = &mock.watches(path)[0];
        assert_eq!(watch.query["allowWatchBookmarks"], "true", "{path}");
        assert_eq!(watch.query["resourceVersion"], list_version, "{path}");
        // Every node's pods: remote identities matter to SMI policy and subsets.
        for seen in [&lists[0], watch] {
            assert_eq!(seen.query.get("fieldSelector"), None, "{path}: {seen:?}");
        }
    }
}

#[tokio::test]
async fn watch_events_make_new_generations() {
    let (mock, addr) = start_mock(|_| {}).await;
    let mut source = start_source(addr);
    source.wait("the first model", |s| s.generation > 0).await;
    until("the pods watch", || mock.watches_opened(PODS) == 1).await;

    let pod_events = events("pods-watch.jsonl");
    let v3 = PodKey::new("demo", "server-v3");
    mock.send(PODS, &pod_events[0]);
    let added = source
        .wait("the ADDED pod", |s| s.model.pods.contains_key(&v3))
        .await;
    assert_eq!(added.generation, 2);
    assert!(added.model.enrollment(&v3).unwrap().enrolled);
    assert_eq!(
        added.model.pods[&v3].ip,
        Some(Ipv4Addr::new(10, 244, 0, 12))
    );

    // A pod the model cannot hold (a podIP that is no address) is left out, a bookmark changes nothing,
    // a DELETED pod goes.
    for line in &pod_events[1..] {
        mock.send(PODS, line);
    }
    let outsider = PodKey::new("legacy", "outsider");
    let deleted = source
        .wait("the DELETED pod", |s| !s.model.pods.contains_key(&outsider))
        .await;
    assert_eq!(deleted.generation, 3);
    assert_eq!(deleted.last_error, None);
    assert_eq!(
        keys(&deleted.model.pods),
        ["demo/client", "demo/server-v1", "demo/server-v3"]
    );

    // A MODIFIED EndpointSlice: server-v3 joins, the canary became ready.
    until("the slices watch", || mock.watches_opened(SLICES) == 1).await;
    mock.send(SLICES, &events("endpointslices-watch.jsonl")[0]);
    let modified = source
        .wait("the MODIFIED slice", |s| s.generation == 4)
        .await;
    assert_eq!(
        endpoints(&modified.model, [10, 96, 120, 7], 80),
        [
            "demo/server-v1 10.244.0.11:9000",
            "demo/server-v2 10.244.1.12:9000",
            "demo/server-v2-canary 10.244.1.13:9000",
            "demo/server-v3 10.244.0.12:9000",
        ]
    );
    // Nothing was listed twice.
    for path in KINDS {
        assert_eq!(mock.lists(path).len(), 1, "{path}");
    }
}

#[tokio::test]
async fn gone_410_relists() {
    let (mock, addr) = start_mock(|_| {}).await;
    let mut source = start_source(addr);
    let first = source.wait("the first model", |s| s.generation > 0).await;
    until("the services watch", || mock.watches_opened(SERVICES) == 1).await;

    // While the watch was away, demo/echo was deleted and demo/echo-canary created; the
    // server says the agent's resource version is too old.
    mock.set_list(SERVICES, fixture("services-list-after-gone.json"));
    mock.send(SERVICES, &events("services-watch-gone.jsonl")[0]);

    let failed = source
        .wait("the 410 error", |s| s.last_error.is_some())
        .await;
    let error = failed.last_error.unwrap();
    assert!(error.starts_with("watch services: "), "{error}");
    assert!(error.contains("too old resource version"), "{error}");
    assert_eq!(failed.generation, 1, "the last model stays in force");
    assert!(Arc::ptr_eq(&failed.model, &first.model));

    let relisted = source
        .wait("the re-listed model", |s| s.generation > 1)
        .await;
    assert_eq!(
        relisted.generation, 2,
        "the re-list lands as one generation"
    );
    assert_eq!(relisted.last_error, None);
    assert_eq!(
        keys(&relisted.model.services),
        [
            "default/kubernetes",
            "demo/echo-canary",
            "kube-system/kube-dns"
        ]
    );
    // The new service has no slice yet: no endpoints, not its selector's local pods.
    let canary = ServiceKey::new("demo", "echo-canary");
    assert_eq!(relisted.model.endpoint_slices[&canary], []);
    assert!(!relisted
        .model
        .endpoint_slices
        .contains_key(&ServiceKey::new("demo", "echo")));
    // Everything else is as it was.
    assert_eq!(relisted.model.pods, first.model.pods);
    assert_eq!(relisted.model.namespaces, first.model.namespaces);

    assert_eq!(mock.lists(SERVICES).len(), 2);
    until("the services watch again", || {
        mock.watches_opened(SERVICES) == 2
    })
    .await;
    assert_eq!(mock.watches(SERVICES)[1].query["resourceVersion"], "2000");
    for path in [NAMESPACES, PODS, SLICES] {
        assert_eq!(mock.lists(path).len(), 1, "{path}");
    }
}

#[tokio::test]
async fn dropped_watch_resumes_from_the_last_bookmark() {
    let (mock, addr) = start_mock(|_| {}).await;
    let mut source = start_source(addr);
    source.wait("the first model", |s| s.generation > 0).await;
    until("the pods watch", || mock.watches_opened(PODS) == 1).await;

    // A bookmark, then the server ends the response (as at its watch timeout).
    mock.send(PODS, &events("pods-watch-bookmark.jsonl")[0]);
    mock.end_watch(PODS);
    until("the pods watch to reopen", || {
        mock.watches_opened(PODS) == 2
    })
    .await;
    let resumed = &mock.watches(PODS)[1];
    assert_eq!(resumed.query["resourceVersion"], "1500", "{resumed:?}");
    assert_eq!(mock.lists(PODS).len(), 1, "no re-list");
    assert_eq!(source.now().last_error, None);

    // Events on the new watch arrive.
    let v3 = PodKey::new("demo", "server-v3");
    mock.send(PODS, &events("pods-watch.jsonl")[0]);
    let added = source
        .wait("the pod on the resumed watch", |s| {
            s.model.pods.contains_key(&v3)
        })
        .await;
    assert_eq!(added.generation, 2);

    // The connection breaks mid-response: an error until the watch is back.
    mock.break_watch(PODS);
    let failed = source
        .wait("the broken watch", |s| s.last_error.is_some())
        .await;
    let error = failed.last_error.unwrap();
    assert!(error.starts_with("watch pods: "), "{error}");
    assert_eq!(failed.generation, 2);
    let recovered = source
        .wait("the recovery", |s| s.last_error.is_none())
        .await;
    assert_eq!(recovered.generation, 2);
    assert!(mock.watches_opened(PODS) >= 3);
    // Resumed from the last event seen, still without a re-list.
    assert_eq!(mock.watches(PODS)[2].query["resourceVersion"], "1101");
    assert_eq!(mock.lists(PODS).len(), 1);
}

#[tokio::test]
async fn ready_only_after_all_four_lists() {
    let (open_slices, gate) = watch::channel(false);
    let (mock, addr) = start_mock(|mock| mock.with(SLICES, |c| c.gate = Some(gate))).await;
    let source = start_source(addr);

    until("the other lists and watches", || {
        [NAMESPACES, PODS, SERVICES]
            .iter()
            .all(|k| mock.watches_opened(k) == 1)
            && mock.lists(SLICES).len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = source.now();
    assert_eq!(
        waiting.generation, 0,
        "not ready without the EndpointSlices"
    );
    assert_eq!(*waiting.model, Model::default());
    assert_eq!(waiting.last_error, None);

    open_slices.send(true).unwrap();
    let mut source = source;
    let ready = source.wait("readiness", |s| s.generation > 0).await;
    assert_eq!(ready.generation, 1);
    assert_eq!(ready.model.pods.len(), 3);
    assert_eq!(
        endpoints(&ready.model, [10, 96, 120, 7], 80).len(),
        2,
        "{:?}",
        ready.model.endpoint_slices
    );
}

#[tokio::test]
async fn failing_list_is_reported_until_it_recovers() {
    let (mock, addr) = start_mock(|mock| {
        mock.with(NAMESPACES, |c| {
            c.list_failures
                .push_back((StatusCode::FORBIDDEN, fixture("namespaces-forbidden.json")));
        })
    })
    .await;
    let mut source = start_source(addr);
    let failed = source
        .wait("the list error", |s| s.last_error.is_some())
        .await;
    let error = failed.last_error.unwrap();
    assert!(
        error.starts_with("watch namespaces: failed to perform initial object list: "),
        "{error}"
    );
    assert!(error.contains("namespaces is forbidden"), "{error}");
    assert_eq!(failed.generation, 0);

    // Retried after the watcher's backoff.
    let ready = source.wait("readiness", |s| s.generation > 0).await;
    assert_eq!(ready.generation, 1);
    assert_eq!(ready.last_error, None);
    assert_eq!(ready.model.namespaces.len(), 4);
    assert_eq!(mock.lists(NAMESPACES).len(), 2);
}

#[tokio::test]
async fn no_node_name_is_an_error() {
    let (tx, _rx) = watch::channel(ManifestState::default());
    let client = client("127.0.0.1:9".parse().unwrap());
    let result = kube_source::run(client, KubeSourceConfig::default(), tx).await;
    assert!(
        matches!(result, Err(KubeSourceError::NoNodeName)),
        "{result:?}"
    );
}

#[tokio::test]
async fn stops_when_nobody_listens() {
    let (_mock, addr) = start_mock(|_| {}).await;
    let mut source = start_source(addr);
    source.wait("the first model", |s| s.generation > 0).await;
    let Source { rx, task, .. } = source;
    drop(rx);
    let result = tokio::time::timeout(WAIT, task)
        .await
        .expect("the source stops")
        .expect("no panic");
    assert!(result.is_ok(), "{result:?}");
}

/// `client_from_env` goes through `kube::Config::infer`; this builds the same kind of client
/// from a kubeconfig with an https server, which needs the rustls (ring) connector that the
/// features chosen in Cargo.toml provide. No TLS handshake happens here (no server).
#[tokio::test]
async fn https_kubeconfig_builds_a_client() {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(
        "\
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: not-a-real-token}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
",
    )
    .unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).expect("an https client");
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::all(client);
    let err = pods
        .list(&Default::default())
        .await
        .expect_err("nothing listens on port 1");
    assert!(
        err.to_string().contains("(Connect)"),
        "a connection error, not a TLS setup error: {err}"
    );
}

const VIRTUAL_SERVICES: &str = "/apis/networking.istio.io/v1beta1/virtualservices";
const DESTINATION_RULES: &str = "/apis/networking.istio.io/v1beta1/destinationrules";
const TRAFFIC_TARGETS: &str = "/apis/access.smi-spec.io/v1alpha3/traffictargets";
const TCP_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1alpha2/tcproutes";

fn list_body(api_version: &str, kind: &str, version: &str, items: &str) -> String {
    format!(
        r#"{{"apiVersion":"{api_version}","kind":"{kind}List","metadata":{{"resourceVersion":"{version}"}},"items":[{items}]}}"#
    )
}

#[tokio::test]
async fn routing_crds_are_listed_watched_and_may_be_missing_or_forbidden() {
    let (mock, addr) = start_mock(|mock| {
        let mut all = mock.collections.lock().unwrap();
        all.insert(
            VIRTUAL_SERVICES,
            Collection {
                list: list_body(
                    "networking.istio.io/v1beta1",
                    "VirtualService",
                    "2000",
                    r#"{"apiVersion":"networking.istio.io/v1beta1","kind":"VirtualService",
                        "metadata":{"name":"echo","namespace":"demo","resourceVersion":"1990",
                                    "creationTimestamp":"2026-11-20T10:00:00Z"},
                        "spec":{"hosts":["echo"],"tcp":[{"match":[{"port":80}],
                                "route":[{"destination":{"host":"echo","subset":"v1"},"weight":100}]}]}}"#,
                ),
                ..Collection::default()
            },
        );
        all.insert(
            DESTINATION_RULES,
            Collection {
                list: list_body(
                    "networking.istio.io/v1beta1",
                    "DestinationRule",
                    "2001",
                    r#"{"apiVersion":"networking.istio.io/v1beta1","kind":"DestinationRule",
                        "metadata":{"name":"echo","namespace":"demo","resourceVersion":"1991"},
                        "spec":{"host":"echo","subsets":[{"name":"v1","labels":{"version":"v1"}}]}}"#,
                ),
                ..Collection::default()
            },
        );
        let forbidden = status_body(
            403,
            "Forbidden",
            "traffictargets.access.smi-spec.io is forbidden: User \"system:serviceaccount:interceptor:interceptor\" cannot list resource",
        );
        all.insert(
            TRAFFIC_TARGETS,
            Collection {
                list_failures: (0..1000).map(|_| (StatusCode::FORBIDDEN, forbidden.clone())).collect(),
                ..Collection::default()
            },
        );
        all.insert(
            TCP_ROUTES,
            Collection {
                list: list_body("gateway.networking.k8s.io/v1alpha2", "TCPRoute", "2002", ""),
                ..Collection::default()
            },
        );
    })
    .await;
    let mut source = start_source(addr);
    let state = source.wait("the first model", |s| s.generation > 0).await;
    let routing = &state.model.routing;
    let vs = &routing.virtual_services["demo/echo"];
    assert_eq!(vs.spec.hosts, ["echo"]);
    assert_eq!(
        vs.spec.tcp[0].route[0].destination.subset.as_deref(),
        Some("v1")
    );
    assert_eq!(vs.created.as_deref(), Some("2026-11-20 10:00:00 UTC"));
    assert_eq!(
        routing.destination_rules["demo/echo"].spec.subsets[0].name,
        "v1"
    );
    assert!(
        routing.traffic_splits.is_empty(),
        "a missing CRD is an empty kind"
    );
    let error = state.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("traffictargets.access.smi-spec.io") && error.contains("forbidden"),
        "{error}"
    );
    // The same objects from a directory give the same routing objects.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routing.yaml"),
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n\
         metadata: {name: echo, namespace: demo, creationTimestamp: \"2026-11-20T10:00:00Z\"}\n\
         spec: {hosts: [echo], tcp: [{match: [{port: 80}], route: [{destination: {host: echo, subset: v1}, weight: 100}]}]}\n",
    )
    .unwrap();
    let from_manifests = manifests::load_dir(dir.path()).unwrap();
    assert_eq!(
        from_manifests.routing.virtual_services["demo/echo"].spec,
        vs.spec
    );

    // A TCPRoute arrives by watch: a new generation holds it.
    until("the tcproutes watch", || {
        mock.watches_opened(TCP_ROUTES) == 1
    })
    .await;
    let generation = state.generation;
    mock.send(
        TCP_ROUTES,
        r#"{"type":"ADDED","object":{"apiVersion":"gateway.networking.k8s.io/v1alpha2","kind":"TCPRoute",
            "metadata":{"name":"gamma","namespace":"demo","resourceVersion":"2003"},
            "spec":{"parentRefs":[{"group":"","kind":"Service","name":"echo"}],
                    "rules":[{"backendRefs":[{"name":"echo","port":80}]}]}}}"#
            .replace('\n', " ")
            .as_str(),
    );
    let state = source
        .wait("the TCPRoute", |s| {
            s.generation > generation && !s.model.routing.tcp_routes.is_empty()
        })
        .await;
    assert!(state.model.routing.tcp_routes["demo/gamma"]
        .spec
        .parent_refs[0]
        .is_service());
}

const UPSTREAM_TRAFFIC_SETTINGS: &str = "/apis/policy.flomesh.io/v1alpha1/upstreamtrafficsettings";

#[tokio::test]
async fn an_upstream_setting_update_that_does_not_parse_keeps_the_previous_version() {
    let (mock, addr) = start_mock(|mock| {
        let mut all = mock.collections.lock().unwrap();
        all.insert(
            UPSTREAM_TRAFFIC_SETTINGS,
            Collection {
                list: list_body(
                    "policy.flomesh.io/v1alpha1",
                    "UpstreamTrafficSetting",
                    "3000",
                    r#"{"apiVersion":"policy.flomesh.io/v1alpha1","kind":"UpstreamTrafficSetting",
                        "metadata":{"name":"fortio","namespace":"demo","resourceVersion":"2990"},
                        "spec":{"host":"fortio.demo.svc.cluster.local",
                                "connectionSettings":{"tcp":{"maxConnections":50}}}}"#,
                ),
                ..Collection::default()
            },
        );
    })
    .await;
    let mut source = start_source(addr);
    let state = source.wait("the first model", |s| s.generation > 0).await;
    let limit = |state: &ManifestState| {
        state.model.routing.upstream_traffic_settings["demo/fortio"]
            .spec
            .connection_settings
            .as_ref()
            .and_then(|c| c.tcp.as_ref())
            .and_then(|t| t.max_connections)
    };
    assert_eq!(limit(&state), Some(50));
    until("the upstreamtrafficsettings watch", || {
        mock.watches_opened(UPSTREAM_TRAFFIC_SETTINGS) == 1
    })
    .await;
    // A string where a number belongs: the object no longer parses. Then a valid update,
    // which must land (so the one before it was read, and kept out).
    let event = |version: &str, limit: &str| {
        format!(
            r#"{{"type":"MODIFIED","object":{{"apiVersion":"policy.flomesh.io/v1alpha1","kind":"UpstreamTrafficSetting","metadata":{{"name":"fortio","namespace":"demo","resourceVersion":"{version}"}},"spec":{{"host":"fortio.demo.svc.cluster.local","connectionSettings":{{"tcp":{{"maxConnections":{limit}}}}}}}}}}}"#
        )
    };
    mock.send(UPSTREAM_TRAFFIC_SETTINGS, &event("3001", "\"ten\""));
    mock.send(UPSTREAM_TRAFFIC_SETTINGS, &event("3002", "20"));
    let state = source
        .wait("the valid update", |s| limit(s) == Some(20))
        .await;
    assert_eq!(
        state.generation, 2,
        "the unparsable update changed nothing; the valid one made one generation"
    );
}

const MESH_CONFIGS: &str = "/apis/config.flomesh.io/v1alpha3/namespaces/fsm-system/meshconfigs";

/// The node's mesh config file in these tests: what a MeshConfig field set wins over.
const MESH_CONFIG_FILE: &str = "\
outboundIPRangeExclusionList: [10.0.0.0/8]
outboundPortExclusionList: [6379]
bpfDebug: true
";

fn with_mesh_config(mock: &Mock) {
    mock.collections.lock().unwrap().insert(
        MESH_CONFIGS,
        Collection {
            list: fixture("meshconfigs-list.json"),
            ..Collection::default()
        },
    );
}

/// The configuration the agent applies: the file laid under the source's MeshConfig, as
/// the daemon merges them.
fn merged(source: &Source) -> (watch::Receiver<ConfigState>, AbortOnDrop) {
    let loaded = config::parse(Path::new("mesh.yaml"), MESH_CONFIG_FILE).unwrap();
    let (file_tx, file_rx) = watch::channel(ConfigState {
        config: Arc::new(loaded.config),
        generation: 1,
        warnings: loaded.warnings,
        last_error: None,
    });
    let (tx, rx) = watch::channel(ConfigState::default());
    let task = config::follow_merged(
        Some(file_rx),
        source.rx.clone(),
        |state: &ManifestState| state.mesh_config.clone(),
        tx,
    );
    // The file's channel must outlive the test: its sender going away ends the merger.
    let abort = AbortOnDrop(
        tokio::spawn(async move {
            let _file = file_tx;
            let _ = task.await;
        })
        .abort_handle(),
    );
    (rx, abort)
}

async fn wait_config(
    rx: &mut watch::Receiver<ConfigState>,
    what: &str,
    f: impl FnMut(&ConfigState) -> bool,
) -> ConfigState {
    let waited = tokio::time::timeout(WAIT, rx.wait_for(f))
        .await
        .map(|r| r.map(|state| state.clone()));
    match waited {
        Ok(Ok(state)) => state,
        Ok(Err(e)) => panic!("channel closed waiting for {what}: {e}"),
        Err(_) => panic!("timed out waiting for {what}: {:#?}", *rx.borrow()),
    }
}

fn nets(config: &config::MeshConfig) -> Vec<String> {
    config
        .outbound_ip_range_exclusion_list
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[tokio::test]
async fn mesh_config_follows_the_fsm_docs_kubectl_patches() {
    let (mock, addr) = start_mock(with_mesh_config).await;
    let mut source = start_source_with(addr, Some(MeshConfigName::default()));
    let state = source.wait("the first model", |s| s.generation > 0).await;
    assert!(
        matches!(&state.mesh_config, MeshConfigObject::Present { name, .. } if name == "fsm-system/fsm-mesh-config"),
        "{:?}",
        state.mesh_config
    );
    assert_eq!(state.last_error, None);
    // One object, by name, in FSM's namespace.
    let lists = mock.lists(MESH_CONFIGS);
    assert_eq!(
        lists[0].query.get("fieldSelector").map(String::as_str),
        Some("metadata.name=fsm-mesh-config")
    );

    let (mut rx, _merger) = merged(&source);
    let first = wait_config(&mut rx, "the merged config", |s| s.generation > 0).await;
    // FSM's preset sets every list (empty) and permissive mode: they win over the file;
    // bpfDebug is the file's alone.
    assert_eq!(nets(&first.config), Vec::<String>::new());
    assert!(first.config.outbound_port_exclusion_list.is_empty());
    assert!(first.config.bpf_debug);
    assert!(first.config.permissive());

    until("the meshconfigs watch", || {
        mock.watches_opened(MESH_CONFIGS) == 1
    })
    .await;
    assert_eq!(
        mock.watches(MESH_CONFIGS)[0]
            .query
            .get("fieldSelector")
            .map(String::as_str),
        Some("metadata.name=fsm-mesh-config")
    );
    for line in events("meshconfigs-watch-exclusions.jsonl") {
        mock.send(MESH_CONFIGS, &line);
    }
    let patched = wait_config(&mut rx, "the patched exclusions", |s| {
        !s.config.outbound_ip_range_exclusion_list.is_empty()
    })
    .await;
    assert_eq!(nets(&patched.config), ["1.1.1.1/32", "2.2.2.0/24"]);
    assert!(
        patched
            .warnings
            .iter()
            .any(|w| w.contains("MeshConfig fsm-system/fsm-mesh-config")
                && w.contains("host bits")),
        "{:?}",
        patched.warnings
    );
    assert!(patched.config.permissive());
    assert!(patched.generation > first.generation);

    for line in events("meshconfigs-watch-smi-mode.jsonl") {
        mock.send(MESH_CONFIGS, &line);
    }
    let smi = wait_config(&mut rx, "SMI mode", |s| !s.config.permissive()).await;
    assert_eq!(nets(&smi.config), ["1.1.1.1/32", "2.2.2.0/24"]);
    assert!(smi.config.bpf_debug);
    // Not the model: its generation did not move.
    assert_eq!(source.now().generation, state.generation);
}

#[tokio::test]
async fn an_invalid_mesh_config_update_keeps_the_previous_version() {
    let (mock, addr) = start_mock(with_mesh_config).await;
    let mut source = start_source_with(addr, Some(MeshConfigName::default()));
    source.wait("the first model", |s| s.generation > 0).await;
    let (mut rx, _merger) = merged(&source);
    until("the meshconfigs watch", || {
        mock.watches_opened(MESH_CONFIGS) == 1
    })
    .await;
    for line in events("meshconfigs-watch-exclusions.jsonl") {
        mock.send(MESH_CONFIGS, &line);
    }
    let good = wait_config(&mut rx, "the patched exclusions", |s| {
        !s.config.outbound_ip_range_exclusion_list.is_empty()
    })
    .await;

    for line in events("meshconfigs-watch-invalid-cidr.jsonl") {
        mock.send(MESH_CONFIGS, &line);
    }
    let state = source
        .wait("the rejection", |s| s.last_error.is_some())
        .await;
    let error = state.last_error.unwrap();
    assert!(
        error.contains("MeshConfig fsm-system/fsm-mesh-config rejected")
            && error.contains("its previous version stays")
            && error.contains("outboundIPRangeExclusionList[0]: \"1.1.1.1/33\""),
        "{error}"
    );
    assert_eq!(
        *rx.borrow().config,
        *good.config,
        "the previous version stays"
    );
    assert_eq!(rx.borrow().generation, good.generation);

    // Fixed: in force, and the error is gone.
    for line in events("meshconfigs-watch-smi-mode.jsonl") {
        mock.send(MESH_CONFIGS, &line);
    }
    source
        .wait("the error cleared", |s| s.last_error.is_none())
        .await;
    wait_config(&mut rx, "SMI mode", |s| !s.config.permissive()).await;
}

#[tokio::test]
async fn without_the_mesh_config_crd_the_file_alone_applies() {
    // The mock has no MeshConfig collection: 404, as a cluster without FSM answers.
    let (mock, addr) = start_mock(|_| {}).await;
    let mut source = start_source_with(addr, Some(MeshConfigName::default()));
    let state = source.wait("the first model", |s| s.generation > 0).await;
    assert_eq!(state.mesh_config, MeshConfigObject::Absent);
    assert_eq!(state.last_error, None);
    let (mut rx, _merger) = merged(&source);
    let merged = wait_config(&mut rx, "the merged config", |s| s.generation > 0).await;
    let file = config::parse(Path::new("mesh.yaml"), MESH_CONFIG_FILE).unwrap();
    assert_eq!(*merged.config, file.config);
    assert_eq!(nets(&merged.config), ["10.0.0.0/8"]);
    drop(mock);
}

#[tokio::test]
async fn a_forbidden_mesh_config_is_reported_without_holding_the_model_back() {
    let forbidden = status_body(
        403,
        "Forbidden",
        "meshconfigs.config.flomesh.io is forbidden: User \"system:serviceaccount:interceptor:interceptor\" cannot list resource \"meshconfigs\" in API group \"config.flomesh.io\" in the namespace \"fsm-system\"",
    );
    let (_mock, addr) = start_mock(|mock| {
        mock.collections.lock().unwrap().insert(
            MESH_CONFIGS,
            Collection {
                list_failures: (0..1000)
                    .map(|_| (StatusCode::FORBIDDEN, forbidden.clone()))
                    .collect(),
                ..Collection::default()
            },
        );
    })
    .await;
    let mut source = start_source_with(addr, Some(MeshConfigName::default()));
    let state = source.wait("the first model", |s| s.generation > 0).await;
    let error = state.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("meshconfigs.config.flomesh.io") && error.contains("forbidden"),
        "{error}"
    );
    assert_eq!(state.mesh_config, MeshConfigObject::Absent);
    let (mut rx, _merger) = merged(&source);
    let merged = wait_config(&mut rx, "the merged config", |s| s.generation > 0).await;
    assert_eq!(nets(&merged.config), ["10.0.0.0/8"]);
}

const EGRESSES: &str = "/apis/policy.flomesh.io/v1alpha1/egresses";

/// An Egress of FSM's egress policy demo, opening `range` on port 80 to ServiceAccount
/// demo/default (the fixture's `demo/client`).
fn egress_object(version: &str, range: &str) -> String {
    format!(
        r#"{{"apiVersion":"policy.flomesh.io/v1alpha1","kind":"Egress",
            "metadata":{{"name":"httpbin-80","namespace":"demo","resourceVersion":"{version}"}},
            "spec":{{"sources":[{{"kind":"ServiceAccount","name":"default","namespace":"demo"}}],
                    "ipAddresses":["{range}"],"ports":[{{"number":80,"protocol":"tcp"}}]}}}}"#
    )
    .replace('\n', " ")
}

#[tokio::test]
async fn egress_policies_follow_the_api_server_and_a_bad_cidr_keeps_the_previous_version() {
    use interceptor::proxy::routes::{ConnectionSource, LastValid, RouteTable, Target};
    let (mock, addr) = start_mock(|mock| {
        mock.collections.lock().unwrap().insert(
            EGRESSES,
            Collection {
                list: list_body(
                    "policy.flomesh.io/v1alpha1",
                    "Egress",
                    "4000",
                    &egress_object("3990", "192.0.2.0/24"),
                ),
                ..Collection::default()
            },
        );
    })
    .await;
    let mut source = start_source(addr);
    let state = source.wait("the first model", |s| s.generation > 0).await;
    let client: PodKey = "demo/client".parse().unwrap();
    let mut memory = LastValid::default();
    // The route table the agent would build from each model, with egress off.
    let mut verdict = |state: &ManifestState, dst: &str| {
        let mut table = RouteTable::build(
            &state.model,
            &std::collections::HashMap::new(),
            std::collections::HashSet::new(),
            true,
            &mut memory,
        );
        table.set_egress(&state.model, false);
        let target = table.resolve(
            dst.parse().unwrap(),
            ConnectionSource {
                pod: Some(&client),
                gateway: None,
                sni: None,
            },
        );
        let status = table
            .statuses()
            .iter()
            .find(|s| s.kind == "Egress")
            .cloned();
        (target, status)
    };
    let (target, status) = verdict(&state, "192.0.2.7:80");
    let status = status.expect("the Egress has a status");
    assert!(
        matches!(&target, Target::Passthrough { route: Some(r), .. } if r == "Egress demo/httpbin-80"),
        "{target:?}"
    );
    assert!(status.accepted && status.reasons.is_empty(), "{status:?}");

    until("the egresses watch", || mock.watches_opened(EGRESSES) == 1).await;
    // A new range, live.
    let modified = |version: &str, range: &str| {
        format!(
            r#"{{"type":"MODIFIED","object":{}}}"#,
            egress_object(version, range)
        )
    };
    mock.send(EGRESSES, &modified("4001", "198.51.100.0/24"));
    let has_range = |range: &'static str| {
        move |s: &ManifestState| {
            s.model
                .routing
                .egresses
                .get("demo/httpbin-80")
                .is_some_and(|e| e.spec.ip_addresses == [range])
        }
    };
    let state = source
        .wait("the new range", has_range("198.51.100.0/24"))
        .await;
    assert!(matches!(
        verdict(&state, "192.0.2.7:80").0,
        Target::Refused { .. }
    ));
    assert!(matches!(
        verdict(&state, "198.51.100.9:80").0,
        Target::Passthrough { route: Some(_), .. }
    ));

    // A range that is not a CIDR: rejected with its reason, the last valid one stays.
    mock.send(EGRESSES, &modified("4002", "198.51.100.0/33"));
    let state = source
        .wait("the bad range", has_range("198.51.100.0/33"))
        .await;
    let (target, status) = verdict(&state, "198.51.100.9:80");
    let status = status.expect("the Egress has a status");
    assert!(
        matches!(target, Target::Passthrough { route: Some(_), .. }),
        "{target:?}"
    );
    assert!(
        status
            .reasons
            .iter()
            .any(|r| r.contains("ipAddresses[0]: \"198.51.100.0/33\" is not a CIDR")),
        "{status:?}"
    );
    assert!(
        status
            .reasons
            .iter()
            .any(|r| r.contains("the previous valid version stays in force")),
        "{status:?}"
    );

    // Deleted: egress off refuses again.
    mock.send(
        EGRESSES,
        &format!(
            r#"{{"type":"DELETED","object":{}}}"#,
            egress_object("4003", "198.51.100.0/33")
        ),
    );
    let state = source
        .wait("the deletion", |s| s.model.routing.egresses.is_empty())
        .await;
    let (target, status) = verdict(&state, "198.51.100.9:80");
    assert!(matches!(target, Target::Refused { .. }), "{target:?}");
    assert_eq!(status, None);
}
