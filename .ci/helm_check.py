"""The checks of .ci/helm-check, run by it in a virtualenv with helm-python-sdk and PyYAML.

Helm's own engine lints and renders helm/clustermesh-apiserver for several value sets, and the
rendered objects are checked to hang together; the flags the chart and docker/compose.yaml pass
must exist in the binary; the default rendering's apiserver container is run with its rendered
args; docker/Dockerfile and docker/compose.yaml are checked for their shape. See .ci/helm-check
for the environment it reads.
"""
import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import yaml
import helm_python as helm

CHART = "helm/clustermesh-apiserver"
NAMESPACE = "kube-system"
RELEASE = "clustermesh-apiserver"
BIN = os.environ.get("CLUSTERMESH_APISERVER_BIN") or None
APP_VERSION = yaml.safe_load(open(os.path.join(CHART, "Chart.yaml")))["appVersion"]

counts = {"passed": 0, "failed": 0, "skipped": 0}


def check(name, ok, detail=""):
    if ok:
        counts["passed"] += 1
        print(f"ok    {name}")
    else:
        counts["failed"] += 1
        print(f"FAIL  {name}" + (f": {detail}" if detail else ""))
    return ok


def skip(name, why):
    counts["skipped"] += 1
    print(f"skip  {name}: {why}")


def guarded(name, fn, *args):
    """Runs a group of checks; an exception inside counts as one failure."""
    try:
        fn(*args)
    except Exception as error:  # noqa: BLE001 - a crash of a check is a failed check
        check(name, False, f"{type(error).__name__}: {error}")


# --------------------------------------------------------------------------- the chart

SCENARIOS = {
    "default": None,
    "ha-certmanager-servicemonitor-kvstoremesh": {
        "cluster": {"name": "mesh-a", "id": 7},
        "clustermesh": {
            "config": {
                "enabled": True,
                "clusters": [
                    {"name": "mesh-a", "port": 2379, "ips": ["10.0.0.1"]},
                    {"name": "mesh-b", "port": 32379, "ips": ["10.1.0.1", "10.1.0.2"]},
                    {
                        "name": "mesh-c",
                        "address": "mesh-c.example.net",
                        "port": 2379,
                        "tls": {"cert": "Y2VydA==", "key": "a2V5", "caCert": "Y2E="},
                    },
                ],
            },
            "apiserver": {
                "replicas": 3,
                "service": {
                    "type": "LoadBalancer",
                    "annotations": {"service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"},
                },
                "tls": {"auto": {"method": "certmanager"}},
                "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
                "kvstoremesh": {"enabled": True},
                "podDisruptionBudget": {"enabled": True},
                "topologySpreadConstraints": [
                    {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
                ],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
            },
        },
        "logOptions": {"format": "json"},
    },
    "cronjob-authmode-cluster": {
        "cluster": {"name": "mesh-a", "id": 7},
        "clustermesh": {
            "apiserver": {
                "tls": {"authMode": "cluster", "auto": {"method": "cronJob"}},
                "metrics": {"enabled": False, "etcd": {"enabled": False}},
            }
        },
    },
    "authmode-legacy": {
        "clustermesh": {"apiserver": {"tls": {"authMode": "legacy"}}},
    },
    "provided-certificates-cabundle": {
        "tls": {"caBundle": {"enabled": True, "name": "mesh-ca-bundle", "key": "bundle.crt"}},
        "clustermesh": {
            "apiserver": {
                "tls": {
                    "auto": {"enabled": False},
                    "ca": {"cert": "Y2E="},
                    "server": {"cert": "c2VydmVy", "key": "a2V5"},
                    "admin": {"cert": "YWRtaW4=", "key": "a2V5"},
                    "remote": {"cert": "cmVtb3Rl", "key": "a2V5"},
                },
                "service": {"type": "ClusterIP", "enableSessionAffinity": "Always"},
            }
        },
    },
    "peers-as-map-kvstoremesh": {
        "clustermesh": {
            "config": {
                "enabled": True,
                "clusters": {
                    "peer-one": {"ips": ["10.2.0.1"], "port": 2379},
                    "peer-off": {"enabled": False, "ips": ["10.3.0.1"], "port": 2379},
                },
            },
            "apiserver": {"kvstoremesh": {"enabled": True}},
        }
    },
}

INVALID = {
    "cluster.id 0": {"cluster": {"id": 0}},
    "cluster.id above maxConnectedClusters": {"cluster": {"id": 300}},
    "cluster.name with capitals": {"cluster": {"name": "Cluster_1"}},
    "maxConnectedClusters 300": {"clustermesh": {"maxConnectedClusters": 300}},
    "unknown tls.authMode": {"clustermesh": {"apiserver": {"tls": {"authMode": "open"}}}},
    "unknown tls.auto.method": {"clustermesh": {"apiserver": {"tls": {"auto": {"method": "vault"}}}}},
}

API_VERSIONS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "Secret": "v1",
    "ConfigMap": "v1",
    "ServiceAccount": "v1",
    "ClusterRole": "rbac.authorization.k8s.io/v1",
    "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "PodDisruptionBudget": "policy/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "Certificate": "cert-manager.io/v1",
    "Issuer": "cert-manager.io/v1",
    "Job": "batch/v1",
    "CronJob": "batch/v1",
}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
LEAF_SECRETS = [f"clustermesh-apiserver-{role}-cert" for role in ("server", "admin", "remote", "local")]
WATCHED = {
    ("cilium.io", "ciliumnodes"),
    ("cilium.io", "ciliumidentities"),
    ("cilium.io", "ciliumendpoints"),
    ("cilium.io", "ciliumendpointslices"),
    ("", "services"),
    ("", "namespaces"),
    ("discovery.k8s.io", "endpointslices"),
    ("multicluster.x-k8s.io", "serviceexports"),
}


def merged_values(overrides):
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(overrides)


def render(values):
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def parse_documents(scenario, rendered):
    """Every rendered document, as Kubernetes objects; checks the generic shape."""
    objects = []
    problems = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as error:
            problems.append(f"{path}: not YAML: {error}")
            continue
        for doc in docs:
            if doc is None:
                continue
            if not isinstance(doc, dict):
                problems.append(f"{path}: a document that is not a mapping")
                continue
            meta = doc.get("metadata")
            kind = doc.get("kind")
            name = meta.get("name") if isinstance(meta, dict) else None
            if not (isinstance(doc.get("apiVersion"), str) and isinstance(kind, str) and isinstance(name, str)):
                problems.append(f"{path}: missing apiVersion, kind or metadata.name")
                continue
            if not DNS_SUBDOMAIN.match(name):
                problems.append(f"{path}: {kind} name {name!r} is not a DNS subdomain")
            expected_api = API_VERSIONS.get(kind)
            if expected_api is None:
                problems.append(f"{path}: unexpected kind {kind}")
            elif doc["apiVersion"] != expected_api:
                problems.append(f"{path}: {kind} has apiVersion {doc['apiVersion']}, expected {expected_api}")
            namespace = meta.get("namespace")
            if kind in CLUSTER_SCOPED and namespace is not None:
                problems.append(f"{path}: cluster-scoped {kind} {name} has a namespace")
            if kind not in CLUSTER_SCOPED and namespace != NAMESPACE:
                problems.append(f"{path}: {kind} {name} has namespace {namespace!r}, expected {NAMESPACE}")
            for field in ("labels", "annotations"):
                for key, value in (meta.get(field) or {}).items():
                    if not isinstance(value, str):
                        problems.append(f"{path}: {kind} {name} {field}[{key}] is not a string: {value!r}")
            if kind == "Secret":
                for key, value in (doc.get("data") or {}).items():
                    try:
                        base64.b64decode(str(value), validate=True)
                    except Exception:  # noqa: BLE001
                        problems.append(f"{path}: Secret {name} data[{key}] is not base64")
            doc["_path"] = path
            objects.append(doc)
    seen = {}
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in seen:
            problems.append(f"{obj['kind']} {key[3]} rendered twice ({seen[key]} and {obj['_path']})")
        seen[key] = obj["_path"]
    check(f"[{scenario}] {len(objects)} rendered documents are Kubernetes objects", not problems, "; ".join(problems))
    return objects


