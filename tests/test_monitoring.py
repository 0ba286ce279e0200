"""The Grafana dashboard in ``deploy/grafana`` asks only for metrics Kaiten exports, under the names
it exports them (a renamed metric would leave a panel silently empty)."""

from __future__ import annotations

import json
import re

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import shared.metrics  # noqa: F401 - registers the services' metrics
from services.serving.metrics import Metrics
from tests.conftest import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "kaiten-dashboard.json"


def exported() -> set[str]:
    """Every sample name the services and the serving replica expose (counters with ``_total``,
    histograms with ``_bucket``/``_sum``/``_count``)."""
    serving = Metrics()
    text = serving.render({}) + serving.render_vllm_names({}, "m")
    names: set[str] = set()
    for family in [*REGISTRY.collect(), *text_string_to_metric_families(text)]:
        names |= {sample.name for sample in family.samples}
        # a labelled metric no one has set yet has no sample: its names from its type
        names |= {
            "gauge": {family.name},
            "counter": {f"{family.name}_total"},
            "histogram": {f"{family.name}_bucket"},
        }.get(family.type, set())
    return names


def test_every_dashboard_query_uses_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in re.findall(r"\b(?:kaiten_|vllm:)[a-z_:]+", expr)}
    missing = used - exported()
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    for must in ("kaiten_workspaces", "kaiten_consumer_pending", "vllm:num_requests_waiting"):
        assert must in used, must
