"""The built overlays: every built-in object against the Kubernetes schemas, the
RayService against the project's schema of KubeRay's CRD, its serveConfigV2 against
Ray's ServeDeploySchema, least privilege, the node cap and the network policy."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml
from deploy_support import OVERLAYS, ROOT
from jsonschema import Draft202012Validator

from autoscaling.policies import load_policy
from serve.cli.main import main

K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests target (kubectl 1.33 ships)
CRDS = ("ray.io/", "monitoring.coreos.com/")


def _rayservice(objects) -> dict:
    (rs,) = [o for o in objects if o["kind"] == "RayService"]
    return rs


def _serve_config(objects) -> dict:
    return yaml.safe_load(_rayservice(objects)["spec"]["serveConfigV2"])


def _groups(rs) -> dict[str, dict]:
    rc = rs["spec"]["rayClusterConfig"]
    return {"head": rc["headGroupSpec"], **{g["groupName"]: g for g in rc["workerGroupSpecs"]}}


def _containers(objects):
    """(where, container) for every container a pod of these objects runs, the
    autoscaler sidecar KubeRay injects from autoscalerOptions included."""
    for o in objects:
        if o["kind"] == "RayService":
            rc = o["spec"]["rayClusterConfig"]
            yield "autoscaler", {"name": "autoscaler", **rc["autoscalerOptions"]}, {}
            for name, group in _groups(o).items():
                spec = group["template"]["spec"]
                for c in spec.get("initContainers", []) + spec["containers"]:
                    yield f"{name}/{c['name']}", c, spec


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_built_in_objects_validate_strictly(rendered, overlay):
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"RayService", "ConfigMap", "ServiceAccount", "Role", "RoleBinding",
            "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    for o in objects:
        if o["apiVersion"].startswith(CRDS):
            continue
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pod_templates_validate_as_pods(rendered, overlay):
    """KubeRay's CRD does not check its pod templates: each one, as a Pod, does."""
    for name, group in _groups(_rayservice(rendered[overlay])).items():
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, **group["template"].get("metadata", {})},
               "spec": group["template"]["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_matches_the_crd_schema(rendered, overlay):
    schema = json.loads((ROOT / "tests/deploy/schemas/rayservice.schema.json").read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in Draft202012Validator(schema).iter_errors(_rayservice(rendered[overlay]))]
    assert not errors


def test_prod_carries_the_monitoring_objects_and_they_match_the_crds(rendered):
    """PodMonitor and PrometheusRule against the operator's schema (the fields used);
    the dashboard as the ConfigMap Grafana's sidecar loads."""
    schema = json.loads((ROOT / "tests/deploy/schemas/monitoring.schema.json").read_text())
    monitoring = [o for o in rendered["prod"] if o["apiVersion"].startswith(CRDS[1])]
    assert sorted(o["kind"] for o in monitoring) == ["PodMonitor", "PrometheusRule"]
    for o in monitoring:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in Draft202012Validator(schema).iter_errors(o)]
        assert not errors, (o["kind"], errors)
    (dash,) = [o for o in rendered["prod"]
               if o["metadata"]["name"] == "imagegen-grafana-dashboard"]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["grafana-dashboard.json"])["panels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_embedded_serve_config_is_valid_and_keeps_safety_on_cpu(rendered, overlay):
    from ray.serve.schema import ServeDeploySchema

    doc = _serve_config(rendered[overlay])
    ServeDeploySchema.model_validate(doc)
    (app,) = doc["applications"]
    options = {d["name"]: d["ray_actor_options"] for d in app["deployments"]}
    assert options["image-safety"]["num_gpus"] == 0
    assert options["image-safety"]["label_selector"] == {"imagegen.io/pool": "cpu"}
    # every label the serve config selects is a pool the RayService has
    pools = {g["labels"]["imagegen.io/pool"] for g in _groups(_rayservice(rendered[overlay]))
             .values()}
    assert {o["label_selector"]["imagegen.io/pool"] for o in options.values()} <= pools


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_essentials(rendered, overlay):
    rs = _rayservice(rendered[overlay])
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rs["spec"]["upgradeStrategy"] == {"type": "None"}  # one RayCluster: the cap holds
    # The head runs no replica and the NetworkPolicy refuses the operator's check of
    # head:8000: it must not be in the Serve service.
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is True
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == 8000 and ports["serve-grpc"] == 9000 and ports["metrics"] == 8080
    assert _serve_config(rendered[overlay])["grpc_options"]["port"] == ports["serve-grpc"]
    for _, c, _ in _containers(rendered[overlay]):
        assert "readinessProbe" not in c and "livenessProbe" not in c  # KubeRay's own
    if overlay == "prod":
        redis = rc["gcsFaultToleranceOptions"]
        assert redis["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_roles_are_least_privilege(rendered, overlay):
    roles = [o for o in rendered[overlay] if o["kind"] in ("Role", "ClusterRole")]
    assert {r["kind"] for r in roles} == {"Role"}
    for role in roles:
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], field)
            assert rule["resources"] == ["configmaps"]
            assert rule["resourceNames"] == ["imagegen-routing"]
    verbs = {r["metadata"]["name"]: set(r["rules"][0]["verbs"]) for r in roles}
    assert verbs == {"imagegen-routing-reader": {"get", "list", "watch"},
                     "imagegen-routing-switch": {"get", "patch"}}
    names = {o["metadata"]["name"] for o in rendered[overlay] if o["kind"] == "ConfigMap"}
    assert "imagegen-routing" in names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down_with_requests_and_limits(rendered, overlay):
    for where, c, pod in _containers(rendered[overlay]):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        res = c["resources"]
        for kind in ("cpu", "memory"):
            assert res["requests"][kind] and res["limits"][kind], (where, kind)
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts, where  # Ray's session dir on a read-only root
        if pod:
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_secrets_are_referenced_never_created(rendered):
    for objects in rendered.values():
        assert not [o for o in objects if o["kind"] == "Secret"]
        text = yaml.safe_dump(objects)
        for name in ("imagegen-secrets", "imagegen-s3", "imagegen-keys", "imagegen-c2pa"):
            assert name in text