def find(objects, kind, name):
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return matches[0] if matches else None


def kinds(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def flag_value(args, flag):
    for arg in args:
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def resolve_port(container, port):
    """A probe or Service port (name or number) → the container port number, or None."""
    for declared in container.get("ports") or []:
        if declared.get("name") == port or declared.get("containerPort") == port:
            return declared["containerPort"]
    return None


def b64(secret, key):
    return base64.b64decode(secret["data"][key]).decode()


def decode_cert(pem):
    with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as f:
        f.write(pem)
    try:
        return ssl._ssl._test_decode_cert(f.name)  # stdlib X.509 decoder (subject, SANs, issuer)
    finally:
        os.unlink(f.name)


def common_name(decoded, field="subject"):
    for rdn in decoded[field]:
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def check_deployment(scenario, values, objects):
    api = values["clustermesh"]["apiserver"]
    deployment = find(objects, "Deployment", "clustermesh-apiserver")
    if not check(f"[{scenario}] Deployment clustermesh-apiserver", deployment is not None):
        return None
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    want = ["apiserver"] + (["kvstoremesh"] if api["kvstoremesh"]["enabled"] else [])
    check(f"[{scenario}] containers are {want}, no etcd sidecar, no init container",
          [c["name"] for c in pod["containers"]] == want and not pod.get("initContainers"),
          f"containers {[c['name'] for c in pod['containers']]}, init {pod.get('initContainers')}")
    check(f"[{scenario}] replicas {api['replicas']}", spec["replicas"] == api["replicas"], str(spec["replicas"]))
    labels = spec["template"]["metadata"]["labels"]
    check(f"[{scenario}] selector matches the pod labels",
          all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items()))

    psc = pod.get("securityContext") or {}
    check(f"[{scenario}] pod runs as 65532, runAsNonRoot",
          psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532 and psc.get("runAsGroup") == 65532
          and psc.get("fsGroup") == 65532, str(psc))
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for name, container in containers.items():
        sc = container.get("securityContext") or {}
        check(f"[{scenario}] {name}: read-only root fs, no privilege escalation, all capabilities dropped",
              sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
              and "ALL" in ((sc.get("capabilities") or {}).get("drop") or []), str(sc))
        check(f"[{scenario}] {name}: command /usr/bin/clustermesh-apiserver, image {APP_VERSION}",
              container["command"] == ["/usr/bin/clustermesh-apiserver"]
              and container["image"] == f"clustermesh-apiserver:{APP_VERSION}", f"{container['command']} {container['image']}")
        missing = [m["name"] for m in container.get("volumeMounts") or [] if m["name"] not in volumes]
        check(f"[{scenario}] {name}: every volumeMount has a volume", not missing, str(missing))
        check(f"[{scenario}] {name}: args are all strings", all(isinstance(a, str) for a in container["args"]))

    apiserver = containers["apiserver"]
    args = apiserver["args"]
    check(f"[{scenario}] apiserver runs `clustermesh` with --cluster-name and --cluster-id",
          args[0] == "clustermesh" and flag_value(args, "--cluster-name") == values["cluster"]["name"]
          and flag_value(args, "--cluster-id") == str(values["cluster"]["id"]), str(args))
    health = api["healthPort"]
    check(f"[{scenario}] apiserver --health-port={health}", flag_value(args, "--health-port") == str(health))
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = (apiserver.get(probe) or {}).get("httpGet") or {}
        check(f"[{scenario}] apiserver {probe} is GET {path} on the health port {health}",
              get.get("path") == path and resolve_port(apiserver, get.get("port")) == health, str(get))
    check(f"[{scenario}] apiserver serves the store on 2379 (containerPort etcd, --listen-client-urls)",
          resolve_port(apiserver, "etcd") == 2379
          and all(u.endswith(":2379") for u in (flag_value(args, "--listen-client-urls") or "x").split(",")),
          flag_value(args, "--listen-client-urls") or "no --listen-client-urls")
    mounts = {m["mountPath"]: m["name"] for m in apiserver.get("volumeMounts") or []}
    cert_dir = os.path.dirname(flag_value(args, "--cert-file") or "")
    check(f"[{scenario}] --cert-file/--key-file/--trusted-ca-file live in the server-cert volume",
          cert_dir in mounts and all(os.path.dirname(flag_value(args, f) or "") == cert_dir
                                     for f in ("--key-file", "--trusted-ca-file")), f"{cert_dir} {mounts}")
    sources = volumes.get(mounts.get(cert_dir), {}).get("projected", {}).get("sources", [])
    check(f"[{scenario}] the store's certificate volume projects clustermesh-apiserver-server-cert",
          any((s.get("secret") or {}).get("name") == "clustermesh-apiserver-server-cert" for s in sources), str(sources))
    metrics = api["metrics"]
    check(f"[{scenario}] apiserver metrics flag follows metrics.enabled",
          flag_value(args, "--prometheus-serve-addr") == (f":{metrics['port']}" if metrics["enabled"] else ""))
    check(f"[{scenario}] store metrics flag follows metrics.etcd.enabled",
          (flag_value(args, "--listen-metrics-urls") or "").endswith(f":{metrics['etcd']['port']}")
          if metrics["etcd"]["enabled"] else flag_value(args, "--listen-metrics-urls") is None)
    users_path = flag_value(args, "--cluster-users-config-path")
    if api["tls"]["authMode"] != "legacy":
        users_mount = mounts.get(os.path.dirname(users_path or ""))
        check(f"[{scenario}] --cluster-users-enabled reads users.yaml from the mounted ConfigMap clustermesh-remote-users",
              "--cluster-users-enabled" in args and users_path == "/var/lib/cilium/etcd-config/users.yaml"
              and (volumes.get(users_mount) or {}).get("configMap", {}).get("name") == "clustermesh-remote-users",
              f"{users_path} {mounts}")
    else:
        check(f"[{scenario}] authMode legacy: no users management, no users volume",
              "--cluster-users-enabled" not in args and users_path is None and "etcd-users-config" not in volumes)
    env = {e["name"]: e for e in apiserver.get("env") or []}
    check(f"[{scenario}] HOSTNAME_IP comes from status.podIP",
          env.get("HOSTNAME_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP")
    check(f"[{scenario}] serviceAccountName {values['serviceAccounts']['clustermeshApiserver']['name']}",
          pod.get("serviceAccountName") == values["serviceAccounts"]["clustermeshApiserver"]["name"])
    for constraint in pod.get("topologySpreadConstraints") or []:
        check(f"[{scenario}] topologySpreadConstraint on {constraint.get('topologyKey')} selects the pods",
              (constraint.get("labelSelector") or {}).get("matchLabels") == {"k8s-app": "clustermesh-apiserver"})

    if api["kvstoremesh"]["enabled"]:
        kvm = containers["kvstoremesh"]
        kargs = kvm["args"]
        kport = api["kvstoremesh"]["healthPort"]
        check(f"[{scenario}] kvstoremesh runs `kvstoremesh` with --cluster-name/--cluster-id and the peers directory",
              kargs[0] == "kvstoremesh" and flag_value(kargs, "--cluster-name") == values["cluster"]["name"]
              and flag_value(kargs, "--clustermesh-config") == "/var/lib/cilium/clustermesh", str(kargs))
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
            get = (kvm.get(probe) or {}).get("httpGet") or {}
            check(f"[{scenario}] kvstoremesh {probe} is GET {path} on {kport}",
                  get.get("path") == path and resolve_port(kvm, get.get("port")) == kport
                  and flag_value(kargs, "--health-port") == str(kport), str(get))
        kmounts = {m["mountPath"]: m["name"] for m in kvm.get("volumeMounts") or []}
        image_config = yaml.safe_load(open("docker/etcd-config.yaml"))
        check(f"[{scenario}] kvstoremesh's etcd.config (baked in the image) points at mounted admin certificates",
              flag_value(kargs, "--kvstore-opt") == "etcd.config=/var/lib/cilium/etcd-config.yaml"
              and all(os.path.dirname(image_config[k]) in kmounts for k in ("trusted-ca-file", "cert-file", "key-file"))
              and "clustermesh-apiserver-admin-cert" in json.dumps(volumes[kmounts[os.path.dirname(image_config["cert-file"])]]),
              str(kmounts))
        if values["clustermesh"]["config"]["enabled"]:
            aliases = {h for a in pod.get("hostAliases") or [] for h in a["hostnames"]}
            check(f"[{scenario}] hostAliases name the peers that have IPs, not this cluster",
                  values["cluster"]["name"] + ".mesh.cilium.io" not in aliases and aliases, str(aliases))
    return deployment


def check_services(scenario, values, objects, deployment):
    api = values["clustermesh"]["apiserver"]
    pod = deployment["spec"]["template"]
    containers = pod["spec"]["containers"]
    service = find(objects, "Service", "clustermesh-apiserver")
    if not check(f"[{scenario}] Service clustermesh-apiserver", service is not None):
        return
    ports = service["spec"]["ports"]
    check(f"[{scenario}] Service port 2379 → container port 2379",
          len(ports) == 1 and ports[0]["port"] == 2379
          and resolve_port(containers[0], ports[0].get("targetPort", 2379)) == 2379, str(ports))
    check(f"[{scenario}] Service type {api['service']['type']}", service["spec"]["type"] == api["service"]["type"])
    if api["service"]["type"] == "NodePort":
        check(f"[{scenario}] NodePort {api['service']['nodePort']}", ports[0].get("nodePort") == api["service"]["nodePort"])
    affinity = api["service"]["enableSessionAffinity"] == "Always" or (
        api["service"]["enableSessionAffinity"] == "HAOnly" and api["replicas"] > 1)
    check(f"[{scenario}] sessionAffinity {'ClientIP' if affinity else 'unset'}",
          service["spec"].get("sessionAffinity") == ("ClientIP" if affinity else None), str(service["spec"].get("sessionAffinity")))
    for key, value in (api["service"]["annotations"] or {}).items():
        check(f"[{scenario}] Service annotation {key}", service["metadata"]["annotations"].get(key) == value)
    selector = service["spec"]["selector"]
    check(f"[{scenario}] Service selects the pods", all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items()))

    metrics = api["metrics"]
    kvm_metrics = api["kvstoremesh"]["enabled"] and metrics["kvstoremesh"]["enabled"]
    want = [n for n, on in (("apiserv-metrics", metrics["enabled"]), ("kvmesh-metrics", kvm_metrics),
                            ("etcd-metrics", metrics["etcd"]["enabled"])) if on]
    msvc = find(objects, "Service", "clustermesh-apiserver-metrics")
    if not want:
        check(f"[{scenario}] no metrics Service when every metrics port is off", msvc is None)
        return
    if not check(f"[{scenario}] headless Service clustermesh-apiserver-metrics",
                 msvc is not None and msvc["spec"].get("clusterIP") == "None"):
        return
    names = [p["name"] for p in msvc["spec"]["ports"]]
    check(f"[{scenario}] metrics Service ports {want}", names == want, str(names))
    container_ports = {p["name"] for c in containers for p in c.get("ports") or []}
    check(f"[{scenario}] metrics Service targetPorts are container ports",
          all(p["targetPort"] in container_ports for p in msvc["spec"]["ports"]))
    monitors = kinds(objects, "ServiceMonitor")
    if metrics["serviceMonitor"]["enabled"]:
        if check(f"[{scenario}] ServiceMonitor clustermesh-apiserver", len(monitors) == 1):
            monitor = monitors[0]
            labels = msvc["metadata"]["labels"]
            check(f"[{scenario}] ServiceMonitor selects the metrics Service",
                  all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()))
            check(f"[{scenario}] ServiceMonitor endpoints are the metrics Service ports",
                  [e["port"] for e in monitor["spec"]["endpoints"]] == names)
            for key, value in metrics["serviceMonitor"]["labels"].items():
                check(f"[{scenario}] ServiceMonitor label {key}", monitor["metadata"]["labels"].get(key) == value)
    else:
        check(f"[{scenario}] no ServiceMonitor", not monitors)


