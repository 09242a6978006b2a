"""The console's Spend page and its CSV over a real control plane app and store: usage seeded in
the ledger (and usage_daily rows written directly, hostile key ids among them) shows per key
and per agent per day as SVG charts and a table; /spend.csv is an attachment whose formula-like
cells are quoted; anonymous visitors go to the login page, a viewer may read both."""

from __future__ import annotations

import csv
import io
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from appliance.config import load_config
from appliance.control.plane import ControlPlane
from appliance.ops.spend import CSV_COLUMNS
from appliance.store import open_store
from appliance.store.agent_store import AgentStore
from appliance.store.inference_store import InferenceStore
from inference.ports import UsageRecord
from tests.console_page_fixtures import browser, log_in, operator_token

HOSTILE_KEY = "<script>alert(1)</script>"
FORMULA_KEY = '=HYPERLINK("http://evil","x")'


def _day(back: int) -> str:
    return (datetime.now(UTC).date() - timedelta(days=back)).isoformat()


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(load_config({"state_dir": str(tmp_path / "s")}))
    state = plane.config.state_dir
    with open_store(state) as store:
        AgentStore(store).deploy("helper", "served", "1.0.0", "sha256:" + "0" * 64, "img", "x")
    now = time.time()
    with InferenceStore(state) as inference:
        agent_key, _ = inference.create_key("sandbox-helper", "sandbox")
        client_key, _ = inference.create_key("ci", "client")
        inference.record_usages(
            [
                UsageRecord(agent_key.id, "m", 1000, 234, 0.1, 200, False, 0.5, now),
                UsageRecord(agent_key.id, "m", 50, 50, 0.1, 200, False, 0.5, now - 2 * 86400),
                UsageRecord(client_key.id, "m", 7, 3, 0.1, 200, False, 0.25, now),
                UsageRecord(client_key.id, "m", 5, 5, 0.1, 200, False, 0.0, now - 40 * 86400),
            ]
        )
        # Rows whose key the store no longer has, named by their (hostile) ids.
        with inference.conn:
            inference.conn.executemany(
                "INSERT INTO usage_daily VALUES (?, ?, ?, ?, ?, ?)",
                [(HOSTILE_KEY, _day(1), 11, 0, 0.0, 1), (FORMULA_KEY, _day(1), 22, 0, 0.0, 1)],
            )
    yield plane
    plane.close()


@pytest.fixture
def viewer(plane: ControlPlane) -> Iterator[TestClient]:
    with browser(plane) as client:
        log_in(client, operator_token(plane, "victor", "viewer"))
        yield client


def test_anonymous_visitors_are_sent_to_log_in(plane: ControlPlane) -> None:
    with browser(plane) as client:
        for path in ("/spend", "/spend.csv", "/fragments/spend"):
            answer = client.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login")


def test_the_page_charts_tokens_per_key_and_per_agent(viewer: TestClient) -> None:
    page = viewer.get("/spend")
    assert page.status_code == 200, page.text
    html = page.text
    assert 'id="spend-total-tokens">1,377<' in html  # 1234 + 100 + 10 + 11 + 22; not 40 days ago
    svgs = {
        el.get("id"): el
        for el in (ET.fromstring(part[: part.index("</svg>") + 6]) for part in _svgs(html))
    }
    assert {"tokens-by-key", "tokens-by-agent", "cost-by-key", "cost-by-agent"} <= set(svgs)
    ns = "{http://www.w3.org/2000/svg}"
    by_agent = svgs["tokens-by-agent"]
    legend = [t.text for t in by_agent.iter(f"{ns}text") if t.get("class") == "chart-legend"]
    assert legend == ["helper"]
    values = [t.text for t in by_agent.iter(f"{ns}text") if t.get("class") == "chart-value"]
    assert values == ["100", "1,234"]
    by_key = svgs["tokens-by-key"]
    legend = {t.text for t in by_key.iter(f"{ns}text") if t.get("class") == "chart-legend"}
    assert legend == {"sandbox-helper", "ci", HOSTILE_KEY, FORMULA_KEY}
    # Escaped in the table and the charts alike; nothing of it runs.
    assert HOSTILE_KEY not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'href="/agents/helper"' in html and 'href="/spend.csv"' in html
    assert "style=" not in html


def _svgs(html: str) -> list[str]:
    return ["<svg" + part for part in html.split("<svg")[1:]]


def test_the_fragment_is_the_live_part(viewer: TestClient) -> None:
    fragment = viewer.get("/fragments/spend")
    assert fragment.status_code == 200
    assert "<html" not in fragment.text and 'id="tokens-by-key"' in fragment.text


def test_the_csv_is_an_attachment_with_formulas_defused(viewer: TestClient) -> None:
    answer = viewer.get("/spend.csv")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert answer.headers["content-disposition"] == (f'attachment; filename="spend-{_day(0)}.csv"')
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    got = {(r["day"], r["key"]): r for r in rows}
    assert len(rows) == 5  # the 40-day-old row is out of the window
    today = got[(_day(0), "sandbox-helper")]
    assert (today["agent"], today["total_tokens"], today["cost"]) == ("helper", "1234", "0.500000")
    assert got[(_day(1), "'" + FORMULA_KEY)]["key_id"] == "'" + FORMULA_KEY
    assert got[(_day(1), HOSTILE_KEY)]["total_tokens"] == "11"
    assert not any(v.startswith(("=", "+", "-", "@")) for r in rows for v in r.values())


def test_an_empty_ledger_is_said_not_drawn_as_data(tmp_path: Path) -> None:
    plane = ControlPlane(load_config({"state_dir": str(tmp_path / "e")}))
    try:
        with browser(plane) as client:
            log_in(client, operator_token(plane, "victor", "viewer"))
            page = client.get("/spend").text
            assert "No usage in this period." in page and "no usage in this period" in page
            assert 'id="cost-by-key"' not in page  # nothing cost anything: no cost charts
            csv_text = client.get("/spend.csv").text
            assert csv_text.strip().splitlines() == [",".join(CSV_COLUMNS)]
    finally:
        plane.close()


def test_the_api_answers_the_same_rows(plane: ControlPlane) -> None:
    token = operator_token(plane, "reader", "viewer")
    with browser(plane) as client:
        client.headers["authorization"] = f"Bearer {token}"
        answer = client.get("/api/v1/spend")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert len(body["days"]) == 30 and body["days"][-1] == _day(0)
        assert body["totals"]["tokens"] == 1377
        today = [r for r in body["rows"] if r["day"] == _day(0) and r["key"] == "sandbox-helper"]
        assert today == [
            {
                "day": _day(0), "key": "sandbox-helper", "key_id": today[0]["key_id"],
                "owner_kind": "sandbox", "agent": "helper", "prompt_tokens": 1000,
                "completion_tokens": 234, "tokens": 1234, "cost": 0.5, "requests": 1,
            }
        ]  # fmt: skip
        # A longer window reaches the 40-day-old row; a window out of range is refused.
        assert client.get("/api/v1/spend", params={"days": 60}).json()["totals"]["tokens"] == 1387
        for bad in ("0", "367", "x"):
            refused = client.get("/api/v1/spend", params={"days": bad})
            assert refused.status_code == 422 and "error" in refused.json()
        del client.headers["authorization"]
        assert client.get("/api/v1/spend").status_code == 401
