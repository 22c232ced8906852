"""What each service's pods may reach: every endpoint its settings name, and for the gateway, which
holds uploads in plaintext before sealing them, nothing outside the cluster but its IdP."""

from __future__ import annotations

import ipaddress
import urllib.parse

import pytest

from .conftest import OVERLAYS, REPO_ROOT, config_of, kustomize_build, selects

PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]


def _egress_rules(docs, pod_labels):
    """The egress rules of every NetworkPolicy that selects pods with ``pod_labels`` (they add up)."""
    return [
        rule
        for policy in docs
        if policy["kind"] == "NetworkPolicy"
        and "Egress" in policy["spec"].get("policyTypes", [])
        and selects(policy["spec"]["podSelector"], pod_labels)
        for rule in policy["spec"].get("egress", [])
    ]


def _port_allowed(rule, port: int) -> bool:
    return not rule.get("ports") or any(p.get("port") == port for p in rule["ports"])


def _public_blocks(rule) -> list[ipaddress.IPv4Network]:
    """The ipBlocks of ``rule`` that reach addresses outside the private ranges."""
    blocks = [
        ipaddress.ip_network(peer["ipBlock"]["cidr"]) for peer in rule.get("to", []) if "ipBlock" in peer
    ]
    return [b for b in blocks if not any(b.subnet_of(private) for private in PRIVATE)]


def egress_allows(docs, pod_labels, url: str) -> bool:
    """Whether the pods may open a connection to ``url``: a cluster Service (``<name>.<namespace>.svc``)
    through a rule naming its namespace, anything else through a rule with a public ipBlock (the
    address behind a name is not known here)."""
    parsed = urllib.parse.urlsplit(url)
    port = parsed.port or {"https": 443, "http": 80}[parsed.scheme]
    labels = parsed.hostname.split(".")
    for rule in _egress_rules(docs, pod_labels):
        if not _port_allowed(rule, port):
            continue
        if len(labels) >= 3 and labels[2] == "svc":
            namespaces = [
                peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name")
                for peer in rule.get("to", [])
                if "namespaceSelector" in peer
            ]
            if labels[1] in namespaces:
                return True
        elif _public_blocks(rule):
            return True
    return False


def _pod_labels(docs, deployment: str) -> dict[str, str]:
    [dep] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == deployment]
    return dep["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_may_reach_the_object_store_and_collector_its_settings_name(overlay, documents, gen):
    """The dev overlay pointed four services at its in-cluster MinIO (port 9000 in namespace
    enclave-dev-storage) while their policies allowed only HTTPS on 443 outside the cluster: every
    object-store call would have timed out."""
    docs = documents[overlay]
    for service in gen.SERVICES:
        config = config_of(docs, service.group)
        labels = _pod_labels(docs, service.group)
        endpoints = [config["OTEL_EXPORTER_OTLP_ENDPOINT"]]
        if service.s3:
            endpoints.append(config["ENCLAVE_S3_ENDPOINT_URL"])
        for url in endpoints:
            assert egress_allows(docs, labels, url), f"{overlay}: {service.group} may not reach {url}"


def test_the_base_gives_the_gateway_no_address_outside_the_cluster(tools, lint):
    """The gateway holds uploads in plaintext until it has sealed them and holds no object-store
    credentials: it had HTTPS to every public address (the object store, the internet). The base now
    allows it none; an overlay adds its IdP's addresses."""
    docs = lint.load_documents(kustomize_build(tools, REPO_ROOT / "deploy" / "k8s" / "base"))
    labels = _pod_labels(docs, "enclave-gateway")
    blocks = [
        peer for rule in _egress_rules(docs, labels) for peer in rule.get("to", []) if "ipBlock" in peer
    ]
    assert blocks == []
    assert not egress_allows(docs, labels, "https://s3.eu-central-1.amazonaws.com")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_reaches_outside_the_cluster_only_its_identity_providers_jwks(overlay, documents):
    docs = documents[overlay]
    config = config_of(docs, "enclave-gateway")
    labels = _pod_labels(docs, "enclave-gateway")
    public = [(rule, _public_blocks(rule)) for rule in _egress_rules(docs, labels) if _public_blocks(rule)]
    for rule, blocks in public:
        assert [p.get("port") for p in rule.get("ports", [])] == [443], rule
        assert all(block.prefixlen >= 16 for block in blocks), f"{overlay}: {blocks} is wider than an IdP"
    if "ENCLAVE_GATEWAY_OIDC_JWKS_URL" in config:
        assert egress_allows(docs, labels, config["ENCLAVE_GATEWAY_OIDC_JWKS_URL"])
    else:
        # The JWKS-file alternative: the file is mounted, and nothing outside the cluster is needed.
        assert public == []
        [dep] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "enclave-gateway"]
        mounts = [m["mountPath"] for m in dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]]
        assert any(config["ENCLAVE_GATEWAY_OIDC_JWKS_FILE"].startswith(m + "/") for m in mounts)


def test_prod_reaches_private_endpoints_of_s3_and_kms_only_from_their_users_on_443(documents, gen):
    """The base's HTTPS egress excludes the private ranges, so S3, KMS and STS behind VPC interface
    endpoints (private addresses) were unreachable. The prod overlay allows 443 to the endpoints'
    subnets, for exactly the services that call S3 or KMS, and nothing wider than a subnet."""
    docs = documents["prod"]
    (policy,) = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "enclave-private-endpoints"
    ]
    assert policy["spec"]["policyTypes"] == ["Egress"]
    users = {s.group for s in gen.SERVICES if s.s3 or "KMS_KEY_ID" in s.config}
    selector = policy["spec"]["podSelector"]
    selected = {
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "Deployment" and selects(selector, d["spec"]["template"]["metadata"]["labels"])
    }
    assert users and selected == users
    for rule in policy["spec"]["egress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": 443}], rule
        peers = rule["to"]
        assert peers and all(set(peer) == {"ipBlock"} for peer in peers), peers
        for peer in peers:
            block = ipaddress.ip_network(peer["ipBlock"]["cidr"])
            assert any(block.subnet_of(private) for private in PRIVATE), f"{block} is not private"
            assert block.prefixlen >= 20, f"{block} is wider than the endpoints' subnets"