def check_rbac_and_pdb(scenario, values, objects, deployment):
    role = find(objects, "ClusterRole", "clustermesh-apiserver")
    if check(f"[{scenario}] ClusterRole clustermesh-apiserver", role is not None):
        granted = set()
        verbs_ok = True
        for rule in role["rules"]:
            verbs_ok &= sorted(rule["verbs"]) == ["get", "list", "watch"]
            granted |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
        check(f"[{scenario}] ClusterRole grants get/list/watch on exactly the watched resources",
              verbs_ok and granted == WATCHED, f"extra {granted - WATCHED}, missing {WATCHED - granted}")
    binding = find(objects, "ClusterRoleBinding", "clustermesh-apiserver")
    sa_name = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    check(f"[{scenario}] ClusterRoleBinding binds the pod's ServiceAccount, which is rendered",
          binding is not None and binding["roleRef"]["name"] == "clustermesh-apiserver"
          and binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}]
          and find(objects, "ServiceAccount", sa_name) is not None)
    pdb = find(objects, "PodDisruptionBudget", "clustermesh-apiserver")
    if values["clustermesh"]["apiserver"]["podDisruptionBudget"]["enabled"]:
        check(f"[{scenario}] PodDisruptionBudget maxUnavailable 1 selects the pods",
              pdb is not None and pdb["spec"].get("maxUnavailable") == 1
              and pdb["spec"]["selector"]["matchLabels"] == {"k8s-app": "clustermesh-apiserver"}, str(pdb and pdb["spec"]))
    else:
        check(f"[{scenario}] no PodDisruptionBudget", pdb is None)


