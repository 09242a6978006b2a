"""The Grafana dashboard the Ansible collection ships (roles/appliance_grafana/files/appliance.json)
queries only what the appliance exports: every metric name in every panel's and variable's PromQL
is looked up in a real gateway app's /metrics, scraped after real requests through a stand-in vLLM
process, with the GPU gauges fed by hardware.telemetry over a fake NVML (injected through
create_app's `telemetry`). Also: the dashboard's shape (sections, datasource variable, no uid
baked in) and the name extraction itself."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from appliance.store.inference_store import InferenceStore
from hardware.telemetry import collect
from inference.gateway import GatewaySettings, Price, create_app
from inference.ports import Budget
from tests.fakes.fake_nvml import GB10, H100_80GB_HBM3_SXM, FakeNVML
from tests.helpers import free_port
from tests.integration.gateway_harness import start_fake_vllm, stop

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "ansible" / "roles" / "appliance_grafana" / "files" / "appliance.json"
DS_REF = "${datasource}"

# -- PromQL: the metric names an expression selects ------------------------------------------

# Words that are PromQL syntax, not selectors (functions and aggregations are told apart by the
# "(" that follows them).
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_WORD = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.*),\s*\w+\s*\)\s*$", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """The metric names selected in `expr`: label matchers, ranges, label lists of by/on/...,
    strings, numbers, Grafana variables, functions and keywords removed."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers (strings already blanked)
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = _LABEL_LIST.sub(" ", s)
    s = _GRAFANA_VAR.sub(" ", s)
    names = set()
    for word in _WORD.finditer(s):
        if s[word.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word.group().lower() not in _KEYWORDS:
            names.add(word.group())
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            "histogram_quantile(0.95, sum by (le) (rate(x_seconds_bucket[$__rate_interval])))",
            {"x_seconds_bucket"},
        ),
        ('a_total{name=~"b_total|c", k!="d e"} offset 5m', {"a_total"}),
        ("sum(rate(a[1d])) by (key, name) * on (key) group_left (name) b_info", {"a", "b_info"}),
        ("x / ignoring(kind) y > bool 1e3", {"x", "y"}),
        ("max_over_time(g[${__range}:1m]) unless on() vector(1)", {"g"}),
        ("1 + 2.5e-3", set()),
    ],
)
def test_metric_names_are_extracted(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# -- the dashboard ---------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # a collapsed row holds its panels


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = _LABEL_VALUES.match(query)
            found.append((f"variable {var['name']}", match["expr"] if match else query))
    return found


def datasource_refs(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_refs(value)


def test_the_dashboard_covers_inference_spend_and_gpu() -> None:
    dashboard = load_dashboard()
    panels = list(all_panels(dashboard["panels"]))
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Inference", "Agents: spend and budgets", "GPU"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    wanted = {
        "Requests/s by status",
        "Latency (to the last byte)",
        "Time to first token p95",
        "Tokens/s",
        "Requests in flight",
        "Backend up",
        "Tokens per day by key (rolling 24 h)",
        "Budget state by key",
        "GPU memory",
        "GPU utilisation",
        "GPU temperature",
        "GPU power",
        "GPU throttle reasons",
    }
    assert wanted <= {p["title"] for p in panels}


def test_no_datasource_uid_is_baked_in() -> None:
    """Every panel and target names the `datasource` variable; it offers Prometheus sources."""
    dashboard = load_dashboard()
    [var] = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert (var["type"], var["query"]) == ("datasource", "prometheus")
    refs = list(datasource_refs(dashboard["panels"])) + list(
        datasource_refs(dashboard["templating"])
    )
    assert refs
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": DS_REF}, ref
    assert "__inputs" not in dashboard  # an import-time placeholder: provisioning cannot fill it


# -- what a real gateway exports -------------------------------------------------------------


class Scrape:
    """One /metrics answer: the series names each family may be queried by, and those that
    hold samples now. A counter is queried as NAME_total, a histogram as NAME_bucket, _sum and
    _count, a gauge as its name; any other spelling is not exported."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.series: set[str] = set()
        self.with_samples: set[str] = set()
        for family in self.families.values():
            if family.type == "counter":
                self.series.add(family.name + "_total")
            elif family.type == "histogram":
                self.series |= {family.name + s for s in ("_bucket", "_sum", "_count")}
            else:
                self.series.add(family.name)
            self.with_samples |= {s.name for s in family.samples}

    def samples(self, name: str) -> list[Any]:
        return [s for f in self.families.values() for s in f.samples if s.name == name]


# Series that only an event a short test cannot cause honestly carries: declared, not sampled.
EVENT_ONLY = {"appliance_gateway_budget_warnings_total"}


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    """A real gateway app in front of a stand-in vLLM process: one streamed chat by agent-a
    (priced, under a budget), one refused by agent-b's spent budget, one unknown route; then
    GET /metrics with a metrics-scoped key. GPUs: an H100 (power-capped) and a GB10."""
    port = free_port()
    backend = start_fake_vllm(port)
    telemetry = functools.partial(collect, FakeNVML([H100_80GB_HBM3_SXM, GB10]))
    settings = GatewaySettings(
        backend_url=f"http://127.0.0.1:{port}",
        prices={"nemotron": Price(prompt_per_1m=1.0, completion_per_1m=2.0)},
    )
    try:
        with InferenceStore(tmp_path_factory.mktemp("gateway")) as store:
            agent_a, secret_a = store.create_key("agent-a", "sandbox")
            agent_b, secret_b = store.create_key("agent-b", "sandbox")
            store.set_budget(Budget(agent_a.id, daily_tokens=100_000))
            store.set_budget(Budget(agent_b.id, daily_tokens=0))
            _, scraper = store.create_key("prometheus", "client", scopes=["metrics"])
            app = create_app(settings, store, store, store, store, telemetry=telemetry)
            with TestClient(app, raise_server_exceptions=False) as client:
                body = {
                    "model": "nemotron",
                    "messages": [{"role": "user", "content": "hello there"}],
                    "max_tokens": 4,
                    "stream": True,
                }
                ok = client.post("/v1/chat/completions", headers=bearer(secret_a), json=body)
                assert ok.status_code == 200, ok.text
                assert "data: [DONE]" in ok.text
                refused = client.post("/v1/chat/completions", headers=bearer(secret_b), json=body)
                assert refused.status_code == 429, refused.text
                resp = client.get("/metrics", headers=bearer(scraper))
                assert resp.status_code == 200, resp.text
            result = Scrape(resp.text)
            result.agent_a, result.agent_b = agent_a, agent_b  # type: ignore[attr-defined]
            yield result
    finally:
        stop(backend)


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def test_every_query_names_a_metric_the_gateway_exports(scrape: Scrape) -> None:
    used: set[str] = set()
    for where, expr in queries(load_dashboard()):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        missing = names - scrape.series
        assert not missing, f"{where} queries {sorted(missing)}, not exported by /metrics"
        used |= names
    # Each queried series holds data after real traffic (not merely a declared family).
    assert not (used - EVENT_ONLY) - scrape.with_samples, sorted(used - scrape.with_samples)
    assert {"appliance_gpu_throttle", "appliance_key_info"} <= used  # the new gauges are used


@pytest.mark.parametrize(
    "wrong",
    [
        "appliance_gateway_requests",  # a counter without _total
        "appliance_gateway_request_seconds",  # a histogram without _bucket/_sum/_count
        "appliance_gpu_temperature_celsius_total",  # a gauge with a counter's suffix
        "appliance_gateway_budget_state_bucket",
        "appliance_gpu_temprature_celsius",
    ],
)
def test_a_wrong_name_or_suffix_is_not_exported(scrape: Scrape, wrong: str) -> None:
    assert wrong not in scrape.series


def test_the_spend_join_finds_the_agents_names(scrape: Scrape) -> None:
    """Spend series carry the key id; appliance_key_info maps that id to the agent's name."""
    agent_a = scrape.agent_a  # type: ignore[attr-defined]
    names = {s.labels["key"]: s.labels["name"] for s in scrape.samples("appliance_key_info")}
    assert names[agent_a.id] == "agent-a"
    [prompt] = scrape.samples("appliance_gateway_prompt_tokens_total")
    assert prompt.labels["key"] == agent_a.id and prompt.value == 2  # "hello there"
    states = {s.labels["key"]: s.value for s in scrape.samples("appliance_gateway_budget_state")}
    assert states == {agent_a.id: 0, scrape.agent_b.id: 2}  # type: ignore[attr-defined]


def test_the_gpu_gauges_come_from_the_injected_telemetry(scrape: Scrape) -> None:
    power = {s.labels["name"]: s.value for s in scrape.samples("appliance_gpu_power_watts")}
    assert power == {"NVIDIA H100 80GB HBM3": 312.456, "NVIDIA GB10": 11.25}
    throttle = {
        (s.labels["gpu"], s.labels["reason"]) for s in scrape.samples("appliance_gpu_throttle")
    }
    assert throttle == {("0", "sw_power_cap"), ("1", "gpu_idle")}
    kinds = {s.labels["memory"] for s in scrape.samples("appliance_gpu_memory_total_bytes")}
    assert kinds == {"dedicated", "unified"}
