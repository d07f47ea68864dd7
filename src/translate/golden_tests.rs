//! Replays Cilium's own golden scenarios (`tests/fixtures/cilium-golden`) against the model.
//!
//! Each scenario's Kubernetes objects go through `Object::from_value` and `Model::apply`/`delete`;
//! at each `expect` step the model's `desired()` under the step's prefix must equal the expected
//! file byte for byte (EndpointSlice exports compared through their JSON view, as the files hold).
//! The cluster-config prefix is checked against `cluster_config()`.
//!
//! Steps that belong to the sync layer, not to the model, are skipped and listed per scenario:
//! `start`/`stop` (process lifecycle), `expect_present`/`expect_absent` (canaries),
//! `kv_put`/`kv_delete` (external edits the cluster-config enforcer reverts), `note` (health,
//! sleep, env) and `apply` of kinds the model does not read (CustomResourceDefinitions).
//!
//! Expected deviations: architecture decision 8 (`"sessionAffinity":""` in Cilium's files is
//! exported as `"None"`), and the two non-normative scenarios whose cluster config predates
//! `endpointSlicesExportMode`. Anything else is a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::endpointslice::view::json_view;
use super::{CLUSTER_CONFIG_PREFIX, Model, Object, ServiceV2Mode, Settings, cluster_config, cluster_config_key};

/// Every scenario the reference directory is known to hold; a missing one fails the test.
const SCENARIOS: [&str; 16] = [
    "ciliumendpoints",
    "ciliumendpointslices",
    "ciliumidentitites",
    "ciliumnodes",
    "clusterconfig",
    "clusterconfig-endpointslices-only",
    "clusterconfig-serviceexport",
    "endpointslices",
    "global-services-filtering",
    "globalnamespace",
    "globalnamespace-endpointslices",
    "globalnamespace-serviceexports",
    "globalnamespace-services",
    "namespace-filtering",
    "serviceexports",
    "serviceexports-crd-upgrade",
];

const SESSION_AFFINITY_EMPTY: &str = r#""sessionAffinity":"""#;
const SESSION_AFFINITY_NONE: &str = r#""sessionAffinity":"None""#;
const EXPORT_MODE_FIELD: &str = r#","endpointSlicesExportMode":"services-and-endpointslices""#;

fn golden_dir() -> PathBuf {
    let dir = std::env::var_os("CILIUM_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cilium-golden"));
    assert!(
        dir.join("README.md").is_file(),
        "Cilium golden scenarios not found at {} (set CILIUM_GOLDEN_DIR to the cilium-golden directory)",
        dir.display()
    );
    dir
}