def check_tls(scenario, values, objects):
    tls = values["clustermesh"]["apiserver"]["tls"]
    name = values["cluster"]["name"]
    remote_cn = f"remote-{name}" if tls["authMode"] == "cluster" else "remote"
    cns = {"admin": f"admin-{name}", "remote": remote_cn, "local": f"local-{name}"}
    server_dns = ["clustermesh-apiserver.cilium.io", "*.mesh.cilium.io", f"clustermesh-apiserver.{NAMESPACE}.svc"]
    secrets = {s["metadata"]["name"]: s for s in kinds(objects, "Secret")}
    method = tls["auto"]["method"] if tls["auto"]["enabled"] else "provided"
    if method == "helm":
        check(f"[{scenario}] helm method renders the CA and the four certificate Secrets",
              all(n in secrets for n in LEAF_SECRETS + ["clustermesh-apiserver-ca-cert"]), str(sorted(secrets)))
        ca_pem = b64(secrets["clustermesh-apiserver-ca-cert"], "ca.crt")
        server = decode_cert(b64(secrets["clustermesh-apiserver-server-cert"], "tls.crt"))
        sans = {v for _, v in server.get("subjectAltName", ())}
        check(f"[{scenario}] server certificate: CN clustermesh-apiserver.cilium.io and Cilium's SANs",
              common_name(server) == "clustermesh-apiserver.cilium.io"
              and set(server_dns + ["127.0.0.1"]) <= sans and ("::1" in sans or "0:0:0:0:0:0:0:1" in sans), str(sans))
        for role, cn in cns.items():
            secret = secrets[f"clustermesh-apiserver-{role}-cert"]
            cert = decode_cert(b64(secret, "tls.crt"))
            check(f"[{scenario}] {role} certificate: CN {cn}, issued by Cilium CA, with the CA as ca.crt",
                  common_name(cert) == cn and common_name(cert, "issuer") == "Cilium CA"
                  and b64(secret, "ca.crt") == ca_pem and secret["type"] == "kubernetes.io/tls")
        openssl = shutil.which("openssl")
        if openssl:
            with tempfile.TemporaryDirectory() as tmp:
                ca = os.path.join(tmp, "ca.crt")
                open(ca, "w").write(ca_pem)
                bad = []
                for secret_name in LEAF_SECRETS:
                    leaf = os.path.join(tmp, secret_name)
                    open(leaf, "w").write(b64(secrets[secret_name], "tls.crt"))
                    result = subprocess.run([openssl, "verify", "-CAfile", ca, leaf], capture_output=True, text=True)
                    if result.returncode != 0:
                        bad.append(f"{secret_name}: {result.stdout}{result.stderr}")
                check(f"[{scenario}] every certificate verifies against the CA (openssl verify)", not bad, "; ".join(bad))
        else:
            skip(f"[{scenario}] openssl verify of the certificates", "openssl not installed")
    elif method == "certmanager":
        certificates = {c["metadata"]["name"]: c for c in kinds(objects, "Certificate")}
        check(f"[{scenario}] certmanager method: one Certificate per Secret, no Helm-made leaf Secrets",
              sorted(certificates) == sorted(LEAF_SECRETS) and not (set(LEAF_SECRETS) & set(secrets))
              and all(c["spec"]["secretName"] == n for n, c in certificates.items()), str(sorted(certificates)))
        server = certificates.get("clustermesh-apiserver-server-cert", {"spec": {}})["spec"]
        check(f"[{scenario}] server Certificate: Cilium's DNS names and IPs, server auth",
              server.get("commonName") == "clustermesh-apiserver.cilium.io" and server.get("dnsNames") == server_dns
              and server.get("ipAddresses") == ["127.0.0.1", "::1"] and "server auth" in server.get("usages", []), str(server))
        for role, cn in cns.items():
            spec = certificates.get(f"clustermesh-apiserver-{role}-cert", {"spec": {}})["spec"]
            check(f"[{scenario}] {role} Certificate: CN {cn}, client auth",
                  spec.get("commonName") == cn and "client auth" in spec.get("usages", []), str(spec))
        issuer = find(objects, "Issuer", "clustermesh-apiserver-issuer")
        ca_secret = secrets.get("clustermesh-apiserver-ca-cert")
        check(f"[{scenario}] Certificates use the chart's CA Issuer, whose Secret has tls.crt/tls.key",
              issuer is not None and issuer["spec"]["ca"]["secretName"] == "clustermesh-apiserver-ca-cert"
              and ca_secret is not None and {"tls.crt", "tls.key", "ca.crt"} <= set(ca_secret["data"])
              and all(c["spec"]["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer",
                                                 "name": "clustermesh-apiserver-issuer"} for c in certificates.values()))
        duration = f"{tls['auto']['certValidityDuration'] * 24}h0m0s"
        check(f"[{scenario}] Certificates last certValidityDuration ({duration})",
              all(c["spec"]["duration"] == duration for c in certificates.values()))
    elif method == "cronJob":
        job = find(objects, "Job", "clustermesh-apiserver-generate-certs")
        cron = find(objects, "CronJob", "clustermesh-apiserver-generate-certs")
        check(f"[{scenario}] cronJob method: post-install Job and CronJob on schedule {tls['auto']['schedule']}",
              job is not None and cron is not None
              and job["metadata"]["annotations"].get("helm.sh/hook") == "post-install,post-upgrade"
              and cron["spec"]["schedule"] == tls["auto"]["schedule"])
        for obj in (job, cron):
            if obj is None:
                continue
            spec = obj["spec"] if obj["kind"] == "Job" else obj["spec"]["jobTemplate"]["spec"]
            container = spec["template"]["spec"]["containers"][0]
            config = yaml.safe_load(next(e["value"] for e in container["env"] if e["name"] == "CILIUM_CERTGEN_CONFIG"))
            got = {c["name"]: c for c in config["certs"]}
            check(f"[{scenario}] {obj['kind']} certgen config: four Secrets with the right common names",
                  sorted(got) == sorted(LEAF_SECRETS)
                  and all(got[f"clustermesh-apiserver-{r}-cert"]["commonName"] == cn for r, cn in cns.items())
                  and set(server_dns + ["127.0.0.1", "::1"]) <= set(got["clustermesh-apiserver-server-cert"]["hosts"]),
                  json.dumps(config)[:400])
            check(f"[{scenario}] {obj['kind']} runs as the certgen ServiceAccount",
                  spec["template"]["spec"]["serviceAccountName"] == values["serviceAccounts"]["clustermeshcertgen"]["name"])
        role = find(objects, "Role", "clustermesh-apiserver-generate-certs")
        updatable = {n for r in (role or {}).get("rules", []) if "update" in r["verbs"] for n in r.get("resourceNames", [])}
        check(f"[{scenario}] certgen Role may create Secrets and update the four certificate Secrets",
              role is not None and set(LEAF_SECRETS) <= updatable
              and any("create" in r["verbs"] and not r.get("resourceNames") for r in role["rules"]), str(updatable))
        check(f"[{scenario}] certgen RoleBinding and ServiceAccount",
              find(objects, "RoleBinding", "clustermesh-apiserver-generate-certs") is not None
              and find(objects, "ServiceAccount", values["serviceAccounts"]["clustermeshcertgen"]["name"]) is not None)
    else:
        check(f"[{scenario}] provided certificates: inline server/admin/remote Secrets rendered",
              all(f"clustermesh-apiserver-{r}-cert" in secrets for r in ("server", "admin", "remote"))
              and b64(secrets["clustermesh-apiserver-server-cert"], "tls.crt") == "server")
    if values["tls"]["caBundle"]["enabled"]:
        deployment = find(objects, "Deployment", "clustermesh-apiserver")
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "etcd-server-secrets")
        sources = volume["projected"]["sources"]
        check(f"[{scenario}] caBundle replaces ca.crt of the server Secret",
              any((s.get("configMap") or {}).get("name") == values["tls"]["caBundle"]["name"] for s in sources)
              and all("ca.crt" not in [i["path"] for i in (s.get("secret") or {}).get("items", [])] for s in sources))


