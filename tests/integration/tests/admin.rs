//! The daemon's own endpoints: `/health`, `/ready` and `/metrics`, on the
//! client-facing port by default, or only on `--admin-listen`, where they
//! still answer while the client-facing port is at its connection limit.
use std::{net::SocketAddr, time::Duration};

use integration_tests::{
    Stopper, dataplane_or_skip, get, metric, post_json, read_response, start_router_with, start_sim,
};
use router_daemon::{config::Config, dataplane::Mode};
use serde_json::json;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

/// A router in front of one simulator, with admin endpoints on their own
/// address; returns (client-facing, admin) addresses.
async fn router_with_admin(
    configure: impl FnOnce(&mut Config),
) -> Option<(SocketAddr, SocketAddr, Vec<Stopper>)> {
    let dataplane = dataplane_or_skip(Mode::Userspace)?;
    let (sim, sim_stop) = start_sim(vllm_sim::Config::for_tests("sim-0")).await;
    let admin = integration_tests::free_loopback_addr();
    let (router, stop) = start_router_with(vec![format!("http://{sim}")], dataplane, |config| {
        config.admin_listen = Some(admin);
        configure(config);
    })
    .await;
    // The admin listener is bound as the daemon starts.
    for _ in 0..800 {
        if TcpStream::connect(admin).await.is_ok() {
            return Some((router, admin, vec![sim_stop, stop]));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the admin listener never came up on {admin}");
}

fn completion() -> serde_json::Value {
    json!({"model": "meta-llama/Llama-3.2-1B-Instruct", "prompt": "What is the capital of France?", "max_tokens": 4})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_move_to_their_own_listener() {
    let Some((router, admin, _stops)) = router_with_admin(|_| {}).await else {
        return;
    };
    // The client-facing port serves the API, not the daemon's endpoints.
    assert_eq!(
        post_json(router, "/v1/completions", &completion())
            .await
            .status,
        200
    );
    for path in ["/metrics", "/health", "/ready"] {
        let response = get(router, path).await;
        assert_eq!(response.status, 404, "{path}: {}", response.text());
        assert!(
            response.text().contains("--admin-listen"),
            "{}",
            response.text()
        );
    }
    // The admin listener serves them, and not the API.
    let metrics = get(admin, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metric(&metrics.text(), "router_requests_total"),
        Some(1.0),
        "{}",
        metrics.text()
    );
    assert_eq!(get(admin, "/health").await.status, 200);
    assert_eq!(get(admin, "/ready").await.status, 200);
    assert_eq!(
        post_json(admin, "/v1/completions", &completion())
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_while_the_api_port_is_full() {
    let Some((router, admin, _stops)) = router_with_admin(|config| {
        config.max_connections = Some(1);
    })
    .await
    else {
        return;
    };
    // One client holds the only place on the client-facing port.
    let mut holder = TcpStream::connect(router).await.expect("connect");
    holder
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: r\r\n\r\n")
        .await
        .expect("send");
    assert_eq!(read_response(&mut holder).await.status, 200);
    assert_eq!(get(router, "/v1/models").await.status, 503);
    let metrics = get(admin, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metric(
            &metrics.text(),
            "router_limit_exceeded_total{limit=\"connections\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_says_no_while_no_backend_is_up() {
    let Some(dataplane) = dataplane_or_skip(Mode::Userspace) else {
        return;
    };
    let dead = integration_tests::free_loopback_addr();
    let (router, _stop) = start_router_with(vec![format!("http://{dead}")], dataplane, |config| {
        config.discovery_interval_ms = 50;
        config.down_after_failures = 1;
    })
    .await;
    assert_eq!(
        get(router, "/health").await.status,
        200,
        "alive all the same"
    );
    let mut status = 0;
    for _ in 0..800 {
        status = get(router, "/ready").await.status;
        if status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, 503, "/ready while the only backend is down");
}
