//! Pod start-up at cluster scale: how long interceptor-cni's share of a CNI ADD takes
//! when the agent's model holds 10, 1,000 or 10,000 pods (one Service per ten pods,
//! selecting them by label, the way a Service without EndpointSlices is resolved), and
//! what the agent costs in memory and threads with that model. Each size gets a fresh
//! agent; [`PROBES`] enrolled pods are then added one after another through the real
//! chain (bridge, host-local, interceptor-cni) and each plugin is timed.

use std::time::Duration;

use anyhow::{bail, Result};
use interceptor_testbed::{NodeId, Testbed};
use serde::Serialize;

use super::scenario::{median, Options};

/// Model sizes (pods; Services are a tenth of that).
pub const POD_COUNTS: [usize; 3] = [10, 1_000, 10_000];
/// Enrolled pods added through the chain per size.
pub const PROBES: usize = 20;
/// Enrolled pods of the memory row: the testbed's node subnet (/24) holds about 250.
pub const MEMORY_PROBES: usize = 200;
/// The agent's `--tc-attach` values measured: TCX waits for RCU grace periods per pod.
pub const TC_ATTACH: [&str; 2] = ["netlink", "tcx"];

/// One model size over the rounds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PodsRow {
    pub pods: usize,
    /// Enrolled pods added through the chain.
    pub enrolled: usize,
    /// `--tc-attach` of the agent.
    pub tc_attach: &'static str,
    pub services: usize,
    /// interceptor-cni's ADD, each probe (ms).
    pub plugin_ms: Vec<f64>,
    /// The whole chain's ADD, each probe (ms).
    pub chain_ms: Vec<f64>,
    /// Agent RSS after the probes were enrolled (KiB), per round.
    pub rss_kib: Vec<f64>,
    /// Agent RSS once the model was loaded, before the first probe (KiB), per round.
    pub rss_before_kib: Vec<f64>,
    /// Agent threads after the probes were enrolled, per round.
    pub threads: Vec<f64>,
    pub errors: Vec<String>,
}

/// The `q` quantile (0..=1) of `values`, nearest rank.
fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn manifests(pods: usize, probes: usize) -> String {
    let services = (pods / 10).max(1);
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: fleet}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: probe\n  labels: {istio.io/dataplane-mode: ambient}\n",
    );
    for i in 0..pods {
        // Remote pods of the cluster: addresses outside the testbed's pod range.
        let ip =
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 200, 0, 1)) + i as u32);
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: w{i}, namespace: fleet, labels: {{app: s{}}}}}\n\
             spec: {{containers: [{{name: main, image: bench, ports: [{{name: tcp, containerPort: 8080}}]}}]}}\n\
             status: {{podIP: {ip}}}\n",
            i % services
        ));
    }
    for j in 0..services {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{j}, namespace: fleet}}\n\
             spec: {{clusterIP: {}, selector: {{app: s{j}}}, ports: [{{name: tcp, port: 80, targetPort: tcp}}]}}\n",
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 97, 0, 1)) + j as u32)
        ));
    }
    for k in 0..probes {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{k}, namespace: probe}}\n\
             spec: {{containers: [{{name: main, image: bench}}]}}\n"
        ));
    }
    yaml
}

