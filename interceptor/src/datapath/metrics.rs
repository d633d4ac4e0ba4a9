//! The data path's kernel counters as Prometheus metrics, read at scrape time.
//!
//! A [`prometheus_client`] collector rather than counters mirrored by the agent's counter
//! watch: the programs already keep the totals (per-CPU array, summed here), so a scrape
//! reads them directly (one map lookup per counter) and is never up to a second behind,
//! and nothing has to be kept in step with the kernel. The counters map is pinned and
//! reused across agents, so the totals go on across a restart or a hand-over, as a
//! Prometheus counter may (`inbound_half_open_expired` is the agent's own count of its
//! sweeps and starts from zero in each agent: a counter reset to Prometheus).
//!
//! Every series carries `mode` (`ebpf` or `iptables`). iptables mode has no program
//! counters: the nat rules' packet counts live in every pod's netns and would need an
//! `iptables-save -c` per pod per scrape, so that mode exports only
//! `interceptor_datapath_mode{mode="iptables"} 1`.
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{Datapath, DatapathCounters};

/// Name (after `interceptor_datapath_`, before `_total`), help and value of each counter.
fn counters(c: &DatapathCounters) -> [(&'static str, &'static str, u64); 23] {
    [
        ("redirected", "Outbound connects of enrolled pods redirected to their proxy on 15001 (connect4)", c.redirected),
        ("flows_recorded", "Flow records written at ESTABLISHED (sock_ops)", c.flows_recorded),
        ("orig_dst_answered", "SO_ORIGINAL_DST calls answered by the getsockopt program", c.orig_dst_answered),
        ("record_failed", "Outbound connects refused because their original destination could not be recorded (a full map)", c.record_failed),
        ("same_node_inbound", "Proxy connects to an enrolled pod of this node steered to its inbound listener", c.same_node_inbound),
        ("inbound_redirected", "New inbound flows steered to an inbound listener by tc", c.inbound_redirected),
        ("inbound_record_failed", "New inbound flows refused (SYN dropped) because their record could not be stored", c.inbound_record_failed),
        ("inbound_half_open_expired", "Half-open inbound flow records removed by the agent after the timeout", c.inbound_half_open_expired),
        ("ipv6_passed", "Retired, always 0: IPv6 packets tc left alone before IPv6 was intercepted (see ipv6_unparsed_passed)", c.ipv6_passed),
        ("sockmap_added", "Sockets added to the SOCKHASH (--sockmap)", c.sockmap_added),
        ("sockmap_redirected", "Messages sk_msg sent straight to the peer socket (--sockmap)", c.sockmap_redirected),
        ("sockmap_add_failed", "Sockets sock_ops could not add to the SOCKHASH (that pair is not accelerated)", c.sockmap_add_failed),
        ("inbound_tuple_busy", "New inbound flows refused because the client address and port already carry a flow to another port of the pod", c.inbound_tuple_busy),
        ("ipv6_redirected", "Native IPv6 outbound connects of enrolled pods redirected to their proxy on 15001 (connect6)", c.ipv6.redirected),
        ("ipv6_flows_recorded", "IPv6 flow records written at ESTABLISHED (sock_ops)", c.ipv6.flows_recorded),
        ("ipv6_orig_dst_answered", "IP6T_SO_ORIGINAL_DST calls answered by the getsockopt program", c.ipv6.orig_dst_answered),
        ("ipv6_record_failed", "IPv6 outbound connects refused because their original destination could not be recorded", c.ipv6.record_failed),
        ("ipv6_same_node_inbound", "Proxy connects to an enrolled pod's IPv6 address on this node steered to its inbound listener", c.ipv6.same_node_inbound),
        ("inbound6_redirected", "New inbound IPv6 flows steered to an inbound listener by tc", c.ipv6.inbound_redirected),
        ("inbound6_record_failed", "New inbound IPv6 flows refused (SYN dropped) because their record could not be stored", c.ipv6.inbound_record_failed),
        ("inbound6_tuple_busy", "New inbound IPv6 flows refused because the client address and port already carry a flow to another port of the pod", c.ipv6.inbound_tuple_busy),
        ("ipv6_unparsed_passed", "IPv6 packets tc passed unread and unrewritten: a fragment, AH, ESP or another extension header it does not walk, a routing header with segments left, or too many extension headers", c.ipv6.unparsed_passed),
        ("ipv4_mapped_redirected", "Connects of dual-stack sockets to IPv4-mapped addresses redirected to the pod's IPv4 proxy listener (also in redirected)", c.ipv6.v4_mapped_redirected),
    ]
}