def check_peers(scenario, values, objects):
    api = values["clustermesh"]["apiserver"]
    users = find(objects, "ConfigMap", "clustermesh-remote-users")
    peers_value = values["clustermesh"]["config"]["clusters"]
    if isinstance(peers_value, dict):
        peers = [dict(v, name=k) for k, v in sorted(peers_value.items()) if v.get("enabled", True) is not False]
    else:
        peers = list(peers_value)
    remote_peers = [p for p in peers if p["name"] != values["cluster"]["name"]]
    if api["tls"]["authMode"] != "legacy":
        if check(f"[{scenario}] ConfigMap clustermesh-remote-users", users is not None):
            listed = yaml.safe_load(users["data"]["users.yaml"])["users"] or []
            want = ([f"remote-{values['cluster']['name']}"] if api["kvstoremesh"]["enabled"] else []) + \
                   [f"remote-{p['name']}" for p in remote_peers]
            check(f"[{scenario}] users.yaml lists {want}",
                  [u["name"] for u in listed] == want and all(u["role"] == "remote" for u in listed), str(listed))
    secret = find(objects, "Secret", "cilium-kvstoremesh")
    if api["kvstoremesh"]["enabled"] and values["clustermesh"]["config"]["enabled"]:
        if not check(f"[{scenario}] Secret cilium-kvstoremesh", secret is not None):
            return
        data = secret.get("data") or {}
        configs = {k: yaml.safe_load(b64(secret, k)) for k in data if "." not in k}
        check(f"[{scenario}] cilium-kvstoremesh has one configuration per remote peer",
              sorted(configs) == sorted(p["name"] for p in remote_peers), str(sorted(data)))
        for peer in remote_peers:
            config = configs.get(peer["name"]) or {}
            host = peer.get("address") or f"{peer['name']}.mesh.cilium.io"
            own = bool((peer.get("tls") or {}).get("cert"))
            files = [config.get(k, "") for k in ("trusted-ca-file", "cert-file", "key-file")]
            check(f"[{scenario}] peer {peer['name']}: endpoint https://{host}:{peer['port']}, files in the mounted directory",
                  config.get("endpoints") == [f"https://{host}:{peer['port']}"]
                  and all(f.startswith("/var/lib/cilium/clustermesh/") for f in files)
                  and (not own or (f"{peer['name']}.etcd-client.crt" in data and config["cert-file"].endswith(f"/{peer['name']}.etcd-client.crt"))),
                  str(config))
    else:
        check(f"[{scenario}] no Secret cilium-kvstoremesh", secret is None)


