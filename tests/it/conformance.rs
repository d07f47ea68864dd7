//! Cilium's own golden scenarios (`tests/fixtures/cilium-golden`, or `CILIUM_GOLDEN_DIR`)
//! replayed through the real server path: scenario YAML → [`FakeApiServer`] (real list/watch
//! HTTP) → kube-rs watchers → mirror → our embedded store. The store is then checked byte for
//! byte against the scenario's expectations. One test per scenario, so a failure names it, and
//! one test that every scenario directory present has a test.
//!
//! Steps:
//! - `start` / `stop`: start or stop the `clustermesh` role in-process ([`Mirror`]). Steps with
//!   `before_start: true` must come before the first `start` (they are checked to, and run in
//!   order).
//! - `apply` / `delete`: create-or-replace / delete every document of the YAML file in the fake.
//!   A `CustomResourceDefinition` also makes the fake serve each `served` version of it, as a real
//!   API server does. The `multicluster.x-k8s.io` group is therefore *not* served until a
//!   scenario applies its CRD (the harness default would serve `v1alpha1` ServiceExports
//!   unconditionally), which is what lets `serviceexports-crd-upgrade` start with only `v1alpha1`.
//! - `expect`: bounded wait (15 s) until the keys under the plain string prefix equal the
//!   expected map exactly. `raw` values are compared as the stored bytes (UTF-8);
//!   `endpointslice-transcoded` values are decoded here (zstd frame → protobuf
//!   `ClusterEndpointSlice` → Go `json.Marshal` rendering) by a decoder written for this test,
//!   independent of the server's encoder.
//! - `expect_present`: bounded wait until the key exists (its value, a timestamp, is not checked).
//! - `expect_absent`: checked once, but only after a bounded settle (15 s), because checking
//!   right after `start` would pass trivially: nothing has been written yet. Cilium's script
//!   checks it after the ServiceExport sync job was seen degraded. Our equivalent of "seen
//!   degraded": (1) the server reports (metric `kvstore_initial_sync_completed`, its own list of
//!   canaries) every initial sync done except the one of the checked canary, so it has done all
//!   it can, and (2) the fake has refused at least one collection request (404: a collection it
//!   does not serve), so the failing watcher has really tried and failed. Then the key is read once.
//!   (The settle also ends when (1) holds and the key is already there, so that a server writing
//!   it fails fast instead of at the bound.)
//! - `kv_put` / `kv_delete`: write or delete the key directly in the store, bypassing the
//!   server, with no lease (the server must restore its cluster config).
//! - `note` (health, sleep, env): skipped and listed in the output. The `health/degraded` note of
//!   `serviceexports-crd-upgrade` is covered by the `expect_absent` settle above; its final
//!   `health ok` note is covered by the `expect_present` of the synced marker right before it.
//!
//! Allowed deviations, each narrow (scenario + key + exact transformation), anything else fails:
//! - Architecture decision 8: in `serviceexports` and `globalnamespace-serviceexports`, a
//!   `cilium/state/serviceexports/v1/...` value whose expected text has `"sessionAffinity":""` may
//!   hold `"sessionAffinity":"None"` instead, and nothing else may differ.
//! - `serviceexports-crd-upgrade` (Cilium 1.20's behaviour) expects no synced marker for
//!   ServiceExports while only the `v1alpha1` CRD is served. Cilium 1.17 to 1.19 read `v1alpha1`,
//!   and one binary serves all of them, so we export from `v1alpha1` (the objects are the same):
//!   that step checks the marker is *present* instead. The steps after the CRD upgrade are
//!   checked unchanged.
//! - The non-normative `global-services-filtering` and `namespace-filtering` expect a cluster
//!   config that predates `endpointSlicesExportMode`: their `cilium/cluster-config/<cluster>`
//!   value may have exactly `,"endpointSlicesExportMode":"services-and-endpointslices"` more.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_apiserver::kvstore::Backend;
use clustermesh_apiserver::kvstore::embedded::Embedded;
use clustermesh_apiserver::translate::{ServiceV2Mode, Settings};
use serde_json::Value;

