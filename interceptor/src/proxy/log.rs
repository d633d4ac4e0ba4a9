//! The recent connection records `/config_dump` shows, bounded, and the metrics every
//! record adds to as it is pushed; the opt-in access log (one JSON line per finished
//! connection); also the count of open connections a drain waits for.
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::connection::{ConnectionRecord, Direction, Outcome};
use super::metrics::ProxyMetrics;
use super::routes::Target;
use crate::sync::lock;

/// Connection records kept for `/config_dump`.
const LOG_CAPACITY: usize = 256;

/// Recent connection records, bounded, and the metrics every record adds to.
#[derive(Debug, Default)]
pub struct ConnectionLog {
    records: Mutex<VecDeque<ConnectionRecord>>,
    metrics: ProxyMetrics,
    /// Connections accepted and not yet done (what a drain waits for).
    open: AtomicUsize,
    /// `--access-log`: where each finished connection's JSON line goes.
    access_log: Option<AccessLog>,
}

/// The access log's writer: the agent's stdout (its tracing logs go to stderr), or a
/// buffer in tests. One `write_all` per line under the lock, so lines never interleave.
pub struct AccessLog(Mutex<Box<dyn Write + Send>>);

impl AccessLog {
    /// Lines on the process's stdout.
    pub fn stdout() -> Self {
        Self::to(Box::new(std::io::stdout()))
    }

    pub fn to(writer: Box<dyn Write + Send>) -> Self {
        Self(Mutex::new(writer))
    }

    fn write(&self, record: &ConnectionRecord) {
        let mut line = access_log_line(record).to_string();
        line.push('\n');
        let mut writer = lock(&self.0);
        if let Err(error) = writer
            .write_all(line.as_bytes())
            .and_then(|()| writer.flush())
        {
            tracing::debug!(%error, "writing an access log line");
        }
    }
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessLog")
    }
}

/// The access log line of one finished connection: who (the pod whose listener took it,
/// the source pod when that is an enrolled pod dialling out, the client address), where
/// to (what the application dialled, the address the proxy dialled and its pod, the
/// route and backend as the metrics label them), bytes each way, duration and outcome.
pub fn access_log_line(record: &ConnectionRecord) -> serde_json::Value {
    let (route, backend) = record.route_and_backend();
    let (outcome, error, error_kind) = match &record.outcome {
        Outcome::Failed(error) => (
            if error.is_refusal() {
                "refused"
            } else {
                "failed"
            },
            Some(error.to_string()),
            Some(error.kind()),
        ),
        other => (
            match other {
                Outcome::Open => "open",
                Outcome::Reset => "reset",
                _ => "closed",
            },
            None,
            None,
        ),
    };
    let destination_pod = match (&record.target, record.direction) {
        (Some(Target::Endpoint { pod, .. }), _) => Some(pod.as_str()),
        (_, Direction::Inbound) => Some(record.pod.as_str()),
        _ => None,
    };
    serde_json::json!({
        "start_unix_ms": record.unix_ms,
        "duration_ms": record.duration_ms,
        "direction": record.direction,
        "pod": record.pod,
        "source_pod": (record.direction == Direction::Outbound).then_some(record.pod.as_str()),
        "client": record.client,
        "client_address": record.client_address,
        "original_dst": record.original_dst,
        "target": record.target_addr(),
        "destination_pod": destination_pod,
        "route": route,
        "backend": backend,
        "upstream_bytes": record.bytes.upstream_bytes,
        "downstream_bytes": record.bytes.downstream_bytes,
        "outcome": outcome,
        "error_kind": error_kind,
        "error": error,
    })
}

