//! `--on-exit auto`'s question against a mock API server (real HTTP on 127.0.0.1, bodies
//! shaped like the API server's): the DaemonSet there → keep (a rolling update); there
//! with a `deletionTimestamp` (foreground deletion) or 404 (background deletion, the
//! default) → uninstall; forbidden, failing, silent or unreachable → an error, which the
//! agent answers by keeping the data path.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use interceptor::daemonset::{self, DaemonSetCheckError, DaemonSetRef, DaemonSetState};

const PATH: &str = "/apis/apps/v1/namespaces/interceptor-system/daemonsets/interceptor-node";

/// What the mock answers at [`PATH`]: a status and a body, after a delay.
#[derive(Clone)]
struct Answer {
    status: StatusCode,
    body: String,
    delay: Duration,
}

#[derive(Default)]
struct Mock {
    answer: Mutex<Option<Answer>>,
    paths: Mutex<Vec<String>>,
}

async fn api(State(mock): State<Arc<Mock>>, uri: Uri) -> Response {
    mock.paths.lock().unwrap().push(uri.path().to_owned());
    let answer = mock.answer.lock().unwrap().clone();
    let answer = match answer {
        Some(answer) if uri.path() == PATH => answer,
        _ => Answer {
            status: StatusCode::NOT_FOUND,
            body: status_body(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
            delay: Duration::ZERO,
        },
    };
    tokio::time::sleep(answer.delay).await;
    Response::builder()
        .status(answer.status)
        .header("content-type", "application/json")
        .body(answer.body.into())
        .unwrap()
}

fn status_body(code: u16, reason: &str, message: &str) -> String {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
    .to_string()
}

fn daemonset_body(deletion_timestamp: Option<&str>) -> String {
    let mut metadata = serde_json::json!({
        "name": "interceptor-node", "namespace": "interceptor-system",
        "uid": "0b3c2d6e-5f7a-4c1e-9a8b-2d4e6f8a0c1e", "resourceVersion": "81234",
        "generation": 3, "creationTimestamp": "2026-12-01T10:00:00Z",
    });
    if let Some(ts) = deletion_timestamp {
        metadata["deletionTimestamp"] = ts.into();
        metadata["deletionGracePeriodSeconds"] = 0.into();
        metadata["finalizers"] = serde_json::json!(["foregroundDeletion"]);
    }
    serde_json::json!({
        "kind": "DaemonSet", "apiVersion": "apps/v1", "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": {"app": "interceptor-node"}},
            "template": {
                "metadata": {"labels": {"app": "interceptor-node"}},
                "spec": {"containers": [{"name": "agent", "image": "localhost/interceptor:0.1.0"}]}
            },
            "updateStrategy": {"type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
        },
        "status": {"currentNumberScheduled": 1, "desiredNumberScheduled": 1,
            "numberMisscheduled": 0, "numberReady": 1}
    })
    .to_string()
}

async fn start(answer: Answer) -> (Arc<Mock>, SocketAddr) {
    let mock = Arc::new(Mock::default());
    *mock.answer.lock().unwrap() = Some(answer);
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

fn ours() -> DaemonSetRef {
    DaemonSetRef {
        namespace: "interceptor-system".into(),
        name: "interceptor-node".into(),
    }
}

async fn check_with(answer: Answer) -> Result<DaemonSetState, DaemonSetCheckError> {
    let (mock, addr) = start(answer).await;
    let result = daemonset::check(client(addr), &ours(), Duration::from_secs(2)).await;
    assert_eq!(*mock.paths.lock().unwrap(), [PATH], "what the agent asked");
    result
}

fn ok(status: StatusCode, body: String) -> Answer {
    Answer {
        status,
        body,
        delay: Duration::ZERO,
    }
}

#[tokio::test]
async fn a_daemonset_that_is_there_is_a_rolling_update() {
    let state = check_with(ok(StatusCode::OK, daemonset_body(None)))
        .await
        .unwrap();
    assert_eq!(state, DaemonSetState::Present);
    assert!(!state.is_uninstall());
}

#[tokio::test]
async fn a_daemonset_being_deleted_is_an_uninstall() {
    let state = check_with(ok(
        StatusCode::OK,
        daemonset_body(Some("2026-12-06T05:30:00Z")),
    ))
    .await
    .unwrap();
    assert_eq!(state, DaemonSetState::Deleting);
    assert!(state.is_uninstall());
}

#[tokio::test]
async fn a_daemonset_that_is_gone_is_an_uninstall() {
    let body = status_body(
        404,
        "NotFound",
        "daemonsets.apps \"interceptor-node\" not found",
    );
    let state = check_with(ok(StatusCode::NOT_FOUND, body)).await.unwrap();
    assert_eq!(state, DaemonSetState::Gone);
    assert!(state.is_uninstall());
}

#[tokio::test]
async fn a_forbidden_or_failing_answer_is_an_error() {
    for (status, reason) in [
        (StatusCode::FORBIDDEN, "Forbidden"),
        (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
    ] {
        let body = status_body(status.as_u16(), reason, "no");
        let error = check_with(ok(status, body)).await.unwrap_err();
        let text = error.to_string();
        assert!(
            matches!(error, DaemonSetCheckError::Api { .. })
                && text.contains("interceptor-system/interceptor-node"),
            "{status}: {text}"
        );
    }
}

#[tokio::test]
async fn a_silent_api_server_is_a_timeout() {
    let (_mock, addr) = start(Answer {
        status: StatusCode::OK,
        body: daemonset_body(None),
        delay: Duration::from_secs(30),
    })
    .await;
    let started = std::time::Instant::now();
    let error = daemonset::check(client(addr), &ours(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(error, DaemonSetCheckError::Timeout { .. }),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn an_unreachable_api_server_is_an_error() {
    // A port nobody listens on: bound, then closed.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let error = daemonset::check(client(addr), &ours(), Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(error, DaemonSetCheckError::Api { .. }), "{error}");
}
