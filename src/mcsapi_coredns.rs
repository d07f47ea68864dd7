//! `mcsapi-coredns-cfg`: the Job Cilium's chart (1.19+, `clustermesh.mcsapi.corednsAutoConfigure`)
//! runs once to make CoreDNS answer the MCS-API clusterset domain. As Cilium's command
//! (`clustermesh-apiserver/mcsapi-coredns-cfg`): the CoreDNS version must be 1.12.2 or newer;
//! the Corefile's `kubernetes` block serving the cluster domain also serves the clusterset
//! domain and gets a `multicluster <clusterset>` line; the old Corefile is kept under
//! `Corefile.cilium.bak`; CoreDNS is rolled out by stamping its pod template. A Corefile that
//! already mentions the clusterset domain or `multicluster` is left alone, so running the Job
//! again changes nothing.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};

/// The pod-template annotation that rolls CoreDNS out after the change.
pub const AUTO_PATCHED_ANNOTATION: &str = "clustermesh.cilium.io/autoPatchedAt";
/// The field manager of the rollout's server-side apply.
const FIELD_MANAGER: &str = "mcsapi-coredns-autocfg";
/// The first CoreDNS release with the `multicluster` plugin Cilium relies on.
const MIN_COREDNS: (u64, u64, u64) = (1, 12, 2);

#[derive(Debug, Clone, clap::Args)]
pub struct CorednsArgs {
    #[arg(long, default_value = "coredns")]
    pub coredns_deployment_name: String,
    #[arg(long, default_value = "coredns")]
    pub coredns_configmap_name: String,
    #[arg(long, default_value = "kube-system")]
    pub coredns_namespace: String,
    #[arg(long, default_value = "cluster.local")]
    pub coredns_cluster_domain: String,
    #[arg(long, default_value = "clusterset.local")]
    pub coredns_clusterset_domain: String,
    /// Kubeconfig to reach the Kubernetes API (default: in-cluster, then ~/.kube/config).
    #[arg(long)]
    pub k8s_kubeconfig_path: Option<std::path::PathBuf>,
    /// The Kubernetes API server's URL.
    #[arg(long)]
    pub k8s_api_server: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CorednsError {
    #[error("getting CoreDNS {what} {namespace}/{name}")]
    Get {
        what: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("CoreDNS version {0} is too old for MCS-API auto configuration, please use v1.12.2 or newer")]
    TooOld(String),
    #[error("Corefile not found in ConfigMap {0}")]
    NoCorefile(String),
    #[error("CoreDNS not configured with the kubernetes plugin and the domain '{0}'")]
    NoKubernetesBlock(String),
    #[error("updating ConfigMap {0}")]
    Update(String, #[source] Box<kube::Error>),
    #[error("Deployment {0} is paused")]
    Paused(String),
    #[error("rolling out Deployment {0}")]
    Rollout(String, #[source] Box<kube::Error>),
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Configured,
    AlreadyConfigured,
}

pub async fn run(client: kube::Client, args: &CorednsArgs) -> Result<Outcome, CorednsError> {
    let ns = &args.coredns_namespace;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client, ns);
    let get_error = |what, name: &str| {
        let (namespace, name) = (ns.clone(), name.to_owned());
        move |source| CorednsError::Get { what, namespace, name, source: Box::new(source) }
    };
    let mut configmap = configmaps
        .get(&args.coredns_configmap_name)
        .await
        .map_err(get_error("ConfigMap", &args.coredns_configmap_name))?;
    let deployment = deployments
        .get(&args.coredns_deployment_name)
        .await
        .map_err(get_error("Deployment", &args.coredns_deployment_name))?;

    let image = deployment
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .and_then(|pod| pod.containers.first())
        .and_then(|container| container.image.clone())
        .unwrap_or_default();
    match image_version(&image) {
        Some(version) if version < MIN_COREDNS => {
            return Err(CorednsError::TooOld(format!("{}.{}.{}", version.0, version.1, version.2)));
        }
        Some(_) => {}
        None => tracing::warn!(%image, "cannot read the CoreDNS version from its image tag; not checking it"),
    }

    let configmap_name = format!("{ns}/{}", args.coredns_configmap_name);
    let data = configmap.data.get_or_insert_with(Default::default);
    let corefile = data.get("Corefile").cloned().ok_or_else(|| CorednsError::NoCorefile(configmap_name.clone()))?;
    let Some(updated) = update_corefile(&args.coredns_cluster_domain, &args.coredns_clusterset_domain, &corefile)?
    else {
        tracing::info!("CoreDNS already has an MCS-API configuration; nothing to do");
        return Ok(Outcome::AlreadyConfigured);
    };
    data.insert("Corefile.cilium.bak".to_owned(), corefile);
    data.insert("Corefile".to_owned(), updated);
    configmaps
        .replace(&args.coredns_configmap_name, &PostParams::default(), &configmap)
        .await
        .map_err(|e| CorednsError::Update(configmap_name, Box::new(e)))?;
    tracing::info!("CoreDNS ConfigMap updated");

    let deployment_name = format!("{ns}/{}", args.coredns_deployment_name);
    if deployment.spec.as_ref().and_then(|s| s.paused).unwrap_or(false) {
        return Err(CorednsError::Paused(deployment_name));
    }
    let now = crate::sync::rfc3339_now();
    let stamp = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": args.coredns_deployment_name, "namespace": ns},
        "spec": {"template": {"metadata": {"annotations": {AUTO_PATCHED_ANNOTATION: now}}}},
    });
    deployments
        .patch(&args.coredns_deployment_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(stamp))
        .await
        .map_err(|e| CorednsError::Rollout(deployment_name, Box::new(e)))?;
    tracing::info!("CoreDNS is rolling out with the new configuration");
    Ok(Outcome::Configured)
}

