# ruff: noqa: E501 -- kubeconform templates, ACL literals and mutation tables read best on one line
"""deploy/k8s renders, validates against the Kubernetes and CRD schemas, and keeps Enclave's rules."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from enclave_common import topics

from .conftest import OVERLAYS, REPO_ROOT, SERVICES

#: Strimzi publishes its CRDs in no package registry: these kinds get deploy_lint.strimzi_problems instead.
STRIMZI_KINDS = ("Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser")


def kubeconform(tools, path: Path) -> subprocess.CompletedProcess[str]:
    schemas = tools["schemas"]
    return subprocess.run(
        [
            str(tools["kubeconform"]),
            "-strict",
            "-summary",
            "-output",
            "text",
            "-kubernetes-version",
            "1.33.0",
            "-schema-location",
            f"{schemas}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
            "-schema-location",
            f"{schemas}/crds/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
            "-skip",
            ",".join(STRIMZI_KINDS),
            str(path),
        ],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_and_crd_schemas(overlay, rendered, documents, tools, tmp_path):
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(rendered[overlay])
    result = kubeconform(tools, path)
    assert result.returncode == 0, result.stdout + result.stderr
    counted = re.search(r"Valid: (\d+), Invalid: (\d+), Errors: (\d+), Skipped: (\d+)", result.stdout)
    assert counted, result.stdout
    valid, invalid, errors, skipped = map(int, counted.groups())
    strimzi = sum(1 for d in documents[overlay] if d["kind"] in STRIMZI_KINDS)
    assert (invalid, errors) == (0, 0)
    assert skipped == strimzi, "only Strimzi kinds may go without a schema"
    assert valid == len(documents[overlay]) - strimzi


def test_kubeconform_rejects_an_unknown_field(tools, tmp_path):
    """The schemas are strict: a misspelt field is an error, not silently ignored."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata: {name: x}\n"
        "spec: {scaleTargetRef: {name: d}, triggers: [{type: kafka, metadata: {}}], minReplicas: 1}\n"
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: y}\nspec: {port: 80}\n"
    )
    result = kubeconform(tools, bad)
    assert result.returncode != 0
    assert "Invalid: 2" in result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_keeps_enclave_policies(overlay, documents, lint):
    docs = documents[overlay]
    deployments = lint.of_kind(docs, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {f"enclave-{s}" for s in SERVICES}
    problems = [p for d in deployments for p in lint.deployment_problems(d)]
    problems += lint.service_account_problems(docs) + lint.no_secrets_problems(docs)
    problems += lint.network_policy_problems(docs) + lint.strimzi_problems(docs)
    problems += lint.topic_problems(docs, topics.ALL_TOPICS, topics.dlq)
    assert problems == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c, p: c.pop("readinessProbe"), "readinessProbe must GET /readyz"),
        (lambda c, p: c.pop("livenessProbe"), "livenessProbe must GET /healthz"),
        (lambda c, p: c["resources"].pop("limits"), "resources.limits.cpu is missing"),
        (lambda c, p: c["resources"]["requests"].pop("memory"), "resources.requests.memory is missing"),
        (lambda c, p: c["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem"),
        (lambda c, p: c["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
        (lambda c, p: c["securityContext"]["capabilities"].update(add=["NET_ADMIN"]), "capabilities"),
        (lambda c, p: c["securityContext"].update(runAsUser=0), "runAsUser 0"),
        (
            lambda c, p: (
                c["securityContext"].pop("seccompProfile") and p["securityContext"].pop("seccompProfile")
            ),
            "seccompProfile",
        ),
        (lambda c, p: p.update(automountServiceAccountToken=True), "automountServiceAccountToken"),
        (
            lambda c, p: c.update(volumeMounts=[m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"]),
            "/tmp",
        ),
        (
            lambda c, p: c["env"].append({"name": "ENCLAVE_S3_SECRET_ACCESS_KEY", "value": "x"}),
            "reference a Secret",
        ),
    ],
)
def test_policy_check_catches_a_broken_deployment(documents, lint, mutate, expected):
    deployment = copy.deepcopy(lint.of_kind(documents["prod"], "Deployment")[0])
    pod = deployment["spec"]["template"]["spec"]
    mutate(pod["containers"][0], pod)
    problems = lint.deployment_problems(deployment)
    assert any(expected in p for p in problems), problems


def test_topic_check_fails_for_a_topic_without_kafkatopic(documents, lint):
    new_topic = "enclave.study.archived.v1"
    problems = lint.topic_problems(documents["prod"], (*topics.ALL_TOPICS, new_topic), topics.dlq)
    assert problems == [f"topic {new_topic} has no KafkaTopic", f"topic {new_topic}.dlq has no KafkaTopic"]
    without_dlq = [
        d for d in documents["prod"] if d.get("spec", {}).get("topicName") != topics.dlq(topics.UPLOAD_CHUNK)
    ]
    assert lint.topic_problems(without_dlq, topics.ALL_TOPICS, topics.dlq) == [
        f"topic {topics.dlq(topics.UPLOAD_CHUNK)} has no KafkaTopic"
    ]


def test_generated_manifests_are_up_to_date(gen, capsys):
    assert gen.main(["--check"]) == 0, capsys.readouterr().out


def test_each_service_reads_and_writes_only_its_topics(documents, lint, gen):
    users = {u["metadata"]["name"]: u for u in lint.of_kind(documents["prod"], "KafkaUser")}
    assert set(users) == {f"enclave-{s}" for s in SERVICES} | {gen.KEDA_USER}
    for service in gen.SERVICES:
        user = users[service.group]
        reads = lint.acl_topics(user, "Read")
        writes = lint.acl_topics(user, "Write")
        assert reads == set(service.reads)
        assert writes == set(service.writes) | {topics.dlq(t.removesuffix(".dlq")) for t in service.reads}
        groups = [a for a in user["spec"]["authorization"]["acls"] if a["resource"]["type"] == "group"]
        assert groups == [
            {
                "resource": {"type": "group", "name": service.group, "patternType": "literal"},
                "operations": ["Read", "Describe"],
            }
        ]
        assert all(a["resource"]["patternType"] == "literal" for a in user["spec"]["authorization"]["acls"])
    keda = users[gen.KEDA_USER]
    assert lint.acl_topics(keda, "Read") == set()
    assert lint.acl_topics(keda, "Write") == set()


def test_ownership_matches_the_design(gen):
    by_name = {s.name: s for s in gen.SERVICES}
    writers = {t: [s.name for s in gen.SERVICES if t in s.writes] for t in topics.ALL_TOPICS}
    assert all(len(w) == 1 for w in writers.values()), writers
    assert by_name["ingest"].reads == (topics.UPLOAD_CHUNK,)
    assert topics.UPLOAD_CHUNK not in by_name["audit"].reads, "the chunk topic carries sealed bulk bytes only"
    for topic in topics.ALL_TOPICS:
        if topic != topics.UPLOAD_CHUNK:
            assert topic in by_name["audit"].reads, f"audit must read {topic}"
    for topic in topics.CONSUMED_TOPICS:
        assert any(topic in s.reads and s.name != "audit" for s in gen.SERVICES), (
            f"nobody but audit consumes {topic}"
        )
    assert "gateway" not in [s.name for s in gen.SERVICES if s.s3], (
        "the gateway holds no object-store credentials"
    )


def test_consumers_scale_on_lag_and_gateway_on_cpu(documents, lint, gen):
    docs = documents["prod"]
    hpas = {h["spec"]["scaleTargetRef"]["name"] for h in lint.of_kind(docs, "HorizontalPodAutoscaler")}
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in lint.of_kind(docs, "ScaledObject")}
    assert hpas == {"enclave-gateway"}
    assert set(scaled) == {"enclave-ingest", "enclave-deid", "enclave-analysis", "enclave-audit"}
    partitions = {d["spec"]["topicName"]: d["spec"]["partitions"] for d in lint.of_kind(docs, "KafkaTopic")}
    for name, obj in scaled.items():
        assert all(
            trig["type"] == "kafka" and trig["metadata"]["consumerGroup"] == name
            for trig in obj["spec"]["triggers"]
        )
        for trig in obj["spec"]["triggers"]:
            if "topic" in trig["metadata"]:
                assert obj["spec"]["maxReplicaCount"] <= partitions[trig["metadata"]["topic"]]


def test_ingresses_terminate_tls_with_cert_manager(documents, lint):
    ingresses = {i["metadata"]["name"]: i for i in lint.of_kind(documents["prod"], "Ingress")}
    assert set(ingresses) == {"enclave-gateway", "enclave-audit"}
    for ingress in ingresses.values():
        assert "cert-manager.io/cluster-issuer" in ingress["metadata"]["annotations"]
        assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
        hosts = {r["host"] for r in ingress["spec"]["rules"]}
        assert hosts <= {h for tls in ingress["spec"]["tls"] for h in tls["hosts"]}


def test_secrets_are_referenced_not_committed():
    for path in (REPO_ROOT / "deploy").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (doc and doc.get("kind") == "Secret"), f"{path} defines a Secret"
    assert not list((REPO_ROOT / "deploy").rglob("*.pem"))
    assert not list((REPO_ROOT / "deploy").rglob("*.key"))


def test_alerts_cover_the_required_conditions(documents, lint):
    (rule,) = lint.of_kind(documents["prod"], "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    for required in (
        "EnclaveDLQGrowing",
        "EnclaveConsumerLagGrowing",
        "EnclaveAuditVerifyFailed",
        "EnclaveCertificateExpiringSoon",
        "EnclavePodNotReady",
    ):
        assert required in alerts
    docs = (REPO_ROOT / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", docs, re.M)
    }
    for alert in alerts.values():
        assert alert["labels"]["severity"] in {"warning", "critical"}
        runbook = alert["annotations"]["runbook"]
        assert runbook.split("#")[1] in anchors, (
            f"{alert['alert']}: runbook anchor {runbook} not in docs/operations.md"
        )


def test_dashboard_queries_metrics_that_exist(documents, lint):
    dashboard_cm = next(
        c
        for c in lint.of_kind(documents["prod"], "ConfigMap")
        if c["metadata"]["name"] == "enclave-grafana-dashboard"
    )
    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_cm["data"]["enclave.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    (rule,) = lint.of_kind(documents["prod"], "PrometheusRule")
    rule_exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    known = re.compile(r"^(enclave_|kafka_|certmanager_|kube_)")
    for expr in exprs + rule_exprs:
        assert expr.count("(") == expr.count(")"), expr
        metrics = re.findall(r"\b([a-z_]+_[a-z_]+)(?=\{|\[|\)|\s|$)", expr)
        named = [m for m in metrics if known.match(m)]
        assert named, f"no known metric in {expr!r}"
