"""Monitoring reads metrics that exist, Prometheus loads all of it, and a stalled consumer pages."""

from __future__ import annotations

import json
import re
import urllib.parse

import pytest
from enclave_common import topics
from enclave_ingest.config import IngestSettings

from .conftest import OVERLAYS, REPO_ROOT

#: The metric families the Kafka exporter Strimzi deploys (kafkaExporter in the Kafka resource) serves.
KAFKA_EXPORTER_FAMILIES = {
    "kafka_brokers",
    "kafka_broker_info",
    "kafka_topic_partitions",
    "kafka_topic_partition_current_offset",
    "kafka_topic_partition_oldest_offset",
    "kafka_topic_partition_in_sync_replica",
    "kafka_topic_partition_leader",
    "kafka_topic_partition_leader_is_preferred",
    "kafka_topic_partition_replicas",
    "kafka_topic_partition_under_replicated_partition",
    "kafka_consumergroup_current_offset",
    "kafka_consumergroup_current_offset_sum",
    "kafka_consumergroup_lag",
    "kafka_consumergroup_lag_sum",
    "kafka_consumergroup_members",
}
METRIC = re.compile(r"\b((?:enclave|kafka)_[a-z0-9_]+)(?=\{|\[|\)|\s|$)")


def _exported_enclave_metrics() -> set[str]:
    """The series names the services' code registers with prometheus_client, with the suffixes it
    adds: counters ``_total``, histograms ``_bucket``, ``_count`` and ``_sum``."""
    registered = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"(enclave_[a-z0-9_]+)\"")
    suffixes = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_count", "_sum")}
    names = set()
    for path in [*REPO_ROOT.glob("libs/*/src/**/*.py"), *REPO_ROOT.glob("services/*/src/**/*.py")]:
        for kind, name in registered.findall(path.read_text()):
            names |= {name + suffix for suffix in suffixes[kind]}
    return names


def _alerts(docs):
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_alerts_and_panels_read_only_metrics_that_something_exports(documents):
    """A rule on a metric nobody exports never fires: every ``enclave_*`` series an alert or a panel
    reads is registered by the services' code, every ``kafka_*`` one is the Kafka exporter's."""
    docs = documents["prod"]
    (dashboard,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "enclave-grafana-dashboard"
    ]
    panels = json.loads(dashboard["data"]["enclave.json"])["panels"]
    exprs = [r["expr"] for r in _alerts(docs).values()] + [t["expr"] for p in panels for t in p["targets"]]
    exported = _exported_enclave_metrics() | KAFKA_EXPORTER_FAMILIES
    assert "enclave_handler_seconds_count" in exported and "enclave_audit_chain_length" in exported
    unknown = {m for expr in exprs for m in METRIC.findall(expr)} - exported
    assert unknown == set()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_kafka_exporter_runs_for_every_consumer_group_and_is_scraped(overlay, documents, gen):
    docs = documents[overlay]
    (kafka,) = [d for d in docs if d["kind"] == "Kafka"]
    exporter = kafka["spec"]["kafkaExporter"]
    for service in gen.SERVICES:
        assert re.fullmatch(exporter["groupRegex"], service.group), service.group
        for topic in service.reads:
            assert re.fullmatch(exporter["topicRegex"], topic), topic
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    assert (
        monitor["spec"]["selector"]["matchLabels"]["strimzi.io/name"]
        == f"{kafka['metadata']['name']}-kafka-exporter"
    )