def chart_checks():
    lint = helm.lint(CHART, strict=True, namespace=NAMESPACE)
    serious = [m for m in lint["messages"] if m["severity"] >= 2] + [{"error": e} for e in lint.get("errors") or []]
    check("helm lint --strict (default values)", not serious, json.dumps(serious))
    for scenario, overrides in SCENARIOS.items():
        if overrides is None:
            continue
        lint = helm.lint(CHART, overrides, strict=True, namespace=NAMESPACE)
        serious = [m for m in lint["messages"] if m["severity"] >= 2] + [{"error": e} for e in lint.get("errors") or []]
        check(f"helm lint --strict ({scenario})", not serious, json.dumps(serious))

    rendered_default = None
    for scenario, overrides in SCENARIOS.items():
        try:
            rendered = render(overrides)
        except helm.HelmError as error:
            check(f"[{scenario}] renders", False, str(error))
            continue
        check(f"[{scenario}] renders", True)
        values = merged_values(overrides)
        objects = parse_documents(scenario, rendered)
        if scenario == "default":
            rendered_default = objects
        deployment = check_deployment(scenario, values, objects)
        if deployment is None:
            continue
        guarded(f"[{scenario}] Service checks", check_services, scenario, values, objects, deployment)
        guarded(f"[{scenario}] RBAC checks", check_rbac_and_pdb, scenario, values, objects, deployment)
        guarded(f"[{scenario}] TLS checks", check_tls, scenario, values, objects)
        guarded(f"[{scenario}] peer checks", check_peers, scenario, values, objects)
        if BIN:
            guarded(f"[{scenario}] flags exist in the binary", check_deployment_flags, scenario, deployment)

    try:
        rendered = render({"clustermesh": {"useAPIServer": False}})
        objects = [d for p, t in rendered.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
        check("clustermesh.useAPIServer=false renders no object", not objects, str([o.get("kind") for o in objects]))
    except helm.HelmError as error:
        check("clustermesh.useAPIServer=false renders", False, str(error))
    for case, overrides in INVALID.items():
        try:
            render(overrides)
            check(f"rendering refuses {case}", False, "rendered without error")
        except helm.HelmError as error:
            check(f"rendering refuses {case}", "execution error" in str(error), str(error))
    return rendered_default


# --------------------------------------------------------------------------- the binary

_help_cache = {}


def binary_flags(*subcommand):
    """Long flags the binary accepts for a subcommand (from --help), or None if it has none."""
    if subcommand not in _help_cache:
        result = subprocess.run([BIN, *subcommand, "--help"], capture_output=True, text=True, timeout=30)
        _help_cache[subcommand] = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", result.stdout)) if result.returncode == 0 else None
    return _help_cache[subcommand]


def check_args(label, args):
    """args = [subcommand..., --flags...]; each --flag must be known to that subcommand."""
    words = []
    for arg in args:
        if arg.startswith("-"):
            break
        words.append(arg)
    flags = binary_flags(*words)
    if flags is None:
        skip(f"{label}: flags of `{' '.join(words)}`", "the binary has no such subcommand yet")
        return
    unknown = [a.split("=", 1)[0] for a in args[len(words):] if a.startswith("--") and a.split("=", 1)[0] not in flags]
    check(f"{label}: every flag of `{' '.join(words)}` exists in the binary", not unknown, str(unknown))


def check_deployment_flags(scenario, deployment):
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        check_args(f"[{scenario}] {container['name']}", container["args"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode(errors="replace")
    except (OSError, IndexError, ValueError):
        return None, ""


def the_chart_runs_the_binary(objects):
    """The default rendering's `apiserver` container, run here: its args as rendered (pod IP
    127.0.0.2, free loopback ports instead of the fixed ones, the helm method's certificates in
    a temporary directory for the mounted Secret, and a directory of manifests instead of the
    Kubernetes API), then its probes, metrics and store, reached with the chart's certificates."""
    etcdctl = shutil.which("etcdctl")
    if not BIN or not etcdctl:
        skip("the rendered apiserver container runs", "needs the binary and etcdctl")
        return
    deployment = find(objects, "Deployment", "clustermesh-apiserver")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    secrets = {s["metadata"]["name"]: s for s in kinds(objects, "Secret")}
    with tempfile.TemporaryDirectory() as tmp:
        for name in LEAF_SECRETS:
            os.mkdir(os.path.join(tmp, name))
            for key in ("tls.crt", "tls.key", "ca.crt"):
                path = os.path.join(tmp, name, key)
                open(path, "w").write(b64(secrets[name], key))
                os.chmod(path, 0o600)
        os.mkdir(os.path.join(tmp, "objects"))
        users_dir = os.path.join(tmp, "etcd-config")
        os.mkdir(users_dir)
        users_config = find(objects, "ConfigMap", "clustermesh-remote-users")
        open(os.path.join(users_dir, "users.yaml"), "w").write(users_config["data"]["users.yaml"])
        store, health, metrics, store_metrics = free_port(), free_port(), free_port(), free_port()
        mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "etcd-server-secrets")
        args = []
        for arg in container["args"]:
            arg = arg.replace("$(HOSTNAME_IP)", "127.0.0.2").replace(mount, os.path.join(tmp, "clustermesh-apiserver-server-cert"))
            arg = arg.replace("/var/lib/cilium/etcd-config/", users_dir + "/")
            arg = arg.replace("/var/run/clustermesh-apiserver", os.path.join(tmp, "store-data"))
            if arg.startswith("--listen-client-urls="):
                arg = arg.replace(":2379", f":{store}")
            elif arg.startswith("--listen-metrics-urls="):
                arg = re.sub(r":\d+$", f":{store_metrics}", arg)
            elif arg.startswith("--health-port="):
                arg = f"--health-port={health}"
            elif arg.startswith("--prometheus-serve-addr="):
                arg = f"--prometheus-serve-addr=127.0.0.1:{metrics}"
            args.append(arg)
        args.append(f"--k8s-objects-dir={os.path.join(tmp, 'objects')}")
        log = open(os.path.join(tmp, "apiserver.log"), "w+")
        process = subprocess.Popen([BIN, *args], stdout=log, stderr=subprocess.STDOUT)

        def tail():
            log.seek(0)
            return log.read()[-2000:]

        try:
            deadline = time.monotonic() + 20
            status, _ = http_get(health, "/readyz")
            while status != 200 and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.2)
                status, _ = http_get(health, "/readyz")
            if not check("the rendered apiserver args start the binary, and /readyz turns 200", status == 200, tail()):
                return
            check("/livez and /healthz answer 200 on the health port",
                  http_get(health, "/livez")[0] == 200 and http_get(health, "/healthz")[0] == 200)
            status, body = http_get(metrics, "/metrics")
            check("metrics port serves cilium_clustermesh_apiserver_*", status == 200 and "cilium_clustermesh_apiserver_" in body)
            status, body = http_get(store_metrics, "/metrics", "127.0.0.2")
            check("store metrics (pod IP) serve etcd_* series", status == 200 and "etcd_" in body, body[:200])

            def ctl(role, *command):
                d = os.path.join(tmp, f"clustermesh-apiserver-{role}-cert")
                return subprocess.run(
                    [etcdctl, f"--endpoints=https://127.0.0.1:{store}", f"--cacert={d}/ca.crt", f"--cert={d}/tls.crt",
                     f"--key={d}/tls.key", "--dial-timeout=3s", "--command-timeout=5s", *command],
                    capture_output=True, text=True, timeout=20, env=dict(os.environ, ETCDCTL_API="3"))

            try:
                socket.create_connection(("127.0.0.2", store), timeout=2).close()
                pod_ip_listener = True
            except OSError:
                pod_ip_listener = False
            check("the store listens on the pod IP too", pod_ip_listener)
            # The loopback listener (what kvstoremesh dials): 127.0.0.1 is a SAN of the server
            # certificate, the pod IP is not (clients use DNS names there).
            name = flag_value(container["args"], "--cluster-name")
            got = ctl("remote", "get", f"cilium/cluster-config/{name}", "--print-value-only")
            check("the remote certificate reads this cluster's config",
                  got.returncode == 0 and got.stdout.strip().startswith("{"), got.stdout + got.stderr)
            denied = ctl("remote", "put", "cilium/state/nodes/v1/x/y", "no")
            check("the remote certificate cannot write", denied.returncode != 0, denied.stdout)
            admin = ctl("admin", "put", "cilium/.probe", "ok")
            check(f"the admin certificate (admin-{name}) writes", admin.returncode == 0, admin.stderr)
            # A peer added to the ConfigMap (as `helm upgrade` does), then removed again: the
            # running server creates and deletes its user; the kubelet swaps files by rename.
            def write_users(names):
                staged = os.path.join(users_dir, "users.yaml.new")
                yaml.safe_dump({"users": [{"name": n, "role": "remote"} for n in names]}, open(staged, "w"))
                os.rename(staged, os.path.join(users_dir, "users.yaml"))

            def wait_user(present):
                deadline = time.monotonic() + 15
                while True:
                    got = ctl("admin", "user", "get", "remote-peer1")
                    if (got.returncode == 0 and "remote" in got.stdout.split()) == present:
                        return True
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.3)

            write_users(["remote-peer1"])
            check("a peer added to users.yaml gets its etcd user (role remote)", wait_user(True), tail())
            write_users([])
            check("a peer removed from users.yaml loses its etcd user", wait_user(False), tail())
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=15)
                check("SIGTERM stops the apiserver cleanly", code == 0, f"exit {code}: {tail()}")
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                check("SIGTERM stops the apiserver cleanly", False, "still running 15 s after SIGTERM")
            log.close()


# --------------------------------------------------------------------------- docker/

def dockerfile_instructions(path):
    lines, current = [], ""
    for raw in open(path):
        line = raw.rstrip("\n")
        if not current and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]