use crate::support::fake_k8s::default_resources;
use crate::support::mirror::{Mirror, Target};
use crate::support::{EmbeddedStore, FakeApiServer, FakeOptions, Pki, ResourceSpec, Verb, init_tracing};

/// Bound of every wait (expect, expect_present, the expect_absent settle).
const WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(25);

macro_rules! scenarios {
    ($($test:ident => $name:literal),* $(,)?) => {
        /// Every scenario with a test below.
        const SCENARIOS: &[&str] = &[$($name),*];
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                replay($name).await;
            }
        )*
    };
}

scenarios! {
    ciliumendpoints => "ciliumendpoints",
    ciliumendpointslices => "ciliumendpointslices",
    ciliumidentitites => "ciliumidentitites",
    ciliumnodes => "ciliumnodes",
    clusterconfig => "clusterconfig",
    clusterconfig_endpointslices_only => "clusterconfig-endpointslices-only",
    clusterconfig_serviceexport => "clusterconfig-serviceexport",
    endpointslices => "endpointslices",
    global_services_filtering => "global-services-filtering",
    globalnamespace => "globalnamespace",
    globalnamespace_endpointslices => "globalnamespace-endpointslices",
    globalnamespace_serviceexports => "globalnamespace-serviceexports",
    globalnamespace_services => "globalnamespace-services",
    namespace_filtering => "namespace-filtering",
    serviceexports => "serviceexports",
    serviceexports_crd_upgrade => "serviceexports-crd-upgrade",
}

