# ruff: noqa: E501 -- kubeconform templates, ACL literals and mutation tables read best on one line
"""Fixtures for the deploy tests: the pinned tools (scripts/install-deploy-tools.sh) and rendered overlays.

These are unit-level: no cluster, no network. The tools are installed once per version by
``scripts/install-deploy-tools.sh``; a missing tool fails the test with that command to run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod")
SERVICES = {"gateway": 8080, "ingest": 8081, "deid": 8082, "analysis": 8083, "audit": 8084}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def tools_env() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "deploy" / "tools.env").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            pins[key] = value
    return pins


@pytest.fixture(scope="session")
def lint() -> ModuleType:
    return _load("deploy_lint")


@pytest.fixture(scope="session")
def gen() -> ModuleType:
    return _load("deploy_gen")


@pytest.fixture(scope="session")
def tools() -> dict[str, Path]:
    pins = tools_env()
    cache = Path(
        os.environ.get("ENCLAVE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "enclave"
    )
    found = {
        "kustomize": cache / f"kustomize-{pins['KUSTOMIZE_VERSION']}" / "kustomize",
        "kubeconform": cache / f"kubeconform-{pins['KUBECONFORM_VERSION']}" / "kubeconform",
        "promtool": cache / f"promtool-{pins['PROMTOOL_VERSION']}" / "promtool",
        "schemas": cache
        / (
            f"deploy-schemas-k8s{pins['KUBERNETES_VERSION']}-kv{pins['K8S_SCHEMA_PYPI_VERSION']}"
            f"-keda{pins['KEDA_VERSION']}-promop{pins['PROMETHEUS_OPERATOR_VERSION']}"
            f"-strimzi{pins['STRIMZI_API_VERSION']}-gen{pins['STRIMZI_CRD_GENERATOR_VERSION']}"
        ),
    }
    missing = [name for name, path in found.items() if not path.exists()]
    if missing:
        pytest.fail(f"deploy tools missing ({', '.join(missing)}): run scripts/install-deploy-tools.sh")
    return found


def kustomize_build(tools: dict[str, Path], directory: Path) -> str:
    result = subprocess.run(
        [str(tools["kustomize"]), "build", str(directory)], capture_output=True, text=True
    )
    assert result.returncode == 0, f"kustomize build {directory} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def rendered(tools: dict[str, Path]) -> dict[str, str]:
    """`kustomize build` of every overlay, as YAML text."""
    return {
        overlay: kustomize_build(tools, REPO_ROOT / "deploy" / "k8s" / "overlays" / overlay)
        for overlay in OVERLAYS
    }


@pytest.fixture(scope="session")
def documents(rendered: dict[str, str], lint: ModuleType) -> dict[str, list[dict[str, Any]]]:
    return {overlay: lint.load_documents(text) for overlay, text in rendered.items()}


def config_of(docs: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    """The data of the ConfigMap ``deployment``'s container takes its environment from (its name
    carries kustomize's hash suffix, so it is found through the Deployment's reference)."""
    [dep] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == deployment]
    [container] = dep["spec"]["template"]["spec"]["containers"]
    [source] = container["envFrom"]
    name = source["configMapRef"]["name"]
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    return dict(config.get("data", {}))


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects ``labels``."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True