def test_a_stalled_consumer_pages(documents, gen):
    """Lag growing was alerted; lag that stays put was not (a handler stuck on one event, an event
    retried forever, a consumer that stopped fetching), nor a group that lost every member. Both
    page now, for every consumer group."""
    alerts = _alerts(documents["prod"])
    stalled = alerts["EnclaveConsumerStalled"]
    empty = alerts["EnclaveConsumerGroupEmpty"]
    for alert in (stalled, empty):
        assert alert["labels"]["severity"] == "critical"
        assert "kafka_consumergroup_lag" in alert["expr"]
        for selector in re.findall(r'consumergroup=~"([^"]+)"', alert["expr"]):
            assert all(re.fullmatch(selector, s.group) for s in gen.SERVICES), selector
    assert "changes(kafka_consumergroup_current_offset" in stalled["expr"]
    assert "kafka_consumergroup_members" in empty["expr"] and "== 0" in empty["expr"]
    # Ingest holds its offset on the chunk topic at an unfinished instance until it gives it up: that
    # topic's window must outlast ENCLAVE_INGEST_INCOMPLETE_AFTER_S, or every broken-off upload pages.
    windows = dict(
        re.findall(r'topic(!?)="' + re.escape(topics.UPLOAD_CHUNK) + r'"\}\[(\d+)m\]', stalled["expr"])
    )
    incomplete_after_min = IngestSettings.model_fields["incomplete_after_s"].default / 60
    assert int(windows[""]) > incomplete_after_min and int(windows["!"]) < incomplete_after_min


def test_analysis_stalling_is_alerted_from_what_it_publishes(documents):
    """Analysis's consumer lag stays near zero while its analyses stall: it files each instance in its
    assembler at once. The alert compares what reached it with the outcomes it published."""
    expr = _alerts(documents["prod"])["EnclaveAnalysisStalled"]["expr"]
    watched = re.findall(r'topic=~?"([^"]+)"', expr)
    assert watched[0] == topics.INSTANCE_DEIDENTIFIED
    outcomes = re.compile(watched[1].replace("\\\\", "\\"))
    assert {t for t in topics.ALL_TOPICS if outcomes.fullmatch(t)} == {
        topics.ANALYSIS_COMPLETED,
        topics.ANALYSIS_FAILED,
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_selects_the_rules_and_the_scrape_targets_by_the_same_labels(overlay, documents):
    """Prometheus loads ServiceMonitors, PodMonitors and PrometheusRules through label selectors;
    the rule carried ``release: prometheus`` and the monitors nothing, so a Prometheus that loaded
    the rules scraped none of the metrics they read (or the reverse)."""
    docs = documents[overlay]
    kinds = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
    labels = {d["kind"]: d["metadata"].get("labels", {}) for d in docs if d["kind"] in kinds}
    assert set(labels) == set(kinds)
    assert len({json.dumps(v, sort_keys=True) for v in labels.values()}) == 1, labels
    assert labels["PrometheusRule"].get("release") == "prometheus"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_analysis_scales_on_the_series_waiting_for_it(overlay, documents):
    """Analysis's lag stays near zero while series wait in MongoDB for minutes of CPU each: scaled on
    lag alone it stayed at its floor with a backlog. KEDA asks Prometheus for the backlog every
    replica reports (``max``, not ``sum``), one replica per waiting series, besides the lag."""
    docs = documents[overlay]
    (scaled,) = [
        d for d in docs if d["kind"] == "ScaledObject" and d["metadata"]["name"] == "enclave-analysis"
    ]
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"kafka", "prometheus"}
    (backlog,) = [t for t in triggers if t["type"] == "prometheus"]
    query = backlog["metadata"]["query"]
    ready, in_hand = METRIC.findall(query)
    assert {ready, in_hand} <= _exported_enclave_metrics()
    assert (ready, in_hand) == ("enclave_analysis_series_ready", "enclave_analysis_series_in_progress")
    # Waiting series (every replica sees them all: max) plus those being analysed (each replica its
    # own: sum), so a replica in an analysis is not scaled away once its series leaves the ready count.
    where = f'{{namespace="{scaled["metadata"]["namespace"]}"}}'
    assert query == f"max({ready}{where}) + (sum({in_hand}{where}) or vector(0))"
    assert float(backlog["metadata"]["threshold"]) == 1
    # The Prometheus asked is the one the services admit scrapes from.
    address = urllib.parse.urlsplit(backlog["metadata"]["serverAddress"])
    assert address.scheme == "http" and address.port == 9090
    _, namespace, svc = address.hostname.split(".")
    assert svc == "svc"
    (policy,) = [
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "enclave-analysis"
    ]
    scrapers = [
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
    ]
    assert namespace in scrapers
    others = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "ScaledObject"
        and d is not scaled
        and any(t["type"] != "kafka" for t in d["spec"]["triggers"])
    ]
    assert others == []
