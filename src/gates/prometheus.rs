//! Prometheus alert gates: ask a Prometheus server for its alerts (`GET /api/v1/alerts`) and
//! block while one that matches the gate is firing (or pending, unless `ignorePending`). An
//! unreachable server, an error status, a body that is not an alert list, or a query slower
//! than the timeout blocks too, unless `failOpen`.

use std::collections::BTreeMap;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use serde::Deserialize;

use super::Verdict;
use crate::api::PrometheusGate;

/// The default bound of one query.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read (bytes).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// One alert as `/api/v1/alerts` lists it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Alert {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `firing` or `pending`.
    pub state: String,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<AnswerData>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct AnswerData {
    alerts: Vec<Alert>,
}

/// The alerts in an answer of `/api/v1/alerts`.
pub fn parse_alerts(body: &[u8]) -> Result<Vec<Alert>, String> {
    let a: Answer = serde_json::from_slice(body).map_err(|e| format!("not an alert list: {e}"))?;
    if a.status != "success" {
        return Err(format!(
            "Prometheus answered {}: {}",
            a.status,
            a.error.unwrap_or_default()
        ));
    }
    a.data
        .map(|d| d.alerts)
        .ok_or_else(|| "the answer has no data.alerts".to_owned())
}

/// Whether `alert` counts for `gate` (names, labels and state). Pure.
pub fn counts(gate: &PrometheusGate, alert: &Alert) -> bool {
    let name = alert
        .labels
        .get("alertname")
        .map(String::as_str)
        .unwrap_or_default();
    let state_counts = alert.state == "firing" || (alert.state == "pending" && !gate.ignore_pending);
    state_counts
        && (gate.alert_names.is_empty() || gate.alert_names.iter().any(|n| n == name))
        && !gate.ignore_alert_names.iter().any(|n| n == name)
        && gate
            .match_labels
            .iter()
            .all(|(k, v)| alert.labels.get(k) == Some(v))
}

/// The verdict over the alerts Prometheus listed. Pure.
pub fn judge(gate: &PrometheusGate, alerts: &[Alert]) -> Verdict {
    let mut hits: Vec<String> = alerts
        .iter()
        .filter(|a| counts(gate, a))
        .map(|a| {
            format!(
                "{} ({})",
                a.labels
                    .get("alertname")
                    .map(String::as_str)
                    .unwrap_or("(unnamed)"),
                a.state
            )
        })
        .collect();
    if hits.is_empty() {
        return Verdict::Pass;
    }
    hits.sort();
    hits.dedup();
    let more = hits.len().saturating_sub(5);
    hits.truncate(5);
    Verdict::Block(format!(
        "alerts at {}: {}{}",
        gate.url,
        hits.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    ))
}

fn timeout_of(gate: &PrometheusGate) -> Duration {
    gate.timeout
        .as_deref()
        .and_then(|t| crate::rollout::parse_duration(t).ok())
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(DEFAULT_TIMEOUT)
}

/// GET `{url}/api/v1/alerts` (bounded by `timeout` and [`MAX_BODY`]).
async fn fetch(url: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = format!("{}/api/v1/alerts", url.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("bad URL: {e}"))?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("no TLS roots: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    let req = hyper::Request::get(uri)
        .header("accept", "application/json")
        .header(
            "user-agent",
            concat!("nixroll-controller/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let run = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("unreachable: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        if !status.is_success() && body.is_empty() {
            return Err(format!("HTTP {status}"));
        }
        Ok(body.to_vec())
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// One evaluation of `gate`. Never an error: a failed query blocks (or passes with `failOpen`).
pub async fn check(gate: &PrometheusGate) -> Verdict {
    match fetch(&gate.url, timeout_of(gate))
        .await
        .and_then(|b| parse_alerts(&b))
    {
        Ok(alerts) => judge(gate, &alerts),
        Err(_) if gate.fail_open => Verdict::Pass,
        Err(e) => Verdict::Block(format!("Prometheus at {}: {e} (fail closed)", gate.url)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn gate() -> PrometheusGate {
        PrometheusGate {
            name: "alerts".into(),
            url: "http://127.0.0.1:9".into(),
            alert_names: vec![],
            ignore_alert_names: vec!["Watchdog".into()],
            match_labels: BTreeMap::new(),
            ignore_pending: false,
            fail_open: false,
            timeout: None,
            post_timeout: None,
        }
    }

    fn alert(name: &str, state: &str, severity: &str) -> Alert {
        Alert {
            labels: [("alertname", name), ("severity", severity)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            state: state.into(),
        }
    }

    #[test]
    fn names_labels_and_pending_select_what_blocks() {
        let mut g = gate();
        assert_eq!(judge(&g, &[alert("Watchdog", "firing", "none")]), Verdict::Pass);
        assert!(matches!(
            judge(&g, &[alert("VolumeDegraded", "pending", "warning")]),
            Verdict::Block(_)
        ));
        g.ignore_pending = true;
        assert_eq!(
            judge(&g, &[alert("VolumeDegraded", "pending", "warning")]),
            Verdict::Pass
        );
        g.match_labels.insert("severity".into(), "critical".into());
        assert_eq!(
            judge(&g, &[alert("VolumeDegraded", "firing", "warning")]),
            Verdict::Pass
        );
        let Verdict::Block(why) = judge(&g, &[alert("EtcdDown", "firing", "critical")]) else {
            panic!("a critical firing alert must block")
        };
        assert!(why.contains("EtcdDown (firing)"), "{why}");
        g.alert_names = vec!["NodeDown".into()];
        assert_eq!(
            judge(&g, &[alert("EtcdDown", "firing", "critical")]),
            Verdict::Pass
        );
    }

    #[test]
    fn answers_that_are_not_alert_lists_are_errors() {
        let ok = br#"{"status":"success","data":{"alerts":[{"labels":{"alertname":"A"},"state":"firing","annotations":{},"activeAt":"2026-01-01T00:00:00Z","value":"1e+00"}]}}"#;
        assert_eq!(parse_alerts(ok).unwrap().len(), 1);
        assert!(parse_alerts(b"<html>").is_err());
        assert!(parse_alerts(br#"{"status":"error","error":"bad"}"#).is_err());
    }

    #[tokio::test]
    async fn an_unreachable_prometheus_blocks_unless_fail_open() {
        let mut g = gate();
        // Port 9 (discard) on loopback: nothing listens; refused at once.
        g.timeout = Some("2s".into());
        let v = check(&g).await;
        assert!(
            matches!(&v, Verdict::Block(w) if w.contains("fail closed")),
            "{v:?}"
        );
        g.fail_open = true;
        assert_eq!(check(&g).await, Verdict::Pass);
    }
}