#[derive(Default)]
struct Outcome {
    expects_checked: usize,
    skipped: Vec<String>,
    deviations: Vec<String>,
    failures: Vec<String>,
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load_object(dir: &Path, file: &str) -> Result<Option<Object>, String> {
    let value: serde_json::Value =
        serde_saphyr::from_str(&read(&dir.join(file))).map_err(|e| format!("{file}: YAML: {e}"))?;
    Object::decode(value).map_err(|e| format!("{file}: {e}"))
}

fn settings(cluster: &serde_json::Value) -> Settings {
    let mut settings = Settings::new(
        cluster["name"].as_str().expect("cluster.name"),
        cluster["id"].as_u64().and_then(|id| u32::try_from(id).ok()).expect("cluster.id"),
    );
    settings.enable_cilium_endpoint_slice = cluster["enable_cilium_endpoint_slice"].as_bool().unwrap_or(false);
    settings.mcs_api_enabled = cluster["mcs_api_enabled"].as_bool().unwrap_or(false);
    settings.default_global_namespace = cluster["default_global_namespace"].as_bool().unwrap_or(true);
    settings.service_v2_mode = match cluster["service_v2_mode"].as_str() {
        Some(mode) => mode.parse().unwrap_or_else(|e| panic!("service_v2_mode: {e}")),
        None => ServiceV2Mode::default(),
    };
    if let Some(max) = cluster["max_connected_clusters"].as_u64() {
        settings.max_connected_clusters = u32::try_from(max).expect("max_connected_clusters");
    }
    settings
}

fn run_scenario(dir: &Path) -> Outcome {
    let scenario: serde_json::Value =
        serde_json::from_str(&read(&dir.join("scenario.json"))).expect("scenario.json is JSON");
    let normative = scenario["status"].as_str().unwrap_or("").starts_with("normative");
    let settings = settings(&scenario["cluster"]);
    let mut model = Model::new(settings.clone());
    let mut outcome = Outcome::default();

    for (index, step) in scenario["steps"].as_array().expect("steps").iter().enumerate() {
        let op = step["op"].as_str().unwrap_or("?");
        let at = format!("step {index} ({op} {})", step["file"].as_str().or(step["key"].as_str()).unwrap_or(""));
        match op {
            "apply" | "delete" => {
                let file = step["file"].as_str().expect("file");
                match load_object(dir, file) {
                    Err(e) => outcome.failures.push(format!("{at}: {e}")),
                    Ok(None) => outcome.skipped.push(format!("{at}: not a kind the model reads")),
                    Ok(Some(object)) => {
                        let changes = if op == "apply" { model.apply(object) } else { model.delete(&object.key()) };
                        for (key, reason) in changes.invalid {
                            outcome.failures.push(format!("{at}: {key} reported invalid: {reason}"));
                        }
                    }
                }
            }
            "expect" => {
                outcome.expects_checked += 1;
                let prefix = step["prefix"].as_str().expect("prefix");
                let transcoded = step["value_encoding"] == "endpointslice-transcoded";
                let expected: BTreeMap<String, String> =
                    serde_json::from_str(&read(&dir.join(step["file"].as_str().expect("file"))))
                        .expect("expected JSON");
                let actual: BTreeMap<String, String> = if prefix.starts_with(CLUSTER_CONFIG_PREFIX) {
                    let config = String::from_utf8(cluster_config(&settings).to_vec()).expect("utf-8");
                    BTreeMap::from([(cluster_config_key(&settings), config)])
                } else {
                    model
                        .desired()
                        .into_iter()
                        .map(|(key, value)| {
                            let text = if transcoded {
                                json_view(&value).unwrap_or_else(|e| format!("<undecodable: {e}>"))
                            } else {
                                String::from_utf8_lossy(&value).into_owned()
                            };
                            (key, text)
                        })
                        .collect()
                };
                let actual: BTreeMap<String, String> =
                    actual.into_iter().filter(|(key, _)| key.starts_with(prefix)).collect();
                compare(&at, normative, &expected, &actual, &mut outcome);
            }
            "expect_present" | "expect_absent" => {
                outcome.skipped.push(format!("{at}: canary, written by the sync layer"))
            }
            "kv_put" | "kv_delete" => {
                outcome.skipped.push(format!("{at}: external store edit, reverted by the sync layer"))
            }
            "note" => outcome.skipped.push(format!("{at}: note ({})", step["kind"].as_str().unwrap_or("?"))),
            "start" | "stop" => outcome.skipped.push(format!("{at}: process lifecycle")),
            other => outcome.failures.push(format!("{at}: unknown step op {other:?}")),
        }
    }
    outcome
}

fn compare(
    at: &str,
    normative: bool,
    expected: &BTreeMap<String, String>,
    actual: &BTreeMap<String, String>,
    outcome: &mut Outcome,
) {
    let keys: std::collections::BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
    for key in keys {
        match (expected.get(key), actual.get(key)) {
            (Some(want), Some(got)) if want == got => {}
            (Some(want), Some(got))
                if key.starts_with(super::SERVICE_EXPORTS_PREFIX)
                    && want.contains(SESSION_AFFINITY_EMPTY)
                    && want.replace(SESSION_AFFINITY_EMPTY, SESSION_AFFINITY_NONE) == *got =>
            {
                outcome.deviations.push(format!("{at}: {key}: sessionAffinity \"\" exported as \"None\" (decision 8)"));
            }
            (Some(want), Some(got))
                if !normative
                    && key.starts_with(CLUSTER_CONFIG_PREFIX)
                    && got.replace(EXPORT_MODE_FIELD, "") == *want =>
            {
                outcome
                    .deviations
                    .push(format!("{at}: {key}: non-normative expectation predates endpointSlicesExportMode"));
            }
            (Some(want), Some(got)) => outcome.failures.push(format!("{at}: {key}:\n   want {want}\n    got {got}")),
            (Some(_), None) => outcome.failures.push(format!("{at}: {key}: missing")),
            (None, Some(got)) => outcome.failures.push(format!("{at}: {key}: unexpected, value {got}")),
            (None, None) => {}
        }
    }
}

#[test]
fn every_cilium_golden_scenario_replays_byte_exact() {
    let root = golden_dir();
    let mut found: Vec<String> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().join("scenario.json").is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    for name in SCENARIOS {
        assert!(found.iter().any(|f| f == name), "golden scenario {name} is missing from {}", root.display());
    }

    let mut failed = Vec::new();
    for name in &found {
        let outcome = run_scenario(&root.join(name));
        let status = if !outcome.failures.is_empty() {
            "FAIL"
        } else if !outcome.deviations.is_empty() {
            "pass (expected deviations)"
        } else {
            "pass"
        };
        println!("{name}: {status}, {} expect steps checked", outcome.expects_checked);
        for line in &outcome.deviations {
            println!("  deviation: {line}");
        }
        for line in &outcome.skipped {
            println!("  skipped: {line}");
        }
        for line in &outcome.failures {
            println!("  FAILURE: {line}");
        }
        if outcome.expects_checked == 0 {
            failed.push(format!("{name}: no expect step was checked"));
        }
        failed.extend(outcome.failures.into_iter().map(|f| format!("{name}: {f}")));
    }
    assert!(failed.is_empty(), "golden scenarios failed:\n{}", failed.join("\n"));
}
