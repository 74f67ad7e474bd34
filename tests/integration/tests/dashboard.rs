//! The Grafana dashboard (`deploy/grafana/prefix-router.json`) queries only
//! metrics the router exports: a renamed metric would otherwise leave a
//! panel silently empty.
//!
//! A router on the sockmap dataplane (whose kernel counters only it
//! exports) serves a streamed completion from a simulator and refuses a
//! malformed one, so every labelled series exists; then each metric name
//! in the dashboard's queries is looked up in its `/metrics`.
use std::{collections::BTreeSet, path::Path};

use integration_tests::{get, post_json, request, sockmap_or_skip, start_router, start_sims};
use router_daemon::Dataplane;
use serde_json::{Value, json};

/// Every `router_…` metric name in the dashboard's queries.
fn queried_metrics(dashboard: &Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for target in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
    {
        let expr = target["expr"].as_str().expect("a PromQL expression");
        let mut rest = expr;
        while let Some(at) = rest.find("router_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    for variable in variables {
        if let Some(query) = variable["definition"].as_str()
            && let Some(at) = query.find("router_")
        {
            let name: String = query[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names
}

/// The sample names in a Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_dashboard_queries_is_exported() {
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/prefix-router.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    let queried = queried_metrics(&dashboard);
    assert!(queried.len() >= 20, "too few metrics found: {queried:?}");

    // Without sockmap (not root, outside CI), its kernel counters cannot
    // be checked; everything else still is.
    let (dataplane, sockmap) = match sockmap_or_skip() {
        Some(dataplane) => (dataplane, true),
        None => (Dataplane::userspace(), false),
    };
    let (backends, _sims) = start_sims(2).await;
    let (router, _stop) = start_router(backends, dataplane).await;
    let body = json!({
        "model": "meta-llama/Llama-3.2-1B-Instruct",
        "prompt": "dashboard",
        "max_tokens": 8,
        "stream": true,
    });
    let response = post_json(router, "/v1/completions", &body).await;
    assert_eq!(response.status, 200);
    // And one the router refuses: error series exist once one happened.
    let refused = request(router, "POST", "/v1/completions", b"{not json").await;
    assert_eq!(refused.status, 400);
    let exported = exported(&get(router, "/metrics").await.text());
    let missing: Vec<&String> = queried
        .iter()
        .filter(|name| sockmap || !name.starts_with("router_sockmap_"))
        .filter(|name| !exported.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which the router does not export; it exports {exported:?}"
    );
}
