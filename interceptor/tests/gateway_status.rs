//! The gateway's route status in a cluster: what `StatusWriter` sends a (mock) API server
//! for the TCPRoutes and UDPRoutes judged at a gateway, and that an unchanged judgement is
//! not sent again.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::Router;
use interceptor::gateway::{StatusWriter, CONTROLLER_NAME};
use interceptor::proxy::routes::LastValid;
use interceptor::proxy::GatewayTable;
use interceptor::source::manifests::load_str;

#[derive(Debug, Clone)]
struct Request {
    method: Method,
    path_and_query: String,
    content_type: String,
    body: serde_json::Value,
}

type Seen = Arc<Mutex<Vec<Request>>>;

async fn record(
    State(seen): State<Seen>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::Json<serde_json::Value> {
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    seen.lock().unwrap().push(Request {
        method,
        path_and_query: uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        body: body.clone(),
    });
    // An API server answers a status patch with the object.
    axum::Json(body)
}

async fn mock() -> (Seen, SocketAddr) {
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(record).with_state(Arc::clone(&seen));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (seen, addr)
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: httpbin}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata: {name: simple-fsm-gateway, namespace: httpbin}
spec:
  gatewayClassName: fsm-gateway-cls
  listeners:
  - {protocol: TCP, port: 8000, name: foo, allowedRoutes: {namespaces: {from: Same}}}
  - {protocol: UDP, port: 8000, name: udp}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: tcp-route-sample, namespace: httpbin}
spec:
  parentRefs: [{name: simple-fsm-gateway, port: 8000}]
  rules: [{backendRefs: [{name: httpbin, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: to-nowhere, namespace: httpbin}
spec:
  parentRefs: [{name: simple-fsm-gateway, port: 8000}]
  rules: [{backendRefs: [{name: ghost, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: UDPRoute
metadata: {name: udp-on-tcp, namespace: httpbin}
spec:
  parentRefs: [{name: simple-fsm-gateway, sectionName: foo}]
  rules: [{backendRefs: [{name: httpbin, port: 8080}]}]
"#;

#[tokio::test]
async fn route_conditions_are_applied_to_the_status_subresource_once() {
    let (seen, addr) = mock().await;
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let mut writer = StatusWriter::new(kube::Client::try_from(config).unwrap());
    let model = load_str(Path::new("gw.yaml"), OBJECTS).unwrap();
    let table = GatewayTable::build(
        &model,
        "httpbin/simple-fsm-gateway",
        None,
        &mut LastValid::default(),
    );
    writer
        .write("httpbin/simple-fsm-gateway", table.statuses())
        .await;

    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    let sample = requests
        .iter()
        .find(|r| {
            r.path_and_query
                .contains("/tcproutes/tcp-route-sample/status")
        })
        .expect("a patch of tcp-route-sample");
    assert_eq!(sample.method, Method::PATCH);
    assert!(
        sample.path_and_query.starts_with(
            "/apis/gateway.networking.k8s.io/v1alpha2/namespaces/httpbin/tcproutes/tcp-route-sample/status?"
        ),
        "{}",
        sample.path_and_query
    );
    assert!(
        sample
            .path_and_query
            .contains("fieldManager=interceptor-gateway"),
        "{}",
        sample.path_and_query
    );
    assert!(
        sample.path_and_query.contains("force=true"),
        "{}",
        sample.path_and_query
    );
    assert_eq!(sample.content_type, "application/apply-patch+yaml");
    let parent = &sample.body["status"]["parents"][0];
    assert_eq!(parent["controllerName"], CONTROLLER_NAME);
    assert_eq!(parent["parentRef"]["name"], "simple-fsm-gateway");
    assert_eq!(parent["parentRef"]["namespace"], "httpbin");
    assert_eq!(parent["conditions"][0]["type"], "Accepted");
    assert_eq!(parent["conditions"][0]["status"], "True");
    assert!(parent["conditions"][0]["lastTransitionTime"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z') && t.contains('T')));
    let nowhere = requests
        .iter()
        .find(|r| r.path_and_query.contains("/tcproutes/to-nowhere/status"))
        .expect("a patch of to-nowhere");
    let conditions = &nowhere.body["status"]["parents"][0]["conditions"];
    let resolved = conditions
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "ResolvedRefs")
        .expect("ResolvedRefs");
    assert_eq!(resolved["status"], "False");
    assert_eq!(resolved["reason"], "BackendNotFound");
    let udp = requests
        .iter()
        .find(|r| r.path_and_query.contains("/udproutes/udp-on-tcp/status"))
        .expect("a patch of the UDPRoute");
    assert_eq!(udp.body["kind"], "UDPRoute");
    let accepted = &udp.body["status"]["parents"][0]["conditions"][0];
    assert_eq!(accepted["reason"], "NotAllowedByListeners", "{accepted}");

    // The same judgement again: nothing new to write.
    writer
        .write("httpbin/simple-fsm-gateway", table.statuses())
        .await;
    assert_eq!(seen.lock().unwrap().len(), 3);
}