def dockerfile_checks():
    path = "docker/Dockerfile"
    if not check("docker/Dockerfile exists", os.path.isfile(path)):
        return
    instructions = dockerfile_instructions(path)
    args = {}
    stages = []
    for op, rest in instructions:
        if op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif op == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"image": image, "alias": alias, "ops": []})
        elif stages:
            stages[-1]["ops"].append((op, rest))
    known_ops = {"FROM", "RUN", "COPY", "ADD", "ARG", "ENV", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "EXPOSE",
                 "LABEL", "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}
    unknown = [op for op, _ in instructions if op not in known_ops]
    check("Dockerfile: only known instructions", not unknown, str(unknown))
    if not check("Dockerfile: multi-stage (builder and runtime)", len(stages) >= 2, str([s["image"] for s in stages])):
        return
    builder, runtime = stages[0], stages[-1]
    runs = " ".join(rest for op, rest in builder["ops"] if op == "RUN")
    check("Dockerfile: builder is rust:1-bookworm, named", builder["image"] == "rust:1-bookworm" and builder["alias"],
          str(builder))
    check("Dockerfile: builder installs protobuf-compiler", "protobuf-compiler" in runs)
    check("Dockerfile: builder runs a locked release build of the binary",
          re.search(r"cargo build [^&]*--release", runs) is not None and "--locked" in runs)
    check("Dockerfile: runtime is distroless cc-debian12:nonroot or debian:bookworm-slim",
          runtime["image"] in ("gcr.io/distroless/cc-debian12:nonroot", "debian:bookworm-slim")
          or runtime["image"].startswith("gcr.io/distroless/cc-debian12:nonroot@"), runtime["image"])
    users = [rest.strip() for op, rest in runtime["ops"] if op == "USER"]
    check("Dockerfile: runtime ends as a non-root user (65532)",
          bool(users) and users[-1].split(":")[0] in ("65532", "nonroot"), str(users))
    copies = [rest.split() for op, rest in runtime["ops"] if op == "COPY"]
    # The builder's /out/usr/bin holds the binary and the `etcd` symlink to it; the runtime
    # copies that directory to /usr/bin.
    binary_copy = [c for c in copies if c[-1] == "/usr/bin/"]
    link = "docker/rootfs/usr/bin/etcd"
    check("Dockerfile: the binary's /usr/bin (clustermesh-apiserver and the etcd link) is copied to /usr/bin/",
          len(binary_copy) == 1 and "--from=binary" in binary_copy[0]
          and "/out/usr/bin/clustermesh-apiserver" in runs
          and os.path.islink(link) and os.readlink(link) == "clustermesh-apiserver", str(binary_copy))
    missing = [c[-2] for c in copies if not any(a.startswith("--from") for a in c) and not os.path.exists(c[-2])]
    check("Dockerfile: files copied from the context exist", not missing, str(missing))
    entry = [rest for op, rest in runtime["ops"] if op == "ENTRYPOINT"]
    try:
        entry_ok = bool(entry) and json.loads(entry[-1])[0] == "/usr/bin/clustermesh-apiserver"
    except (ValueError, IndexError):
        entry_ok = False
    check("Dockerfile: ENTRYPOINT [\"/usr/bin/clustermesh-apiserver\"] (exec form)", entry_ok, str(entry))
    exposed = {p for op, rest in runtime["ops"] if op == "EXPOSE" for p in rest.split()}
    check("Dockerfile: exposes 2379, 9880, 9962, 9963", {"2379", "9880", "9962", "9963"} <= exposed, str(exposed))
    ignore = open(".dockerignore").read().split() if os.path.exists(".dockerignore") else []
    check(".dockerignore keeps target/ and .git/ out of the build context",
          any(p.strip("/") == "target" for p in ignore) and any(p.strip("/") == ".git" for p in ignore), str(ignore))
    config = yaml.safe_load(open("docker/etcd-config.yaml"))
    check("docker/etcd-config.yaml is Cilium's etcd client configuration for the pod's store",
          config.get("endpoints") == ["https://127.0.0.1:2379"]
          and all(str(config.get(k, "")).startswith("/var/lib/cilium/etcd-secrets/") for k in ("trusted-ca-file", "cert-file", "key-file")),
          str(config))


def interpolate(text):
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: os.environ.get(m.group(1), m.group(2) or ""), text)


def compose_checks():
    path = "docker/compose.yaml"
    base = os.path.dirname(path)
    if not check("docker/compose.yaml exists", os.path.isfile(path)):
        return
    try:
        compose = yaml.safe_load(open(path))
    except yaml.YAMLError as error:
        check("docker/compose.yaml parses as YAML", False, str(error))
        return
    check("docker/compose.yaml parses as YAML with services", isinstance(compose, dict) and isinstance(compose.get("services"), dict))
    services = compose["services"]
    required = ["etcd", "apiserver-etcd", "apiserver-embedded"]
    check(f"compose: services {required} and one-shot certificate services",
          all(s in services for s in required) and any(n.startswith("certs") for n in services), str(sorted(services)))
    declared_volumes = set((compose.get("volumes") or {}).keys())
    ours = {n: s for n, s in services.items() if s.get("image", "").startswith("clustermesh-apiserver")}
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        deps = {d: {} for d in deps} if isinstance(deps, list) else deps
        check(f"compose {name}: depends_on names existing services with valid conditions",
              all(d in services and (c or {}).get("condition", "service_started") in
                  ("service_started", "service_healthy", "service_completed_successfully") for d, c in deps.items()), str(deps))
        for cond_dep, cond in deps.items():
            if (cond or {}).get("condition") == "service_healthy":
                check(f"compose {name}: {cond_dep} has a healthcheck", "healthcheck" in services.get(cond_dep, {}))
        for volume in service.get("volumes") or []:
            source = interpolate(volume).split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                full = os.path.normpath(os.path.join(base, source))
                if full.startswith("examples" + os.sep) or full == "examples":
                    if os.path.exists(full):
                        check(f"compose {name}: objects directory {full} exists", True)
                    else:
                        skip(f"compose {name}: objects directory {full}", "examples/ not in the tree yet")
                else:
                    check(f"compose {name}: bind-mounted {full} exists", os.path.exists(full))
            else:
                check(f"compose {name}: named volume {source} is declared", source in declared_volumes)
    for name, service in ours.items():
        build = service.get("build") or {}
        context = os.path.normpath(os.path.join(base, build.get("context", ".")))
        check(f"compose {name}: built from the repository root with docker/Dockerfile, runs as 65532",
              context in (".", os.getcwd()) and os.path.normpath(os.path.join(context, build.get("dockerfile", ""))) == "docker/Dockerfile"
              and str(service.get("user", "")).split(":")[0] == "65532", f"{build} user={service.get('user')}")
    for one_shot in (n for n in services if n.startswith("certs")):
        command = services[one_shot].get("command") or []
        check(f"compose {one_shot}: one-shot `certs generate`",
              command[:2] == ["certs", "generate"] and str(services[one_shot].get("restart")) == "no", str(command))
    attached = services.get("apiserver-etcd", {}).get("command") or []
    etcd_config = (flag_value(attached, "--kvstore-opt") or "").removeprefix("etcd.config=")
    check("compose apiserver-etcd: `clustermesh --kvstore=etcd --kvstore-opt=etcd.config=FILE`",
          attached[:1] == ["clustermesh"] and flag_value(attached, "--kvstore") == "etcd" and etcd_config, str(attached))
    mounted = {}
    for volume in services.get("apiserver-etcd", {}).get("volumes") or []:
        parts = interpolate(volume).split(":")
        mounted[parts[1]] = parts[0]
    source = mounted.get(etcd_config)
    if check("compose apiserver-etcd: the etcd.config file is mounted from the repository",
             source is not None and os.path.isfile(os.path.join(base, source)), str(mounted)):
        client = yaml.safe_load(open(os.path.join(base, source)))
        hosts = [re.sub(r"^https://([^:/]+).*", r"\1", e) for e in client.get("endpoints", [])]
        check("compose: the attached apiserver's etcd client config points at the etcd service over TLS",
              hosts == ["etcd"] and all(client.get(k) for k in ("trusted-ca-file", "cert-file", "key-file")), str(client))
    embedded = services.get("apiserver-embedded", {}).get("command") or []
    check("compose apiserver-embedded: embedded store on 2379 with certificate files",
          embedded[:1] == ["clustermesh"] and flag_value(embedded, "--kvstore") in (None, "embedded")
          and (flag_value(embedded, "--listen-client-urls") or "").endswith(":2379")
          and all(flag_value(embedded, f) for f in ("--cert-file", "--key-file", "--trusted-ca-file")), str(embedded))
    compose_mesh_checks(base, services)
    if BIN:
        for name, service in ours.items():
            check_args(f"compose {name}", [str(a) for a in service.get("command") or []])
    else:
        skip("compose: flags exist in the binary", "no binary built")
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        for etcd_image in (None, "clustermesh-local/etcd:3.5.16"):
            env = {k: v for k, v in os.environ.items() if k != "ETCD_IMAGE"}
            if etcd_image:
                env["ETCD_IMAGE"] = etcd_image
            result = subprocess.run([docker, "compose", "-f", path, "config", "--images"], capture_output=True, text=True, env=env)
            images = result.stdout.split()
            check(f"docker compose config (ETCD_IMAGE={etcd_image or 'unset'})",
                  result.returncode == 0 and (etcd_image or "quay.io/coreos/etcd:v3.5.16") in images, result.stderr or str(images))
    else:
        skip("docker compose config", "no docker compose here; parsed with PyYAML instead")