fn point(pods: usize, row: &mut PodsRow) -> Result<()> {
    let mut tb = Testbed::new(&format!("scalepods{pods}{}", row.tc_attach))?;
    let dir = tb.state_dir().join("manifests");
    std::fs::create_dir_all(&dir)?;
    let probes = row.enrolled;
    std::fs::write(dir.join("model.yaml"), manifests(pods, probes))?;
    let agent = tb.start_agent_on(
        NodeId::A,
        &dir,
        &["--mode", "ebpf", "--tc-attach", row.tc_attach],
    )?;
    let result = (|| -> Result<()> {
        // Ready means the first model is loaded; make sure it is the whole one.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let (_, body) = tb.admin_get("/config_dump")?;
            let dump: serde_json::Value = serde_json::from_str(&body)?;
            let loaded = dump["model"]["pods"].as_object().map_or(0, |p| p.len());
            if loaded >= pods + probes {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the model holds {loaded} pods after 120 s, {} expected",
                    pods + probes
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        row.rss_before_kib
            .push(interceptor_testbed::proc_status(agent.pid())?.rss_kib as f64);
        for k in 0..probes {
            let started = std::time::Instant::now();
            tb.add_pod_on(NodeId::A, "probe", &format!("p{k}"))?;
            row.chain_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            let plugin = tb
                .last_add_timings()
                .into_iter()
                .find(|(ty, _)| ty == "interceptor-cni")
                .map(|(_, took)| took.as_secs_f64() * 1000.0);
            match plugin {
                Some(ms) => row.plugin_ms.push(ms),
                None => bail!("no interceptor-cni in the chain's timings"),
            }
        }
        let status = interceptor_testbed::proc_status(agent.pid())?;
        row.threads.push(status.threads as f64);
        row.rss_kib.push(status.rss_kib as f64);
        Ok(())
    })();
    let stopped = agent.stop();
    result?;
    stopped?;
    Ok(())
}

pub fn run(opts: Options) -> Vec<PodsRow> {
    TC_ATTACH
        .iter()
        .flat_map(|&tc_attach| {
            POD_COUNTS
                .iter()
                .map(move |&pods| (tc_attach, pods, PROBES))
        })
        // Memory per enrolled pod: a small model and many pods enrolled.
        .chain([(TC_ATTACH[0], POD_COUNTS[0], MEMORY_PROBES)])
        .map(|(tc_attach, pods, enrolled)| {
            let mut row = PodsRow {
                pods,
                enrolled,
                tc_attach,
                services: (pods / 10).max(1),
                ..PodsRow::default()
            };
            eprintln!(
                "tb-bench: pod start-up with a model of {pods} pods, --tc-attach {tc_attach} \
                 (round {}/{})",
                opts.round + 1,
                opts.rounds
            );
            if let Err(e) = point(pods, &mut row) {
                row.errors.push(format!("{e:#}"));
            }
            row
        })
        .collect()
}

/// Rounds joined: every probe's time counts.
pub fn merge(rounds: Vec<Vec<PodsRow>>) -> Vec<PodsRow> {
    let mut merged: Vec<PodsRow> = Vec::new();
    for row in rounds.into_iter().flatten() {
        match merged.iter_mut().find(|m| {
            m.pods == row.pods && m.tc_attach == row.tc_attach && m.enrolled == row.enrolled
        }) {
            Some(m) => {
                m.plugin_ms.extend(row.plugin_ms);
                m.chain_ms.extend(row.chain_ms);
                m.rss_kib.extend(row.rss_kib);
                m.rss_before_kib.extend(row.rss_before_kib);
                m.threads.extend(row.threads);
                m.errors.extend(row.errors);
            }
            None => merged.push(row),
        }
    }
    merged
}

fn ms(value: Option<f64>) -> String {
    value.map_or("—".into(), |v| format!("{v:.1}"))
}

/// The markdown table, with the target (interceptor-cni's ADD p99 ≤ 20 ms at every
/// size) per row.
pub fn table(rows: &[PodsRow]) -> String {
    let mut out = String::from(
        "| tc attach | model pods | Services | enrolled | interceptor-cni ADD p50 ms | p99 ms | whole chain p50 ms | p99 ms | agent RSS MiB before → after | KiB per enrolled pod | agent threads | p99 ≤ 20 ms |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let p99 = quantile(&row.plugin_ms, 0.99);
        let verdict = if !row.errors.is_empty() {
            format!("failed: {}", row.errors.join("; "))
        } else {
            match p99 {
                Some(v) if v <= 20.0 => "met".into(),
                Some(v) => format!("**missed** by {:.1} ms", v - 20.0),
                None => "—".into(),
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.tc_attach,
            row.pods,
            row.services,
            row.enrolled,
            ms(quantile(&row.plugin_ms, 0.5)),
            ms(p99),
            ms(quantile(&row.chain_ms, 0.5)),
            ms(quantile(&row.chain_ms, 0.99)),
            match (median(&row.rss_before_kib), median(&row.rss_kib)) {
                (Some(before), Some(after)) =>
                    format!("{:.1} → {:.1}", before / 1024.0, after / 1024.0),
                _ => "—".into(),
            },
            match (median(&row.rss_before_kib), median(&row.rss_kib)) {
                (Some(before), Some(after)) if row.enrolled > 0 =>
                    format!("{:.0}", (after - before) / row.enrolled as f64),
                _ => "—".into(),
            },
            median(&row.threads).map_or("—".into(), |t| format!("{t:.0}")),
            verdict
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), Some(10.0));
        assert_eq!(quantile(&values, 0.99), Some(20.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn the_model_has_every_pod_service_and_probe() {
        let yaml = manifests(1_000, PROBES);
        assert_eq!(yaml.matches("kind: Pod\n").count(), 1_000 + PROBES);
        assert_eq!(yaml.matches("kind: Service\n").count(), 100);
        assert!(
            yaml.contains("podIP: 10.200.3.232"),
            "the 1,000th pod's address"
        );
    }
}
