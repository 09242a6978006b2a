"""The console's Audit page over a real control plane app and a real hash-chained log: records
newest first through filters (event prefix, actor, sandbox, text, limit), hostile fields shown
escaped, absurd or odd filter values answered with a 422 page that says why, the verification
and head hash, and a tampered log reported as not verified."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from appliance.audit import ChainWriter, audit_path
from appliance.config import load_config
from appliance.control.plane import ControlPlane
from tests.console_page_fixtures import browser, log_in, operator_token

XSS_EVENT = "x.<script>alert(1)</script>"
XSS_ACTOR = '"><img src=x onerror=alert(2)>'


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(load_config({"state_dir": str(tmp_path / "s")}))
    log = ChainWriter(audit_path(plane.config.state_dir))
    log.append("egress.held", sandbox="web", host="evil.example", port=443, actor="proxy")
    log.append("control.kill", sandboxes=["web", "db"], hold=True, actor="alice")
    log.append(XSS_EVENT, actor=XSS_ACTOR, sandbox="<b>s</b>", note="</code><script>x</script>")
    log.append("egress.allowed", sandbox="db", host="pypi.org", port=443, actor="proxy")
    yield plane
    plane.close()


@pytest.fixture
def viewer(plane: ControlPlane) -> Iterator[TestClient]:
    with browser(plane) as client:
        log_in(client, operator_token(plane, "victor", "viewer"))
        yield client


def _events(html: str) -> list[str]:
    """The event column of each row, in the page's order."""
    rows = html.split('<table class="audit">', 1)[-1].split("</table>", 1)[0]
    return [cells.split("<td>")[3].split("</td>")[0] for cells in rows.split("<tr>")[2:]]


def test_anonymous_visitors_are_sent_to_log_in(plane: ControlPlane) -> None:
    with browser(plane) as client:
        answer = client.get("/audit")
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")


def test_the_tail_is_newest_first_with_the_verification(viewer: TestClient) -> None:
    page = viewer.get("/audit")
    assert page.status_code == 200
    events = _events(page.text)
    # The newest first: the operator's creation and login come after the seeded records.
    seeded = [e for e in events if not e.startswith(("control.request", "operator."))]
    assert seeded == [
        "egress.allowed",
        "x.&lt;script&gt;alert(1)&lt;/script&gt;",
        "control.kill",
        "egress.held",
    ]
    assert 'id="verify-result">verified:' in page.text
    head = json.loads(
        (audit_path(viewer.app.state.plane.config.state_dir).parent / "audit.head").read_text()
    )
    assert f'<code id="head-hash">{head["hash"]}</code>' in page.text


def test_hostile_fields_are_escaped(viewer: TestClient) -> None:
    html = viewer.get("/audit", params={"event": "x."}).text
    assert "<script>" not in html and "<img src=x" not in html and "<b>s</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html and "&lt;b&gt;s&lt;/b&gt;" in html


@pytest.mark.parametrize(
    ("params", "events"),
    [
        ({"event": "egress."}, ["egress.allowed", "egress.held"]),
        ({"actor": "alice"}, ["control.kill"]),
        ({"sandbox": "db"}, ["egress.allowed", "control.kill"]),  # a kill names its sandboxes
        ({"text": "EVIL.example"}, ["egress.held"]),
        ({"event": "egress.", "limit": "1"}, ["egress.allowed"]),
        ({"event": "egress.*"}, []),  # a prefix, not a pattern
    ],
)
def test_filters(viewer: TestClient, params: dict[str, str], events: list[str]) -> None:
    page = viewer.get("/audit", params=params)
    assert page.status_code == 200
    assert _events(page.text) == events
    for value in params.values():
        assert f'value="{value}"' in page.text  # the form keeps what was asked


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"text": "x" * 20_000}, "text: at most 200 characters"),
        ({"actor": "a\x00b"}, "actor: control characters are not allowed"),
        ({"limit": "-1"}, "limit: a whole number"),
        ({"limit": "1" * 50}, "limit: a whole number"),
        ({"sandbox": "\u202e\"'><"}, None),  # odd, but only text: matched as is, no error
    ],
)
def test_absurd_filters_are_answered_not_crashed_on(
    viewer: TestClient, params: dict[str, str], said: str | None
) -> None:
    page = viewer.get("/audit", params=params)
    if said is None:
        assert page.status_code == 200 and _events(page.text) == []
        assert "&#34;&#39;&gt;&lt;" in page.text
    else:
        assert page.status_code == 422 and said in page.text
        assert "x" * 300 not in page.text  # the absurd value is not echoed back


def test_a_tampered_log_is_reported(viewer: TestClient) -> None:
    path = audit_path(viewer.app.state.plane.config.state_dir)
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"alice"', '"mallory"')
    path.write_text("".join(lines))
    page = viewer.get("/audit")
    assert 'id="verify-result">NOT verified:' in page.text
    assert "edited" in page.text