def compose_mesh_checks(base, services):
    """The mesh of docker/compose.yaml: both clusters run KVStoreMesh on the other, the check
    services read every cluster with `status -o json`, the client files name certificates that
    `certs generate` makes, and nothing is published beyond loopback."""
    etcd_image = str(services.get("etcd", {}).get("image", ""))
    check("compose etcd: image ${ETCD_IMAGE:-...etcd:v3.5.x} (docker/build-images' etcd without a registry)",
          re.fullmatch(r"\$\{ETCD_IMAGE:-[^}]*/etcd:v?3\.5\.\d+\}", etcd_image) is not None, etcd_image)
    for name, service in services.items():
        ports = service.get("ports") or []
        if ports:
            check(f"compose {name}: published ports bound to 127.0.0.1 only",
                  all(p.get("host_ip") == "127.0.0.1" if isinstance(p, dict) else str(p).startswith("127.0.0.1:") for p in ports),
                  str(ports))

    def mounts(service):
        out = {}
        for volume in service.get("volumes") or []:
            if isinstance(volume, str):
                parts = interpolate(volume).split(":")
                out[parts[1]] = parts[0]
        return out

    def client_files(service, directory):
        """{cluster: (path, parsed etcd client config)} of a --clustermesh-config directory,
        mounted as a directory or file by file from the repository."""
        files = {}
        for target, source in mounts(service).items():
            if not source.startswith((".", "/")):
                continue
            host = os.path.normpath(os.path.join(base, source))
            if target == directory and os.path.isdir(host):
                files.update({f: os.path.join(host, f) for f in os.listdir(host)})
            elif os.path.dirname(target) == directory and os.path.isfile(host):
                files[os.path.basename(target)] = host
        return {cluster: (p, yaml.safe_load(open(p))) for cluster, p in files.items()}

    def host_of(endpoint):
        return re.sub(r"^https://([^:/]+).*", r"\1", endpoint)

    cert = re.compile(r"/var/lib/clustermesh-apiserver/([a-z0-9-]+)/clustermesh-apiserver-(server|admin|remote|local)-cert/(ca\.crt|tls\.crt|tls\.key)")

    def client_ok(label, service, path, client, host, kinds, owner=None):
        """One endpoint, https on `host`, certificates of one of `kinds` (of cluster `owner`, if
        given) from the certs volume."""
        files = [client.get(k) or "" for k in ("trusted-ca-file", "cert-file", "key-file")]
        matches = [cert.fullmatch(f) for f in files]
        check(f"{label}: {os.path.relpath(path)} reaches {host} over TLS with a {'/'.join(kinds)} certificate",
              [host_of(e) for e in client.get("endpoints") or []] == [host]
              and all(e.startswith("https://") for e in client["endpoints"])
              and all(matches) and len({m.group(1) for m in matches}) == 1 and matches[1].group(2) in kinds
              and (owner is None or matches[1].group(1) == owner)
              and mounts(service).get("/var/lib/clustermesh-apiserver") == "certs", str(client))

    # Each cluster: its name and the host its store answers on (the attached etcd, or the
    # embedded store's service).
    stores = {}
    for name, service in services.items():
        command = [str(a) for a in service.get("command") or []]
        if command[:1] != ["clustermesh"]:
            continue
        cluster = flag_value(command, "--cluster-name")
        if flag_value(command, "--kvstore") == "etcd":
            client = os.path.join(base, mounts(service).get((flag_value(command, "--kvstore-opt") or "").removeprefix("etcd.config="), ""))
            hosts = [host_of(e) for e in (yaml.safe_load(open(client)).get("endpoints") or [])] if os.path.isfile(client) else []
            stores[cluster] = hosts[0] if hosts else None
        else:
            stores[cluster] = name
    check("compose: two clusters, cluster1 and cluster2, each with its store", sorted(stores) == ["cluster1", "cluster2"]
          and all(stores.values()), str(stores))

    # KVStoreMesh: in the clustermesh process (--clustermesh-config) or as a `kvstoremesh`
    # service attached to the cluster's store; every other cluster, read from its store.
    meshes = {}
    for name, service in services.items():
        command = [str(a) for a in service.get("command") or []]
        directory = flag_value(command, "--clustermesh-config")
        if command[:1] == ["kvstoremesh"] or (command[:1] == ["clustermesh"] and directory):
            meshes[flag_value(command, "--cluster-name")] = (name, service, directory)
    for cluster in sorted(stores):
        if not check(f"compose: cluster {cluster} runs KVStoreMesh", cluster in meshes, str(sorted(meshes))):
            continue
        name, service, directory = meshes[cluster]
        files = client_files(service, directory or "")
        others = sorted(c for c in stores if c != cluster)
        check(f"compose {name}: KVStoreMesh reads {others}, one client file each, named after it",
              sorted(files) == others, f"{directory}: {sorted(files)}")
        for remote, (path, client) in sorted(files.items()):
            client_ok(f"compose {name}", service, path, client, stores.get(remote), ("remote",))

    # The checks: `status -o json` on a directory with a file per cluster, from a third
    # container, each cluster read directly and through the other's KVStoreMesh cache.
    views = set()
    for name, service in services.items():
        command = [str(a) for a in service.get("command") or []]
        if command[:1] != ["status"]:
            continue
        directory = flag_value(command, "--clustermesh-config")
        check(f"compose {name}: one-shot `status --clustermesh-config=DIR --output=json`",
              directory and (flag_value(command, "--output") == "json" or "-o" in command and command[command.index("-o") + 1:][:1] == ["json"])
              and str(service.get("restart")) == "no", str(command))
        files = client_files(service, directory or "")
        check(f"compose {name}: a client file per cluster", sorted(files) == sorted(stores), str(sorted(files)))
        for remote, (path, client) in sorted(files.items()):
            hosts = [host_of(e) for e in client.get("endpoints") or []]
            direct = hosts == [stores.get(remote)]
            views.add((remote, "direct" if direct else "cached"))
            if direct:
                client_ok(f"compose {name}", service, path, client, stores.get(remote), ("remote",))
            else:
                # The cache in another cluster's store, read as that cluster's agents do.
                owner = next((c for c, s in stores.items() if hosts == [s] and c != remote), None)
                client_ok(f"compose {name}", service, path, client, stores.get(owner), ("local",), owner)
    check("compose: the checks read every cluster directly and from the other cluster's KVStoreMesh cache",
          views == {(c, v) for c in stores for v in ("direct", "cached")}, str(sorted(views)))


# --------------------------------------------------------------------------- main

print(f"Helm engine: helm-python-sdk {helm.helm_c_version()} (Helm SDK {helm.helm_sdk_version()})")
print(f"binary: {BIN or 'none (flag and certificate checks skipped)'}")
default_objects = None
try:
    default_objects = chart_checks()
except Exception as error:  # noqa: BLE001
    check("chart checks ran to the end", False, f"{type(error).__name__}: {error}")
if default_objects is not None:
    guarded("the rendered apiserver container runs", the_chart_runs_the_binary, default_objects)
guarded("Dockerfile checks", dockerfile_checks)
guarded("compose checks", compose_checks)

line = f"{counts['passed']} passed, {counts['failed']} failed"
if counts["skipped"]:
    line += f", {counts['skipped']} skipped"
print(line)
sys.exit(1 if counts["failed"] else 0)