/// `major.minor.patch` of an image tag like `registry.k8s.io/coredns/coredns:v1.12.2`, ignoring a
/// digest and any `-suffix` of a custom build.
fn image_version(image: &str) -> Option<(u64, u64, u64)> {
    let name = image.split('@').next()?;
    let tag = name.rsplit_once('/').map_or(name, |(_, last)| last).split_once(':')?.1;
    let tag = tag.split('-').next()?.trim_start_matches('v');
    let mut parts = tag.split('.').map(|p| p.parse::<u64>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(version)
}

/// The Corefile with the clusterset domain served, or `None` when it already is (or uses the
/// `multicluster` plugin).
fn update_corefile(cluster: &str, clusterset: &str, corefile: &str) -> Result<Option<String>, CorednsError> {
    if corefile.contains(clusterset) || corefile.contains("multicluster") {
        return Ok(None);
    }
    let is_kubernetes_block = |line: &str| line.trim_start().starts_with("kubernetes") && line.rfind('{').is_some();
    let serves_cluster = corefile
        .lines()
        .any(|line| is_kubernetes_block(line) && line.find(cluster).is_some_and(|at| line[at..].contains('{')));
    if !serves_cluster {
        return Err(CorednsError::NoKubernetesBlock(cluster.to_owned()));
    }
    let widened = corefile.replace(cluster, &format!("{cluster} {clusterset}"));
    let mut out = String::with_capacity(widened.len() + 64);
    for line in widened.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        if is_kubernetes_block(body) {
            let indent = &body[..body.len() - body.trim_start().len()];
            let brace = body.rfind('{').expect("a kubernetes block line has a brace");
            out.push_str(&body[..=brace]);
            out.push('\n');
            out.push_str(&format!("{indent}   multicluster {clusterset}"));
            out.push_str(&line[brace + 1..]);
        } else {
            out.push_str(line);
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBEADM_COREFILE: &str = ".:53 {\n    errors\n    health {\n       lameduck 5s\n    }\n    ready\n    \
        kubernetes cluster.local in-addr.arpa ip6.arpa {\n       pods insecure\n       fallthrough in-addr.arpa ip6.arpa\n       \
        ttl 30\n    }\n    forward . /etc/resolv.conf\n    cache 30\n}\n";

    #[test]
    fn the_kubernetes_block_serves_the_clusterset_domain_with_the_multicluster_plugin() {
        let updated = update_corefile("cluster.local", "clusterset.local", KUBEADM_COREFILE).unwrap().unwrap();
        assert!(
            updated.contains(
                "    kubernetes cluster.local clusterset.local in-addr.arpa ip6.arpa {\n       multicluster clusterset.local\n       pods insecure\n"
            ),
            "{updated}"
        );
        assert_eq!(updated.lines().count(), KUBEADM_COREFILE.lines().count() + 1);
        // A second run finds it done.
        assert!(update_corefile("cluster.local", "clusterset.local", &updated).unwrap().is_none());
    }

    #[test]
    fn a_corefile_without_a_kubernetes_block_for_the_cluster_domain_is_refused() {
        let error = update_corefile("cluster.local", "clusterset.local", ".:53 {\n    forward . 8.8.8.8\n}\n");
        assert!(matches!(error, Err(CorednsError::NoKubernetesBlock(_))));
    }

    #[test]
    fn versions_are_read_from_image_tags() {
        assert_eq!(image_version("registry.k8s.io/coredns/coredns:v1.12.2"), Some((1, 12, 2)));
        assert_eq!(image_version("localhost:5000/coredns:1.11.3-custom@sha256:ab"), Some((1, 11, 3)));
        assert_eq!(image_version("coredns/coredns:latest"), None);
        assert_eq!(image_version("coredns"), None);
    }
}