#[test]
fn every_golden_scenario_has_a_conformance_test() {
    let root = golden_dir();
    let present: BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(Result::ok)
        .filter(|entry| entry.path().join("scenario.json").is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    let tested: BTreeSet<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    let untested: Vec<&String> = present.difference(&tested).collect();
    let missing: Vec<&String> = tested.difference(&present).collect();
    assert!(
        untested.is_empty() && missing.is_empty(),
        "golden scenarios in {} without a conformance test: {untested:?}; tests whose scenario is missing: {missing:?} \
         (add them to the scenarios! list in tests/it/conformance.rs)",
        root.display()
    );
}

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

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn settings(cluster: &Value) -> Settings {
    let mut settings = Settings::new(
        cluster["name"].as_str().expect("cluster.name"),
        cluster["id"].as_u64().and_then(|id| u32::try_from(id).ok()).expect("cluster.id"),
    );
    settings.enable_cilium_endpoint_slice = cluster["enable_cilium_endpoint_slice"].as_bool().unwrap_or(false);
    settings.mcs_api_enabled = cluster["mcs_api_enabled"].as_bool().unwrap_or(false);
    settings.default_global_namespace = cluster["default_global_namespace"].as_bool().unwrap_or(true);
    settings.service_v2_mode = match cluster["service_v2_mode"].as_str() {
        Some(mode) => mode.parse().unwrap_or_else(|e| panic!("service_v2_mode {mode:?}: {e}")),
        None => ServiceV2Mode::default(),
    };
    if let Some(max) = cluster["max_connected_clusters"].as_u64() {
        settings.max_connected_clusters = u32::try_from(max).expect("max_connected_clusters");
    }
    settings
}

/// Replays one scenario; panics with the scenario, the step and the difference on failure.
async fn replay(name: &str) {
    init_tracing();
    let started = Instant::now();
    let dir = golden_dir().join(name);
    let scenario: Value = serde_json::from_str(&read(&dir.join("scenario.json")).unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|e| panic!("{name}/scenario.json: {e}"));
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let fake =
        FakeApiServer::start_with(FakeOptions { resources: initial_resources(), ..FakeOptions::default() }).await;
    let mut run = Run {
        scenario: name.to_string(),
        dir,
        normative: scenario["status"].as_str().unwrap_or("").starts_with("normative"),
        settings: settings(&scenario["cluster"]),
        target: Target::embedded(&store),
        fake,
        mirror: None,
        started_once: false,
        expects_checked: 0,
        report: Vec::new(),
    };
    let steps = scenario["steps"].as_array().cloned().unwrap_or_default();
    let mut result = Ok(());
    for (index, step) in steps.iter().enumerate() {
        if let Err(e) = run.step(step).await {
            let op = step["op"].as_str().unwrap_or("?");
            let what = step["file"].as_str().or(step["key"].as_str()).unwrap_or("");
            result = Err(format!("step {index} ({op} {what}): {e}"));
            break;
        }
    }
    if result.is_ok() && run.expects_checked == 0 {
        result = Err("no expect step was checked".into());
    }
    if let Some(mirror) = run.mirror.take() {
        mirror.stop().await;
    }
    run.fake.stop().await;
    store.stop().await;
    let status = if result.is_err() { "FAIL" } else { "pass" };
    println!(
        "conformance {name}: {status}, {} expect steps checked, {:.2} s",
        run.expects_checked,
        started.elapsed().as_secs_f64()
    );
    for line in &run.report {
        println!("  {line}");
    }
    if let Err(e) = result {
        panic!("golden scenario {name} through the server: {e}");
    }
}

/// The harness defaults without the `multicluster.x-k8s.io` group, which only a CRD brings, and
/// with CustomResourceDefinitions themselves.
fn initial_resources() -> Vec<ResourceSpec> {
    let mut resources: Vec<ResourceSpec> =
        default_resources().into_iter().filter(|r| r.group != "multicluster.x-k8s.io").collect();
    resources.push(ResourceSpec::new(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
    ));
    resources
}

struct Run {
    scenario: String,
    dir: PathBuf,
    normative: bool,
    settings: Settings,
    target: Target,
    fake: FakeApiServer,
    mirror: Option<Mirror>,
    started_once: bool,
    expects_checked: usize,
    report: Vec<String>,
}

impl Run {
    async fn step(&mut self, step: &Value) -> Result<(), String> {
        if step["before_start"] == true && self.started_once {
            return Err("a before_start step comes after the first start".into());
        }
        let str_field = |field: &str| step[field].as_str().ok_or_else(|| format!("step has no {field}"));
        match step["op"].as_str().unwrap_or("?") {
            "start" => {
                if self.mirror.is_some() {
                    return Err("start while the server runs".into());
                }
                self.mirror = Some(Mirror::start(&self.target, self.settings.clone(), self.fake.client()));
                self.started_once = true;
            }
            "stop" => self.mirror.take().ok_or("stop while the server is stopped")?.stop().await,
            "apply" => {
                for doc in self.documents(str_field("file")?)? {
                    let crd = crd_resources(&doc)?;
                    self.fake.try_apply(doc).map_err(|e| format!("{e:#}"))?;
                    // The CRD's served versions replace the ones served before, as on an API server.
                    if let Some(first) = crd.first() {
                        let versions: Vec<&str> = crd.iter().map(|spec| spec.version.as_str()).collect();
                        self.fake.serve_only(&first.group, &first.plural, &versions);
                    }
                    for spec in crd {
                        self.report.push(format!("fake serves {} {} (from its CRD)", spec.api_version(), spec.plural));
                        self.fake.register(spec);
                    }
                }
            }
            "delete" => {
                for doc in self.documents(str_field("file")?)? {
                    let (api_version, kind) = (doc["apiVersion"].as_str(), doc["kind"].as_str());
                    let name = doc["metadata"]["name"].as_str();
                    let (Some(api_version), Some(kind), Some(name)) = (api_version, kind, name) else {
                        return Err("object without apiVersion, kind or metadata.name".into());
                    };
                    let namespace = doc["metadata"]["namespace"].as_str();
                    if self.fake.delete(api_version, kind, namespace, name).is_none() {
                        return Err(format!("{kind} {name} is not in the fake API server"));
                    }
                }
            }
            "expect" => {
                self.expects_checked += 1;
                self.expect(str_field("prefix")?, str_field("file")?, str_field("value_encoding")?).await?;
            }
            "expect_present" => {
                let key = str_field("key")?;
                let deadline = Instant::now() + WAIT;
                while self.target.get(key).await.is_none() {
                    if Instant::now() > deadline {
                        return Err(format!("{key} not present within {WAIT:?}"));
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
            "expect_absent" if self.scenario == "serviceexports-crd-upgrade" && step["key"] == V1ALPHA1_CANARY => {
                // Allowed deviation (see the module documentation): exported from v1alpha1.
                let deadline = Instant::now() + WAIT;
                while self.target.get(V1ALPHA1_CANARY).await.is_none() {
                    if Instant::now() > deadline {
                        return Err(format!("{V1ALPHA1_CANARY}: exports of a v1alpha1-only cluster not synced"));
                    }
                    tokio::time::sleep(POLL).await;
                }
                self.report.push(format!("deviation: {V1ALPHA1_CANARY} present (exported from v1alpha1)"));
            }
            "expect_absent" => {
                let key = str_field("key")?;
                self.settle_before_absent(key).await?;
                if let Some(value) = self.target.get(key).await {
                    return Err(format!("{key} must be absent, holds {value:?}"));
                }
            }
            "kv_put" => self.target.put(str_field("key")?, str_field("value")?).await,
            "kv_delete" => self.target.delete(str_field("key")?).await,
            "note" => {
                let kind = step["kind"].as_str().unwrap_or("?");
                let detail = step["match"].as_str().or(step["duration"].as_str()).unwrap_or("");
                let level = step["level"].as_str().unwrap_or("");
                self.report.push(format!("skipped note: {kind} {detail} {level}").trim_end().to_string());
            }
            other => return Err(format!("unknown step op {other:?}")),
        }
        Ok(())
    }

    fn documents(&self, file: &str) -> Result<Vec<Value>, String> {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&read(&self.dir.join(file))?).map_err(|e| format!("{file}: YAML: {e}"))?;
        Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
    }

    /// Polls (bounded) until the keys under `prefix` equal the expected file, modulo the
    /// allowed deviations, which are reported.
    async fn expect(&mut self, prefix: &str, file: &str, encoding: &str) -> Result<(), String> {
        let expected: BTreeMap<String, String> =
            serde_json::from_str(&read(&self.dir.join(file))?).map_err(|e| format!("{file}: {e}"))?;
        let deadline = Instant::now() + WAIT;
        loop {
            let actual = self.dump(prefix, encoding).await?;
            match compare(&self.scenario, self.normative, &expected, &actual) {
                Ok(deviations) => {
                    self.report.extend(deviations.into_iter().map(|d| format!("allowed deviation ({file}): {d}")));
                    return Ok(());
                }
                Err(diff) if Instant::now() > deadline => {
                    return Err(format!("keys under {prefix:?} did not match {file} within {WAIT:?}:\n{diff}"));
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Every key under `prefix` with its value rendered per `encoding`.
    async fn dump(&self, prefix: &str, encoding: &str) -> Result<BTreeMap<String, String>, String> {
        let Target::Embedded(store) = &self.target else { unreachable!("conformance runs on the embedded store") };
        let backend = Embedded::new(Arc::clone(store));
        let keys = backend.keys_with_prefix(prefix).await.map_err(|e| format!("list {prefix}: {e:#}"))?;
        let mut out = BTreeMap::new();
        for key in keys {
            let Some(value) = backend.get(&key).await.map_err(|e| format!("get {key}: {e:#}"))? else { continue };
            let text = match encoding {
                "raw" => {
                    String::from_utf8(value.to_vec()).unwrap_or_else(|_| format!("<not UTF-8: {} bytes>", value.len()))
                }
                "endpointslice-transcoded" => {
                    transcode::endpoint_slice_json(&value).unwrap_or_else(|e| format!("<undecodable: {e}>"))
                }
                other => return Err(format!("unknown value_encoding {other:?}")),
            };
            out.insert(key, text);
        }
        Ok(out)
    }

    /// See the module documentation: waits until the server has done all it can (every other
    /// initial sync complete) and a watcher has demonstrably failed (a refused request), or the
    /// key has been written anyway (the single check that follows then fails).
    async fn settle_before_absent(&mut self, key: &str) -> Result<(), String> {
        let Some(mirror) = &self.mirror else { return Ok(()) };
        let own_scope = key
            .strip_prefix(&format!("cilium/synced/{}/cilium/state/", self.settings.cluster_name))
            .ok_or_else(|| format!("{key} is not a synced canary of this cluster"))?
            .to_string();
        let deadline = Instant::now() + WAIT;
        loop {
            let scopes = initial_syncs(&mirror.metrics());
            let pending: Vec<&String> =
                scopes.iter().filter(|(scope, done)| **scope != own_scope && !**done).map(|(s, _)| s).collect();
            let refused: Vec<String> = self
                .fake
                .requests()
                .into_iter()
                .filter(|r| r.verb == Verb::Other && r.method == "GET" && r.path != "/version")
                .map(|r| r.path)
                .collect();
            // A canary already written ends the settle too: the check below then fails at once.
            let written = !scopes.is_empty() && pending.is_empty() && self.target.get(key).await.is_some();
            if written || (!scopes.is_empty() && pending.is_empty() && !refused.is_empty()) {
                let done: Vec<&String> = scopes.keys().filter(|s| **s != own_scope).collect();
                self.report.push(format!(
                    "expect_absent {key}: settled after {} refused request(s) to {:?}; initial syncs done: {done:?}",
                    refused.len(),
                    refused.iter().collect::<BTreeSet<_>>()
                ));
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no settled state to check {key} against within {WAIT:?}: scopes {scopes:?}, refused requests \
                     {refused:?}"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The served versions of a CustomResourceDefinition, as fake resources (empty for other kinds).
fn crd_resources(doc: &Value) -> Result<Vec<ResourceSpec>, String> {
    if doc["kind"] != "CustomResourceDefinition" {
        return Ok(Vec::new());
    }
    let spec = &doc["spec"];
    let (Some(group), Some(plural), Some(kind)) =
        (spec["group"].as_str(), spec["names"]["plural"].as_str(), spec["names"]["kind"].as_str())
    else {
        return Err("CRD without spec.group, spec.names.plural or spec.names.kind".into());
    };
    let namespaced = spec["scope"] == "Namespaced";
    Ok(spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["served"] == true)
        .filter_map(|v| v["name"].as_str())
        .map(|version| ResourceSpec::new(group, version, plural, kind, namespaced))
        .collect())
}

/// `scope → complete` from `kvstore_initial_sync_completed`.
fn initial_syncs(metrics: &str) -> BTreeMap<String, bool> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("cilium_clustermesh_apiserver_kvstore_initial_sync_completed{"))
        .filter_map(|rest| {
            let scope = rest.split("scope=\"").nth(1)?.split('"').next()?.to_string();
            Some((scope, rest.trim_end().ends_with("} 1")))
        })
        .collect()
}

/// The synced marker `serviceexports-crd-upgrade` expects absent while only `v1alpha1` is served.
const V1ALPHA1_CANARY: &str = "cilium/synced/cluster1/cilium/state/serviceexports/v1";

const SESSION_AFFINITY_EMPTY: &str = r#""sessionAffinity":"""#;
const SESSION_AFFINITY_NONE: &str = r#""sessionAffinity":"None""#;
const EXPORT_MODE_FIELD: &str = r#","endpointSlicesExportMode":"services-and-endpointslices""#;

/// Which difference of `expected` vs `actual` at `key` is accepted, and why. See the module
/// documentation; every rule names its scenarios, its keys and its exact transformation.
fn allowed_deviation(scenario: &str, normative: bool, key: &str, want: &str, got: &str) -> Option<String> {
    if matches!(scenario, "serviceexports" | "globalnamespace-serviceexports")
        && key.starts_with("cilium/state/serviceexports/v1/")
        && want.matches(SESSION_AFFINITY_EMPTY).count() == 1
        && want.replace(SESSION_AFFINITY_EMPTY, SESSION_AFFINITY_NONE) == got
    {
        return Some(format!("{key}: sessionAffinity \"\" exported as \"None\" (architecture decision 8)"));
    }
    if !normative
        && matches!(scenario, "global-services-filtering" | "namespace-filtering")
        && key == "cilium/cluster-config/cluster3"
        && got.matches(EXPORT_MODE_FIELD).count() == 1
        && got.replace(EXPORT_MODE_FIELD, "") == want
    {
        return Some(format!("{key}: non-normative expectation predates endpointSlicesExportMode"));
    }
    None
}

/// `Ok(allowed deviations)` when equal modulo [`allowed_deviation`], else `Err(difference)`.
fn compare(
    scenario: &str,
    normative: bool,
    expected: &BTreeMap<String, String>,
    actual: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    let mut deviations = Vec::new();
    let mut differences = Vec::new();
    for key in expected.keys().chain(actual.keys()).collect::<BTreeSet<_>>() {
        match (expected.get(key), actual.get(key)) {
            (Some(want), Some(got)) if want == got => {}
            (Some(want), Some(got)) => match allowed_deviation(scenario, normative, key, want, got) {
                Some(deviation) => deviations.push(deviation),
                None => differences.push(format!("  {key}:\n    want {want}\n     got {got}")),
            },
            (Some(want), None) => differences.push(format!("  {key}: missing, want {want}")),
            (None, Some(got)) => differences.push(format!("  {key}: unexpected, holds {got}")),
            (None, None) => {}
        }
    }
    if differences.is_empty() { Ok(deviations) } else { Err(differences.join("\n")) }
}

/// The JSON view of a stored `cilium/state/endpointslices/v1` value, as Cilium's transcoder
/// prints it: the zstd frame is decoded by the `zstd` CLI, the proto2 `ClusterEndpointSlice` parsed (upstream Kubernetes field numbers for
/// endpoints and ports; an unknown field is an error), and rendered as Go's `json.Marshal` would
/// render the Go structs (field order, `omitempty`, nil slices as `null`, Go string escaping).
mod transcode {
    use std::collections::BTreeMap;

    pub fn endpoint_slice_json(stored: &[u8]) -> Result<String, String> {
        let proto = unzstd(stored)?;
        let slice = Message::parse(&proto, "ClusterEndpointSlice", 1..=9)?;
        let mut out = String::from("{");
        field(&mut out, "cluster", &quote(&slice.string(1)?.unwrap_or_default()));
        field(&mut out, "clusterID", &slice.varint(2)?.unwrap_or(0).to_string());
        field(&mut out, "namespace", &quote(&slice.string(3)?.unwrap_or_default()));
        field(&mut out, "name", &quote(&slice.string(4)?.unwrap_or_default()));
        for (number, name) in [(5, "labels"), (6, "annotations")] {
            let map = slice.map(number)?;
            if !map.is_empty() {
                field(&mut out, name, &string_map(&map));
            }
        }
        field(&mut out, "addressType", &quote(&slice.string(7)?.unwrap_or_default()));
        let endpoints = slice.messages(8, "Endpoint", 1..=8)?.iter().map(endpoint).collect::<Result<Vec<_>, _>>()?;
        field(&mut out, "endpoints", &array(&endpoints));
        let ports = slice.messages(9, "EndpointPort", 1..=4)?.iter().map(port).collect::<Result<Vec<_>, _>>()?;
        field(&mut out, "ports", &array(&ports));
        out.push('}');
        Ok(out)
    }

    /// discovery/v1 `Endpoint`.
    fn endpoint(e: &Message) -> Result<String, String> {
        let mut out = String::from("{");
        let addresses: Vec<String> = e.strings(1)?.iter().map(|a| quote(a)).collect();
        field(&mut out, "addresses", &array(&addresses));
        let mut conditions = String::from("{");
        if let Some(c) = e.messages(2, "EndpointConditions", 1..=3)?.last() {
            for (number, name) in [(1, "ready"), (2, "serving"), (3, "terminating")] {
                if let Some(v) = c.varint(number)? {
                    field(&mut conditions, name, if v != 0 { "true" } else { "false" });
                }
            }
        }
        conditions.push('}');
        field(&mut out, "conditions", &conditions);
        if let Some(hostname) = e.string(3)? {
            field(&mut out, "hostname", &quote(&hostname));
        }
        if let Some(r) = e.messages(4, "ObjectReference", 1..=7)?.last() {
            let mut target = String::from("{");
            let names = ["kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath"];
            for (number, name) in (1..).zip(names) {
                if let Some(v) = r.string(number)?.filter(|v| !v.is_empty()) {
                    field(&mut target, name, &quote(&v));
                }
            }
            target.push('}');
            field(&mut out, "targetRef", &target);
        }
        let topology = e.map(5)?;
        if !topology.is_empty() {
            field(&mut out, "deprecatedTopology", &string_map(&topology));
        }
        for (number, name) in [(6, "nodeName"), (7, "zone")] {
            if let Some(v) = e.string(number)? {
                field(&mut out, name, &quote(&v));
            }
        }
        if let Some(h) = e.messages(8, "EndpointHints", 1..=2)?.last() {
            let mut hints = String::from("{");
            for (number, name, what) in [(1, "forZones", "ForZone"), (2, "forNodes", "ForNode")] {
                let entries = h
                    .messages(number, what, 1..=1)?
                    .iter()
                    .map(|z| Ok(format!("{{\"name\":{}}}", quote(&z.string(1)?.unwrap_or_default()))))
                    .collect::<Result<Vec<_>, String>>()?;
                if !entries.is_empty() {
                    field(&mut hints, name, &array(&entries));
                }
            }
            hints.push('}');
            field(&mut out, "hints", &hints);
        }
        out.push('}');
        Ok(out)
    }

    /// discovery/v1 `EndpointPort`.
    fn port(p: &Message) -> Result<String, String> {
        let mut out = String::from("{");
        for (number, name) in [(1, "name"), (2, "protocol")] {
            if let Some(v) = p.string(number)? {
                field(&mut out, name, &quote(&v));
            }
        }
        if let Some(v) = p.varint(3)? {
            // int32: negative values are sign-extended to 64 bits on the wire.
            field(&mut out, "port", &(v as i64 as i32).to_string());
        }
        if let Some(v) = p.string(4)? {
            field(&mut out, "appProtocol", &quote(&v));
        }
        out.push('}');
        Ok(out)
    }

    fn field(out: &mut String, name: &str, value: &str) {
        if !out.ends_with('{') {
            out.push(',');
        }
        out.push_str(&quote(name));
        out.push(':');
        out.push_str(value);
    }

    /// A Go slice: `null` when nil (empty after decoding), else `[a,b]`.
    fn array(items: &[String]) -> String {
        if items.is_empty() { "null".into() } else { format!("[{}]", items.join(",")) }
    }

    /// A Go `map[string]string`: keys sorted.
    fn string_map(map: &BTreeMap<String, String>) -> String {
        let entries: Vec<String> = map.iter().map(|(k, v)| format!("{}:{}", quote(k), quote(v))).collect();
        format!("{{{}}}", entries.join(","))
    }

    /// A JSON string as Go's `encoding/json` escapes it (HTML-safe, U+2028/2029 escaped).
    fn quote(s: &str) -> String {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// The reference decoder, `zstd` (Debian's package; `.ci/run` installs it), decodes the
    /// frame: what Cilium's klauspost decoder accepts, zstd accepts, and a frame only a
    /// hand-written test decoder reads would prove nothing.
    fn unzstd(data: &[u8]) -> Result<Vec<u8>, String> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = Command::new("zstd")
            .args(["--decompress", "--stdout", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running zstd (Debian's zstd package): {e}"))?;
        // Written from a thread: zstd's output may fill its pipe before it has read all input.
        let (mut stdin, input) = (child.stdin.take().expect("stdin"), data.to_vec());
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let output = child.wait_with_output().map_err(|e| format!("waiting for zstd: {e}"))?;
        writer.join().expect("writer thread").map_err(|e| format!("writing to zstd: {e}"))?;
        if !output.status.success() {
            return Err(format!("zstd refused the frame: {}", String::from_utf8_lossy(&output.stderr).trim()));
        }
        Ok(output.stdout)
    }

    enum Wire<'a> {
        Varint(u64),
        Bytes(&'a [u8]),
    }

    /// One protobuf message: its fields in wire order, every field number checked as known.
    struct Message<'a> {
        what: &'static str,
        fields: Vec<(u64, Wire<'a>)>,
    }

    impl<'a> Message<'a> {
        fn parse(mut data: &'a [u8], what: &'static str, known: std::ops::RangeInclusive<u64>) -> Result<Self, String> {
            let mut fields = Vec::new();
            while !data.is_empty() {
                let key = varint(&mut data)?;
                let number = key >> 3;
                if !known.contains(&number) {
                    return Err(format!("{what}: unknown field {number}"));
                }
                let value = match key & 7 {
                    0 => Wire::Varint(varint(&mut data)?),
                    2 => {
                        let len = usize::try_from(varint(&mut data)?).map_err(|_| "length overflow")?;
                        let bytes = data.get(..len).ok_or_else(|| format!("{what}: truncated field {number}"))?;
                        data = &data[len..];
                        Wire::Bytes(bytes)
                    }
                    other => return Err(format!("{what}: field {number} has unexpected wire type {other}")),
                };
                fields.push((number, value));
            }
            Ok(Self { what, fields })
        }

        fn bytes(&self, number: u64) -> Result<Vec<&'a [u8]>, String> {
            self.fields
                .iter()
                .filter(|(n, _)| *n == number)
                .map(|(_, v)| match v {
                    Wire::Bytes(b) => Ok(*b),
                    Wire::Varint(_) => Err(format!("{}: field {number} is a varint, not bytes", self.what)),
                })
                .collect()
        }

        fn strings(&self, number: u64) -> Result<Vec<String>, String> {
            self.bytes(number)?
                .into_iter()
                .map(|b| String::from_utf8(b.to_vec()).map_err(|_| format!("{}: field {number} not UTF-8", self.what)))
                .collect()
        }

        /// An optional string: the last occurrence wins, as in protobuf.
        fn string(&self, number: u64) -> Result<Option<String>, String> {
            Ok(self.strings(number)?.pop())
        }

        fn varint(&self, number: u64) -> Result<Option<u64>, String> {
            let mut last = None;
            for (n, v) in &self.fields {
                if *n == number {
                    match v {
                        Wire::Varint(v) => last = Some(*v),
                        Wire::Bytes(_) => return Err(format!("{}: field {number} is bytes, not a varint", self.what)),
                    }
                }
            }
            Ok(last)
        }

        fn messages(
            &self,
            number: u64,
            what: &'static str,
            known: std::ops::RangeInclusive<u64>,
        ) -> Result<Vec<Message<'a>>, String> {
            self.bytes(number)?.into_iter().map(|b| Message::parse(b, what, known.clone())).collect()
        }

        fn map(&self, number: u64) -> Result<BTreeMap<String, String>, String> {
            let mut out = BTreeMap::new();
            for entry in self.messages(number, "map entry", 1..=2)? {
                out.insert(entry.string(1)?.unwrap_or_default(), entry.string(2)?.unwrap_or_default());
            }
            Ok(out)
        }
    }

    fn varint(data: &mut &[u8]) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = data.split_first().ok_or("truncated varint")?;
            *data = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }
}
