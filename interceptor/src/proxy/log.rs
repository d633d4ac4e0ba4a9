//! The recent connection records `/config_dump` shows, bounded, and the metrics every
//! record adds to as it is pushed; also the count of open connections a drain waits for.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::connection::ConnectionRecord;
use super::metrics::ProxyMetrics;
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
}

/// Counts one connection as open for as long as it lives.
pub struct OpenConnection<'a>(&'a ConnectionLog);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ConnectionLog {
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