/// Counts one connection as open for as long as it lives.
pub struct OpenConnection<'a>(&'a ConnectionLog);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ConnectionLog {
    /// A log counting into `metrics` and, when `access_log` is given, writing one line per
    /// finished connection there.
    pub fn new(metrics: ProxyMetrics, access_log: Option<AccessLog>) -> Self {
        Self {
            metrics,
            access_log,
            ..Self::default()
        }
    }

    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// Count a connection as open until the returned guard is dropped.
    pub fn opened(&self) -> OpenConnection<'_> {
        self.open.fetch_add(1, Ordering::SeqCst);
        OpenConnection(self)
    }

    /// Connections accepted and not yet done.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Count a finished connection in the metrics and keep its record.
    pub fn push(&self, record: ConnectionRecord) {
        self.metrics.observe(&record);
        if let Some(access_log) = &self.access_log {
            access_log.write(&record);
        }
        let mut records = lock(&self.records);
        if records.len() == LOG_CAPACITY {
            records.pop_front();
        }
        records.push_back(record);
    }

    pub fn snapshot(&self) -> Vec<ConnectionRecord> {
        lock(&self.records).iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::proxy::connection::ProxyError;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn outbound_record() -> ConnectionRecord {
        let mut record = ConnectionRecord::start(
            "demo/client".into(),
            Direction::Outbound,
            "10.244.0.5:40000".parse().unwrap(),
        );
        record.original_dst = Some("10.96.0.10:80".parse().unwrap());
        record.target = Some(Target::Endpoint {
            service: "demo/echo:80".into(),
            route: Some("VirtualService demo/echo".into()),
            backend: "demo/echo:80 subset v1".into(),
            pod: "demo/echo-v1".into(),
            addr: "10.244.0.9:9000".parse().unwrap(),
            tunnel_to: None,
        });
        record.bytes.upstream_bytes = 5;
        record.bytes.downstream_bytes = 11;
        std::thread::sleep(std::time::Duration::from_millis(5));
        record.finish(Ok(()));
        record
    }

    #[test]
    fn one_json_line_per_connection_with_its_fields() {
        let out = Shared::default();
        let log = ConnectionLog::new(
            ProxyMetrics::default(),
            Some(AccessLog::to(Box::new(out.clone()))),
        );
        log.push(outbound_record());
        let mut failed = ConnectionRecord::start(
            "demo/server".into(),
            Direction::Inbound,
            "10.244.0.5:40001".parse().unwrap(),
        );
        failed.finish(Err(ProxyError::NoOriginalDestination(
            std::io::ErrorKind::NotFound.into(),
        )));
        log.push(failed);

        let text = String::from_utf8(lock(&out.0).clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let line = &lines[0];
        assert_eq!(line["direction"], "outbound", "{line}");
        assert_eq!(line["source_pod"], "demo/client", "{line}");
        assert_eq!(line["client"], "10.244.0.5:40000", "{line}");
        assert_eq!(line["original_dst"], "10.96.0.10:80", "{line}");
        assert_eq!(line["target"], "10.244.0.9:9000", "{line}");
        assert_eq!(line["destination_pod"], "demo/echo-v1", "{line}");
        assert_eq!(line["route"], "VirtualService demo/echo", "{line}");
        assert_eq!(line["backend"], "demo/echo:80 subset v1", "{line}");
        assert_eq!(line["upstream_bytes"], 5, "{line}");
        assert_eq!(line["downstream_bytes"], 11, "{line}");
        assert_eq!(line["outcome"], "closed", "{line}");
        assert!(line["duration_ms"].as_u64().unwrap() >= 5, "{line}");
        assert!(line["start_unix_ms"].as_u64().unwrap() > 0, "{line}");
        assert_eq!(line["error"], serde_json::Value::Null, "{line}");

        let line = &lines[1];
        assert_eq!(line["outcome"], "failed", "{line}");
        assert_eq!(line["error_kind"], "no_original_destination", "{line}");
        assert_eq!(line["source_pod"], serde_json::Value::Null, "{line}");
        assert_eq!(line["destination_pod"], "demo/server", "{line}");
        assert_eq!(line["route"], "none", "{line}");
    }

    #[test]
    fn nothing_is_written_without_the_access_log() {
        let log = ConnectionLog::new(ProxyMetrics::default(), None);
        log.push(outbound_record());
        // Still counted and kept for /config_dump.
        assert_eq!(log.snapshot().len(), 1);
        assert!(log
            .metrics()
            .encode()
            .contains("interceptor_proxy_connections_total{"));
    }
}
