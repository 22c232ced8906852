"""How the Deployments roll and stop: the autoscalers own the replica count, a changed setting rolls
the pods, and each pod is given the time its shutdown can take before it is killed."""

from __future__ import annotations

import inspect
import re
import shutil

import pytest
from enclave_analysis import handlers as analysis_handlers
from enclave_common import kafka, service
from enclave_common.settings import BaseServiceSettings
from opentelemetry.sdk._shared_internal import BatchProcessor

from .conftest import OVERLAYS, REPO_ROOT, config_of, kustomize_build, selects


def _by_name(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaled_deployments_leave_the_replica_count_to_their_autoscaler(overlay, documents):
    """A Deployment scaled by an HPA or a ScaledObject must not set ``replicas``: every apply would
    reset the count the autoscaler chose (10 gateways back to 2 at peak). The disruption budget
    still lets a node drain evict one pod at the autoscaler's floor (a budget that allowed none
    would block every drain of a node running analysis's single replica)."""
    docs = documents[overlay]
    floors = {
        h["spec"]["scaleTargetRef"]["name"]: h["spec"]["minReplicas"]
        for h in _by_name(docs, "HorizontalPodAutoscaler").values()
    }
    floors |= {
        s["spec"]["scaleTargetRef"]["name"]: s["spec"]["minReplicaCount"]
        for s in _by_name(docs, "ScaledObject").values()
    }
    deployments = _by_name(docs, "Deployment")
    assert set(floors) == set(deployments), "every Deployment is autoscaled"
    assert [name for name, d in deployments.items() if "replicas" in d["spec"]] == []
    budgets = _by_name(docs, "PodDisruptionBudget").values()
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        [budget] = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        if "maxUnavailable" in budget["spec"]:
            assert budget["spec"]["maxUnavailable"] >= 1, name
        else:
            assert budget["spec"]["minAvailable"] < floors[name], name


def _code_drain_bounds() -> dict[str, float]:
    """The shutdown bounds the code sets, in seconds (read from it, not restated). The HTTP drain is
    a setting, read per service from its pods' ConfigMap (``_http_drain_s``)."""
    serve = inspect.getsource(service.run_service)
    assert "timeout_graceful_shutdown=settings.http_drain_s" in serve
    readiness = inspect.getsource(service.ServiceRuntime.readiness_report)
    # BatchSpanProcessor.shutdown() waits this long for the last export.
    span_timeout = inspect.signature(BatchProcessor.shutdown).parameters["timeout_millis"].default
    return {
        "probe": float(re.search(r"wait_for\(fn\(\), timeout=([\d.]+)\)", readiness).group(1)),
        # A stopped analysis releases its claim, or publishes the outcome it recorded: each bounded.
        "release": 2 * float(analysis_handlers.RELEASE_TIMEOUT_S),
        "consumer": float(kafka.create_broker(BaseServiceSettings()).config.graceful_timeout),
        "producer": kafka._PRODUCER_OPTIONS["request_timeout_ms"] / 1000,
        "spans": span_timeout / 1000,
    }


def _http_drain_s(docs, deployment: str) -> float:
    """``http_drain_s`` as the service's pods read it: their ConfigMap's value under the service's
    prefix or the shared one, else the code's default."""
    config = config_of(docs, deployment)
    own = f"ENCLAVE_{deployment.removeprefix('enclave-').upper()}_HTTP_DRAIN_S"
    value = config.get(own, config.get("ENCLAVE_HTTP_DRAIN_S"))
    default = BaseServiceSettings.model_fields["http_drain_s"].default
    return float(default if value is None else BaseServiceSettings(http_drain_s=value).http_drain_s)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_grace_period_covers_the_longest_shutdown_of_its_service(overlay, documents, gen):
    """SIGTERM starts a drain whose steps are each bounded by the code: the preStop sleep (public
    services), open HTTP requests (the service's ``http_drain_s``; probes only where there is no API),
    analysis's claim release, the Kafka event in hand (FastStream's graceful timeout), the producers'
    flush and the last span export. The pod is killed at terminationGracePeriodSeconds: it was 30 s
    for every service, shorter than the HTTP and Kafka drains alone (50 s). The HTTP drain was a
    constant 20 s, shorter than a 1 GiB STOW upload (about 35 s)."""
    bounds = _code_drain_bounds()
    docs = documents[overlay]
    # The generator's table of the drain (what the annotation and docs/operations.md state) holds them.
    for s in gen.SERVICES:
        if s.public:
            assert gen.drain_phases(s)["HTTP requests"] >= _http_drain_s(docs, s.group), s.name
    declared = {
        "probe": gen.PROBE_DRAIN_S,
        "release": gen.CLAIM_RELEASE_S,
        "consumer": gen.CONSUMER_DRAIN_S,
        "producer": gen.PRODUCER_FLUSH_S,
        "spans": gen.SPAN_EXPORT_S,
    }
    assert [step for step, bound in bounds.items() if declared[step] < bound] == [], (declared, bounds)
    public = {s.group for s in gen.SERVICES if s.public}
    for name, deployment in _by_name(docs, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        if name in public:
            assert pre_stop >= 5, f"{name}: the ingress controller needs time to stop routing to it"
        drain = pre_stop + (_http_drain_s(docs, name) if name in public else bounds["probe"])
        drain += bounds["release"] if name == "enclave-analysis" else 0
        drain += bounds["consumer"] + bounds["producer"] + bounds["spans"]
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= drain + 10, f"{name}: {grace} s does not cover its drain ({drain} s) with margin"
        assert deployment["metadata"]["annotations"]["enclave.io/termination-grace"].endswith(f"= {grace} s")


def _configmap_refs(deployment) -> set[str]:
    pod = deployment["spec"]["template"]["spec"]
    refs = set()
    for container in pod["containers"] + pod.get("initContainers", []):
        refs |= {s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s}
        refs |= {
            e["valueFrom"]["configMapKeyRef"]["name"]
            for e in container.get("env", [])
            if "configMapKeyRef" in e.get("valueFrom", {})
        }
    refs |= {
        v["configMap"]["name"]
        for v in pod.get("volumes", [])
        if "configMap" in v and not v["configMap"].get("optional")
    }
    return refs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_configmap_a_deployment_reads_is_generated_with_a_hash_of_its_data(overlay, documents):
    """An edited ConfigMap that keeps its name rolls nothing: the pods keep the old settings until
    they happen to restart. Generated with a hash of the data in the name, a change is a new name
    in the pod template, hence a rollout (and `kubectl rollout undo` returns to the old ConfigMap)."""
    docs = documents[overlay]
    config_maps = set(_by_name(docs, "ConfigMap"))
    for name, deployment in _by_name(docs, "Deployment").items():
        refs = _configmap_refs(deployment)
        assert refs, name
        for ref in refs:
            assert ref in config_maps, f"{name} reads ConfigMap {ref}, which the overlay does not have"
            assert re.fullmatch(rf"{name}-[a-z0-9]{{10}}", ref), f"{name}: ConfigMap {ref} has no hash suffix"


def test_a_changed_setting_changes_the_pod_template(tools, tmp_path, documents, lint):
    """Editing one service's settings (here ingest's log level in the base) gives that service's
    pods a new ConfigMap, so they roll; the other services are untouched."""
    copy = tmp_path / "k8s"
    shutil.copytree(REPO_ROOT / "deploy" / "k8s", copy)
    settings = copy / "base" / "services" / "ingest.env"
    text = settings.read_text()
    assert "ENCLAVE_LOG_LEVEL=INFO\n" in text
    settings.write_text(text.replace("ENCLAVE_LOG_LEVEL=INFO\n", "ENCLAVE_LOG_LEVEL=WARNING\n"))
    changed = lint.load_documents(kustomize_build(tools, copy / "overlays" / "prod"))
    before = {n: _configmap_refs(d) for n, d in _by_name(documents["prod"], "Deployment").items()}
    after = {n: _configmap_refs(d) for n, d in _by_name(changed, "Deployment").items()}
    assert {n for n in before if before[n] != after[n]} == {"enclave-ingest"}