/// Reads [`Datapath::counters`] on every scrape.
pub struct DatapathCollector(pub Arc<dyn Datapath>);

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DatapathCollector")
            .field(&self.0.mode())
            .finish()
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = [("mode", self.0.mode())];
        let gauge = ConstGauge::new(1i64);
        let mut metric = encoder.encode_descriptor(
            "datapath_mode",
            "The interception mode of this agent (1 for the mode in force)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric.encode_family(&labels)?)?;
        let Some(values) = self.0.counters() else {
            return Ok(());
        };
        for (name, help, value) in counters(&values) {
            let counter = ConstCounter::new(value);
            let name = format!("datapath_{name}");
            let mut metric = encoder.encode_descriptor(&name, help, None, counter.metric_type())?;
            counter.encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::datapath::{DatapathError, LiveRecords, PodDatapath};
    use crate::inpod::PodNetns;
    use crate::proxy::metrics::ProxyMetrics;

    /// A data path that only has a mode and counters.
    struct Fake(&'static str, Option<DatapathCounters>);

    impl Datapath for Fake {
        fn mode(&self) -> &'static str {
            self.0
        }
        fn enroll(&self, _: &PodDatapath, _: &Arc<PodNetns>) -> Result<(), DatapathError> {
            Ok(())
        }
        fn unenroll(&self, _: &PodDatapath, _: &Arc<PodNetns>) -> Result<(), DatapathError> {
            Ok(())
        }
        fn set_debug(&self, _: bool) -> Result<(), DatapathError> {
            Ok(())
        }
        fn counters(&self) -> Option<DatapathCounters> {
            self.1
        }
        fn live_records(&self) -> LiveRecords {
            LiveRecords::default()
        }
        fn retain_pods(&self, _: &HashSet<u64>) {}
        fn set_rules(&self, _: u64, _: &crate::config::MeshConfig) -> Result<(), DatapathError> {
            Ok(())
        }
        fn teardown(&self) -> Result<(), DatapathError> {
            Ok(())
        }
    }

    fn scrape(datapath: Fake) -> String {
        ProxyMetrics::with_collector(Box::new(DatapathCollector(Arc::new(datapath)))).encode()
    }

    #[test]
    fn ebpf_counters_are_prometheus_counters_by_mode() {
        let text = scrape(Fake(
            "ebpf",
            Some(DatapathCounters {
                redirected: 7,
                inbound_tuple_busy: 2,
                ..DatapathCounters::default()
            }),
        ));
        for line in [
            "# TYPE interceptor_datapath_mode gauge\n",
            "interceptor_datapath_mode{mode=\"ebpf\"} 1\n",
            "# TYPE interceptor_datapath_redirected counter\n",
            "interceptor_datapath_redirected_total{mode=\"ebpf\"} 7\n",
            "interceptor_datapath_inbound_tuple_busy_total{mode=\"ebpf\"} 2\n",
            "interceptor_datapath_record_failed_total{mode=\"ebpf\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert_eq!(
            text.matches("_total{mode=\"ebpf\"}").count(),
            counters(&DatapathCounters::default()).len(),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_mode_without_counters_exports_its_mode_only() {
        let text = scrape(Fake("iptables", None));
        assert!(
            text.contains("interceptor_datapath_mode{mode=\"iptables\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("_total{mode="), "{text}");
    }
}
