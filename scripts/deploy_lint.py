"""Policy checks on rendered Kubernetes manifests and on the services' Dockerfiles.

Schemas say a manifest is well formed; these checks say it is what Enclave promises: every
Deployment probed, bounded and at the ``restricted`` pod-security level; every topic in code
provisioned with its DLQ; each KafkaUser limited to its own topics; Kafka on KRaft with mTLS and ACLs.
Each check returns a list of problems (empty = fine); tests/deploy runs them.

Written by hand: no library checks these project rules.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = REPO_ROOT / "deploy" / "k8s" / "overlays"
Manifest = dict[str, Any]


def load_documents(text: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kustomize_build(kustomize: Path, overlay: Path) -> list[Manifest]:
    out = subprocess.run([str(kustomize), "build", str(overlay)], check=True, capture_output=True, text=True)
    return load_documents(out.stdout)


def of_kind(docs: Iterable[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d.get("kind") == kind]


def _name(doc: Manifest) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def deployment_problems(deployment: Manifest) -> list[str]:
    """Probes, requests and limits, restricted security context, no service-account token, writable /tmp."""
    name = _name(deployment)
    problems: list[str] = []
    pod = deployment.get("spec", {}).get("template", {}).get("spec", {})
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: pod must set automountServiceAccountToken: false")
    pod_sc = pod.get("securityContext", {})
    if pod_sc.get("runAsNonRoot") is not True:
        problems.append(f"{name}: pod securityContext.runAsNonRoot must be true")
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: pod seccompProfile must be RuntimeDefault")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append(f"{name}: host namespaces are not allowed")
    tmp_volumes = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    containers = pod.get("containers", []) + pod.get("initContainers", [])
    if not pod.get("containers"):
        problems.append(f"{name}: has no containers")
    serving = {id(c) for c in pod.get("containers", [])}
    for c in containers:
        where = f"{name} container {c.get('name')}"
        # Init containers run to completion before the pod serves: Kubernetes refuses probes on them.
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            got = c.get(probe, {}).get("httpGet", {}).get("path")
            if id(c) in serving and got != path:
                problems.append(f"{where}: {probe} must GET {path} (found {got!r})")
        resources = c.get("resources", {})
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(section, {}):
                    problems.append(f"{where}: resources.{section}.{resource} is missing")
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem must be true")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged is not allowed")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            problems.append(f"{where}: capabilities must drop ALL and add none")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{where}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{where}: runAsUser 0 (root) is not allowed")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile must be RuntimeDefault")
        tmp_mounts = [m for m in c.get("volumeMounts", []) if m.get("mountPath") == "/tmp"]  # noqa: S108
        if not any(m["name"] in tmp_volumes for m in tmp_mounts):
            problems.append(f"{where}: /tmp must be an emptyDir (the root filesystem is read-only)")
        for env in c.get("env", []):
            if "value" in env and re.search(r"(SECRET|PASSWORD|TOKEN|MONGO_URL|PRIVATE)", env["name"]):
                problems.append(f"{where}: {env['name']} is set inline; reference a Secret instead")
    return problems


def service_account_problems(docs: list[Manifest]) -> list[str]:
    return [
        f"{_name(sa)}: automountServiceAccountToken must be false"
        for sa in of_kind(docs, "ServiceAccount")
        if sa.get("automountServiceAccountToken") is not False
    ]


def no_secrets_problems(docs: list[Manifest]) -> list[str]:
    return [
        f"{_name(d)}: Secrets are created outside git, never in the manifests"
        for d in of_kind(docs, "Secret")
    ]


def topic_problems(docs: list[Manifest], all_topics: Iterable[str], dlq: Any) -> list[str]:
    """Every topic and its DLQ has a KafkaTopic with partitions, replicas and retention."""
    kafka_topics = {d["spec"].get("topicName", d["metadata"]["name"]): d for d in of_kind(docs, "KafkaTopic")}
    problems = []
    for topic in all_topics:
        for name in (topic, dlq(topic)):
            doc = kafka_topics.get(name)
            if doc is None:
                problems.append(f"topic {name} has no KafkaTopic")
                continue
            spec = doc["spec"]
            if not isinstance(spec.get("partitions"), int) or spec["partitions"] < 1:
                problems.append(f"KafkaTopic {name}: partitions must be a positive integer")
            if not isinstance(spec.get("replicas"), int) or spec["replicas"] < 1:
                problems.append(f"KafkaTopic {name}: replicas must be a positive integer")
            if "retention.ms" not in spec.get("config", {}):
                problems.append(f"KafkaTopic {name}: config retention.ms is missing")
    return problems


def strimzi_problems(docs: list[Manifest]) -> list[str]:
    """Enclave's rules for the Strimzi kinds (their schemas are checked by kubeconform): KRaft, node pools, mTLS, ACLs."""
    problems: list[str] = []
    kafkas = of_kind(docs, "Kafka")
    cluster_names = {k["metadata"]["name"] for k in kafkas}
    if len(kafkas) != 1:
        problems.append(f"expected one Kafka, found {len(kafkas)}")
    for k in kafkas:
        annotations = k["metadata"].get("annotations", {})
        if (
            annotations.get("strimzi.io/kraft") != "enabled"
            or annotations.get("strimzi.io/node-pools") != "enabled"
        ):
            problems.append(
                f"{_name(k)}: must run KRaft with node pools (strimzi.io/kraft, strimzi.io/node-pools)"
            )
        if "zookeeper" in k["spec"]:
            problems.append(f"{_name(k)}: ZooKeeper is not used")
        listeners = k["spec"]["kafka"].get("listeners", [])
        if not listeners or any(
            not ls.get("tls") or ls.get("authentication", {}).get("type") != "tls" for ls in listeners
        ):
            problems.append(f"{_name(k)}: every listener must use TLS with mTLS authentication")
        if k["spec"]["kafka"].get("authorization", {}).get("type") != "simple":
            problems.append(f"{_name(k)}: authorization must be simple (ACLs)")
        if k["spec"]["kafka"].get("config", {}).get("auto.create.topics.enable") is not False:
            problems.append(f"{_name(k)}: auto.create.topics.enable must be false (topics are KafkaTopics)")
    pools = of_kind(docs, "KafkaNodePool")
    roles = {role for p in pools for role in p["spec"].get("roles", [])}
    if not {"controller", "broker"} <= roles:
        problems.append(f"node pools must provide controller and broker roles, found {sorted(roles)}")
    for d in pools + of_kind(docs, "KafkaTopic") + of_kind(docs, "KafkaUser"):
        if d["metadata"].get("labels", {}).get("strimzi.io/cluster") not in cluster_names:
            problems.append(f"{_name(d)}: label strimzi.io/cluster must name the Kafka cluster")
    for p in pools:
        if not isinstance(p["spec"].get("replicas"), int) or "storage" not in p["spec"]:
            problems.append(f"{_name(p)}: replicas and storage are required")
    for u in of_kind(docs, "KafkaUser"):
        spec = u["spec"]
        if spec.get("authentication", {}).get("type") != "tls":
            problems.append(f"{_name(u)}: authentication must be tls (mTLS)")
        acls = spec.get("authorization", {}).get("acls", [])
        if spec.get("authorization", {}).get("type") != "simple" or not acls:
            problems.append(f"{_name(u)}: needs simple authorization with ACLs")
        for acl in acls:
            resource = acl.get("resource", {})
            if resource.get("type") not in {"topic", "group", "cluster", "transactionalId"}:
                problems.append(
                    f"{_name(u)}: ACL resource type {resource.get('type')!r} is not a Strimzi type"
                )
            if resource.get("type") == "topic" and resource.get("name") in {"*", ""}:
                problems.append(f"{_name(u)}: wildcard topic ACLs are not allowed")
            if "All" in acl.get("operations", []):
                problems.append(f"{_name(u)}: operation All is not allowed")
    return problems