def test_node_cap_is_the_gpu_policys(rendered, capsys):
    """For the GPU policy the model group's maxReplicas is the policy's max_nodes, each
    pod holds a node's GPUs, and `imagegen capacity check` passes on what was rendered."""
    objects = rendered["prod"]
    policy_file = _serve_config(objects)["applications"][0]["args"]["policy_file"]
    policy = load_policy(ROOT / policy_file)
    (node,) = policy.cluster.node_types.values()
    models = _groups(_rayservice(objects))["models"]
    assert models["maxReplicas"] == node.max_nodes
    worker = models["template"]["spec"]["containers"][0]["resources"]
    assert worker["limits"]["nvidia.com/gpu"] == str(node.gpus_per_node)
    assert worker["requests"]["nvidia.com/gpu"] == str(node.gpus_per_node)
    spec = models["template"]["spec"]
    assert spec["nodeSelector"] and spec["tolerations"]
    assert main(["capacity", "--policy", str(ROOT / policy_file), "check"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("ok")


def test_dev_cap_is_the_cpu_policys(rendered):
    objects = rendered["dev"]
    policy = load_policy(ROOT / _serve_config(objects)["applications"][0]["args"]["policy_file"])
    (node,) = policy.cluster.node_types.values()
    models = _groups(_rayservice(objects))["models"]
    assert models["maxReplicas"] == node.max_nodes == 1
    assert "nvidia.com/gpu" not in models["template"]["spec"]["containers"][0]["resources"][
        "limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_reachable_only_from_the_clusters_pods_and_operator(rendered, overlay):
    (policy,) = [o for o in rendered[overlay] if o["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule["from"]
        if not ports:  # every port: only the cluster's own pods
            assert peers == [{"podSelector": {"matchLabels": {
                "app.kubernetes.io/name": "imagegen"}}}]
        elif 8265 in ports:
            assert all(p["podSelector"]["matchLabels"] == {
                "app.kubernetes.io/name": "kuberay-operator"} for p in peers)
        else:
            assert ports <= {8000, 9000, 8080}
    egress_ports = {p["port"] for r in spec["egress"] for p in r.get("ports", [])}
    assert {53, 6379, 4317, 4318, 443} <= egress_ports
    # The collector is reached in the namespace of the OTLP endpoint the pods use.
    settings = next(o for o in rendered[overlay] if o["metadata"]["name"] == "imagegen-settings")
    endpoint = settings["data"].get("OTEL_EXPORTER_OTLP_ENDPOINT")
    (otlp,) = [r for r in spec["egress"] if 4317 in {p["port"] for p in r.get("ports", [])}]
    (peer,) = otlp["to"]
    namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    if endpoint:
        host = endpoint.split("://", 1)[1].split(":")[0].split("/")[0]
        assert host.split(".")[1] == namespace, (endpoint, namespace)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_outlasts_the_longest_generation_when_it_stops(rendered, overlay):
    """In-flight requests get request_timeout_s (serve/app.py's drain grace): Ray's node
    drain must last past it (+10 s for Serve to stop the replica), and the pod's
    termination grace past the preStop sleep and the drain."""
    from serve.config import load_settings

    timeout = load_settings().request_timeout_s
    settings = next(o for o in rendered[overlay] if o["metadata"]["name"] == "imagegen-settings")
    timeout = float(settings["data"].get("IMAGEGEN_REQUEST_TIMEOUT_S", timeout))
    for name, group in _groups(_rayservice(rendered[overlay])).items():
        spec = group["template"]["spec"]
        (ray,) = [c for c in spec["containers"] if c["name"].startswith("ray-")]
        env = {e["name"]: e.get("value") for e in ray["env"]}
        drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        sleep = float(ray["lifecycle"]["preStop"]["exec"]["command"][1])
        assert drain >= timeout + 10, (name, drain, timeout)
        assert spec["terminationGracePeriodSeconds"] >= sleep + drain + 10, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_runs_serves_data_path_as_the_local_service_does(rendered, overlay):
    """Every Ray pod gets the Serve variables `imagegen serve` sets (serve/local.py's
    SERVE_ENV: handle calls over gRPC, issue 18), on every pod, since each replica and
    each handle reads them in its own process; direct ingress stays off on the
    cluster (callers reach Serve's proxies through the serve Service)."""
    from serve.local import SERVE_ENV

    assert SERVE_ENV["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # past gRPC's 4 MiB default: a batch of 8 raw 1024x1024 images is 24 MiB
    assert int(SERVE_ENV["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) >= 8 * 1024 * 1024 * 3
    for name, group in _groups(_rayservice(rendered[overlay])).items():
        (ray,) = [c for c in group["template"]["spec"]["containers"]
                  if c["name"].startswith("ray-")]
        env = {e["name"]: e.get("value") for e in ray["env"]}
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, name
        assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serves_proxies_get_the_request_deadline(rendered, overlay):
    """request_timeout_s reaches Serve's HTTP and gRPC proxies on the cluster, as
    `imagegen serve` sets it locally (the drain's grace is sized by it)."""
    from serve.config import load_settings

    doc = _serve_config(rendered[overlay])
    timeout = load_settings().request_timeout_s
    assert doc["http_options"]["request_timeout_s"] == timeout
    assert doc.get("grpc_options", {"request_timeout_s": timeout})["request_timeout_s"] == timeout
