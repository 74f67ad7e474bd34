//! The OpenAI Python SDK as a real client: `tests/sdk/openai_client.py`
//! drives completions and chat, streamed and not, against simulators
//! started in-process here.
//!
//! Needs `python3` with the `openai` package (`tests/sdk/requirements.txt`,
//! installed by `cargo xtask test`). Without them the test skips with a
//! message, except under `CI=true`, where it fails.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Sim;
use vllm_sim::Config;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_client.py");
const REQUIREMENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/requirements.txt");

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Why the SDK cannot be used here, if it cannot.
fn sdk_missing() -> Option<String> {
    match Command::new("python3")
        .args(["-c", "import openai"])
        .output()
    {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(format!(
            "`import openai` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => Some(format!("cannot run python3: {error}")),
    }
}

#[tokio::test]
async fn the_openai_python_sdk_gets_well_formed_results() {
    assert!(Path::new(SCRIPT).is_file(), "{SCRIPT} is missing");
    if let Some(why) = sdk_missing() {
        let fix = format!("python3 -m pip install -r {REQUIREMENTS} (cargo xtask test does this)");
        assert!(
            !is_ci(),
            "CI=true requires the OpenAI SDK: {why}; fix: {fix}"
        );
        eprintln!("SKIPPED the_openai_python_sdk_gets_well_formed_results: {why}; fix: {fix}");
        return;
    }
    let sim = Sim::start(Config::for_tests("sim-sdk")).await;
    let failing = Sim::start(Config {
        fail_rate: 1.0,
        ..Config::for_tests("sim-fail")
    })
    .await;
    let mut python = Command::new("python3");
    python
        .arg(SCRIPT)
        .args(["--base-url", &format!("http://{}", sim.addr)])
        .args(["--failing-base-url", &format!("http://{}", failing.addr)])
        .args(["--model", vllm_sim::config::DEFAULT_MODEL]);
    // The simulators run on this runtime: wait for Python off it.
    let output: Output = tokio::task::spawn_blocking(move || python.output())
        .await
        .expect("the waiting task ran")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "openai_client.py failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    sim.stop().await;
    failing.stop().await;
}