def acl_topics(user: Manifest, operation: str) -> set[str]:
    return {
        acl["resource"]["name"]
        for acl in user["spec"]["authorization"]["acls"]
        if acl["resource"]["type"] == "topic" and operation in acl["operations"]
    }


def network_policy_problems(docs: list[Manifest]) -> list[str]:
    """A default-deny policy for ingress and egress, and one policy selecting each Deployment's pods."""
    problems = []
    policies = of_kind(docs, "NetworkPolicy")
    if not any(
        p["spec"].get("podSelector") == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    ):
        problems.append("no default-deny NetworkPolicy (empty podSelector, Ingress and Egress, no rules)")
    for dep in of_kind(docs, "Deployment"):
        pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})
        selecting = [
            p
            for p in policies
            if p["spec"].get("podSelector", {}).get("matchLabels")
            and all(pod_labels.get(k) == v for k, v in p["spec"]["podSelector"]["matchLabels"].items())
        ]
        if not selecting:
            problems.append(f"{_name(dep)}: no NetworkPolicy selects its pods")
    return problems


def dockerfile_problems(text: str, package: str, port: int, workspace_members: Iterable[str]) -> list[str]:
    """Parser-level checks of one service Dockerfile (dockerfile-parse)."""
    from io import BytesIO

    from dockerfile_parse import DockerfileParser

    # An in-memory file: without one, DockerfileParser writes ./Dockerfile in the working directory.
    parser = DockerfileParser(fileobj=BytesIO())
    parser.content = text
    instructions = parser.structure
    problems: list[str] = []
    args = {}
    for ins in instructions:
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            key, _, value = ins["value"].partition("=")
            args[key.strip()] = value.strip()
    froms = [ins["value"] for ins in instructions if ins["instruction"] == "FROM"]
    if len(froms) < 2:
        problems.append("must be multi-stage (a build stage and a runtime stage)")
    for value in froms:
        image = value.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        if "$" in image:
            problems.append(f"FROM {value}: unresolved argument")
            continue
        if image.count(":") == 0 and "@sha256:" not in image and not _is_stage(image, froms):
            problems.append(f"FROM {image}: base image must be pinned by tag or digest")
        if image.endswith(":latest"):
            problems.append(f"FROM {image}: 'latest' is not a pin")
    runs = [ins["value"] for ins in instructions if ins["instruction"] == "RUN"]
    syncs = [r for r in runs if "uv sync" in r]
    final_sync = [r for r in syncs if "--no-install-workspace" not in r]
    if not final_sync:
        problems.append("no `uv sync` installs the package itself")
    for r in syncs:
        for flag in ("--frozen", "--no-dev", "--no-editable", f"--package {package}"):
            if flag not in r:
                problems.append(f"`uv sync` must use {flag}")
    if any(re.search(r"\bpip3? install\b", r) for r in runs):
        problems.append("install with uv from the lock, not pip")
    copies = " ".join(ins["value"] for ins in instructions if ins["instruction"] == "COPY")
    for member in workspace_members:
        if f"{member}/pyproject.toml" not in copies:
            problems.append(f"workspace member {member} is missing: uv needs every member's pyproject.toml")
    for ins in instructions:
        if ins["instruction"] == "ADD" and re.search(r"https?://", ins["value"]):
            problems.append("ADD from a URL is not allowed")
    last_from = max(i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM")
    final = instructions[last_from:]
    users = [ins["value"].strip() for ins in final if ins["instruction"] == "USER"]
    if not users:
        problems.append("the runtime stage must set USER")
    elif users[-1].split(":")[0] in {"0", "root"}:
        problems.append(f"the runtime stage runs as {users[-1]}; use a non-root user")
    elif not users[-1].split(":")[0].isdigit():
        problems.append("USER must be numeric so runAsNonRoot can verify it")
    for ins in final:
        if ins["instruction"] == "COPY" and "--from=" not in ins["value"]:
            problems.append(
                f"runtime stage copies from the build context ({ins['value']}); copy the built venv only"
            )
    entry = [ins["value"] for ins in final if ins["instruction"] in {"ENTRYPOINT", "CMD"}]
    if not entry or not entry[-1].lstrip().startswith("[") or f'"{package}"' not in entry[-1]:
        problems.append(f'ENTRYPOINT must be exec form running "{package}"')
    exposed = [ins["value"] for ins in final if ins["instruction"] == "EXPOSE"]
    if str(port) not in " ".join(exposed):
        problems.append(f"EXPOSE {port} is missing")
    return problems


def _is_stage(image: str, froms: list[str]) -> bool:
    return any(len(v.split()) >= 3 and v.split()[2] == image for v in froms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Policy checks on a rendered overlay (stdin or file).")
    parser.add_argument("manifest", type=Path, nargs="?")
    args = parser.parse_args(argv)
    from enclave_common import topics

    docs = load_documents(args.manifest.read_text() if args.manifest else sys.stdin.read())
    problems = [p for d in of_kind(docs, "Deployment") for p in deployment_problems(d)]
    problems += service_account_problems(docs) + no_secrets_problems(docs) + network_policy_problems(docs)
    problems += topic_problems(docs, topics.ALL_TOPICS, topics.dlq) + strimzi_problems(docs)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
