"""The operator's console in a real browser (headless Chromium, tests/browser.py) against a real
control plane and a real sandbox: what an operator sees and does, and what a viewer may not.

The sandbox's agent (origin_namespace.JOB_AGENT) makes each request the test hands it through the
real egress proxy; an unknown host is held until someone decides. The control plane runs in the
origin's namespace (tests/integration/origin_namespace.py: an approval never opens a private
address, so the origin has a public one there), and the browser reaches its port through
`forwarded_port`. CLI commands reach the control plane through its unix socket.

The steps share one browser, one control plane and one sandbox, and run in order: the viewer
first, then the operator's approval of a live request, a refused form, and the kill switch last.
Every page is saved as a screenshot (tests/browser.py: artifacts).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sandbox.proxy.addresses import is_forbidden
from tests.agent_fixtures import TURN, blueprint_doc
from tests.browser import Console, artifacts_dir, chromium, skip_without_browser
from tests.control_fixtures import running_control_plane
from tests.helpers import cli_env, free_port
from tests.integration.control_lab import Plane
from tests.integration.origin_namespace import (
    JOB_AGENT,
    PUBLIC_IP,
    drop_job,
    forwarded_port,
    job_result,
    origin_namespace,
    received,
    webhook_receiver,
)
from tests.integration.origin_namespace import (
    skip_reason as origin_skip_reason,
)
from tests.sandbox_fixtures import (
    ensure_base_image,
    force_remove_container,
    kill_proxies,
    podman_client,
    run_cli,
    service_home,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

skip_without_browser(allow_module_level=True)  # under CI: fails instead (never hidden)
if (_why := origin_skip_reason()) is not None:
    pytest.skip(_why, allow_module_level=True)

HOSTS = (
    "console",
    "viewer",
    "tap",
)  # <name>.origin.test: public addresses in the origin's namespace
SHOWN_WITHIN_S = 2.0  # a held request is on the open Approvals page this soon, without a reload
RESULT_TIMEOUT_S = 45.0  # for the agent's outcome once decided (slow 2-core machines)
OPERATOR, VIEWER = "olga", "vic"
HOOK, SECRET_ENV = "phone", "BROWSER_TEST_HOOK_SECRET"
MARKER = "window.__consoleTestMarker"  # set by the test; a reload would drop it


@dataclass
class Lab:
    plane: Plane  # the CLI and the API on the control plane's unix socket
    console: Console  # the browser on the control plane's port
    box: str  # the sandbox whose agent makes the requests
    tokens: dict[str, str]  # operator name -> token
    inbox: Path  # the webhook receiver's deliveries
    jobs: dict[str, str] = field(default_factory=dict)  # host -> the agent's job asking it
    agents: list[str] = field(default_factory=list)  # made by the steps, removed at the end

    @property
    def home(self) -> Path:
        home = service_home()
        assert home is not None
        return home / "homes" / self.box  # SandboxPaths.home: the agent's /home/agent

    def audit(self, **match: Any) -> list[dict[str, Any]]:
        log = self.plane.state / "audit" / "audit.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines() if line]
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    def held(self, host: str) -> dict[str, Any]:
        """The pending approval of `host` from the sandbox (it must be held already)."""
        [pending] = [
            p for p in self.plane.pending() if p["sandbox"] == self.box and p["host"] == host
        ]
        return pending


def _notify_config(scratch: Path, hook_port: int, console_port: int) -> Path:
    config = scratch / "appliance.yaml"
    hook = {
        "name": HOOK,
        "url": f"http://127.0.0.1:{hook_port}/hook",
        "events": ["approval.pending"],
        "format": "json",
        "secret_env": SECRET_ENV,
    }
    notify = {"one_tap": True, "console_url": f"http://127.0.0.1:{console_port}"}
    config.write_text(yaml.safe_dump({"notify": {**notify, "webhooks": [hook]}}))
    return config


def _operator_token(plane: Plane, name: str, role: str) -> str:
    made = plane.cli("operators", "create", name, "--role", role, "--json")
    return json.loads(made.stdout)["secret"]


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    assert not is_forbidden(PUBLIC_IP), "the test needs an address the proxy treats as public"
    ensure_base_image()  # also starts the service user's podman outside the test namespace
    scratch = Path(tempfile.mkdtemp(prefix="console-"))  # short: unix sockets live under it
    env = cli_env(scratch / "s", scratch)
    env["APPLIANCE_CONTROL__PORT"] = str(free_port())  # inside the origin's namespace
    plane = Plane(scratch=scratch, env=env, port=int(env["APPLIANCE_CONTROL__PORT"]))
    box = f"console-{os.getpid()}"
    inbox = scratch / "inbox"
    inbox.mkdir()
    shots = artifacts_dir(request.config, Path(__file__).stem)
    try:
        with contextlib.ExitStack() as stack:
            origin = stack.enter_context(origin_namespace(scratch, HOSTS))
            hook_port = stack.enter_context(webhook_receiver(origin, inbox))
            port = stack.enter_context(forwarded_port(origin, plane.port))
            # Held requests are pushed to the "phone" with a one-tap link to this console.
            env["APPLIANCE_SYSTEM_CONFIG"] = str(_notify_config(scratch, hook_port, port))
            env[SECRET_ENV] = "browser-test-secret-0123456789"
            plane.proc = stack.enter_context(
                running_control_plane(env, plane.state, prefix=origin.in_namespace)
            )
            driver = stack.enter_context(chromium(shots / "chromedriver.log"))
            tokens = {
                OPERATOR: _operator_token(plane, OPERATOR, "operator"),
                VIEWER: _operator_token(plane, VIEWER, "viewer"),
            }
            plane.created.add(box)
            command = ["--", "python3", "-I", "-c", JOB_AGENT]
            plane.cli("sandbox", "create", box, "--policy", str(plane.policy_file(box)), *command)
            console = Console(driver, f"http://127.0.0.1:{port}", shots)
            made = Lab(plane, console, box, tokens, inbox)
            try:
                yield made
            finally:
                for name in made.agents:
                    run_cli("agent", "rm", name, env=env)
                for name in sorted(plane.created):
                    run_cli("sandbox", "rm", name, env=env)
    finally:
        for name in sorted(plane.created):
            force_remove_container(name)
            kill_proxies(name, plane.state)
        shutil.rmtree(scratch, ignore_errors=True)


def _mark_page(console: Console) -> None:
    console.driver.execute_script(f"{MARKER} = 'still here';")


def _not_reloaded(console: Console) -> bool:
    return console.driver.execute_script(f"return {MARKER} === 'still here';") is True


def _row_text(console: Console, approval_id: str) -> str:
    """The approval's row as shown (it must appear within SHOWN_WITHIN_S)."""
    return console.until(
        f"approval {approval_id} on the page",
        lambda d: console.text(f"#a-{approval_id}"),
        timeout=SHOWN_WITHIN_S,
    )


def _row_of_host(console: Console, host: str) -> str | None:
    """The id of the first approval row that names `host`."""
    return console.driver.execute_script(
        "for (const r of document.querySelectorAll('tr[id^=\"a-\"]'))"
        "  if (r.innerText.includes(arguments[0])) return r.id;"
        "return null;",
        host,
    )


def _buttons_in(console: Console, selector: str) -> int:
    return console.driver.execute_script(
        "return document.querySelectorAll(arguments[0] + ' button').length;", selector
    )


# -- the steps, in order ---------------------------------------------------------------------


def test_1_an_anonymous_visit_goes_to_the_login_page(lab: Lab) -> None:
    console = lab.console
    console.logout()
    console.open("/approvals")
    console.until("the login page", lambda d: console.path == "/login")
    assert console.cookie("appliance_session") is None
    console.wait_for("input[name=token]")
    console.screenshot("login")


def test_2_a_viewer_sees_a_held_request_but_cannot_act(lab: Lab) -> None:
    console = lab.console
    console.login(lab.tokens[VIEWER])
    cookie = console.driver.get_cookie("appliance_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict", cookie
    job = lab.jobs["viewer.origin.test"] = drop_job(lab.home, "http://viewer.origin.test/v")
    pending = lab.plane.wait_pending(lab.box, 1)
    [held] = [p for p in pending if p["host"] == "viewer.origin.test"]
    console.open("/approvals")
    row = _row_text(console, held["id"])
    assert "viewer.origin.test" in row and lab.box in row, row
    assert not _buttons_in(console, f"#a-{held['id']}"), "a viewer is shown buttons to decide"
    assert not console.css("form[action*='/approve'], form[action*='/deny']")
    console.screenshot("approvals-viewer")
    console.open("/kill")
    assert not console.css("form[action='/kill/confirm'], form[action='/kill']")
    console.screenshot("kill-viewer")

    # The API and the console's own routes refuse the viewer's action, whatever the page shows.
    with httpx.Client(base_url=console.base_url, timeout=30) as client:
        bearer = {"Authorization": f"Bearer {lab.tokens[VIEWER]}"}
        refused = client.post(f"/api/v1/approvals/{held['id']}/approve", headers=bearer)
        assert refused.status_code == 403, refused.text
        assert f"{VIEWER} is a viewer" in refused.json()["error"]["message"], refused.text
        client.cookies.set("appliance_session", cookie["value"])
        csrf = _csrf_of(console)
        form = client.post(
            f"/approvals/{held['id']}/approve",
            data={"csrf": csrf or "", "persist": ""},
            headers={"Origin": console.base_url},
        )
        assert form.status_code == 403, form.text
    assert job_result(lab.home, job, timeout=1.0) is None, "the viewer's refusal decided it"
    assert lab.held("viewer.origin.test")["id"] == held["id"]


def _csrf_of(console: Console) -> str | None:
    """The session's CSRF token as the page carries it (a form's hidden field, or a meta tag)."""
    found = console.css("input[name=csrf]") or console.css("meta[name=csrf-token]")
    if not found:
        return None
    return found[0].get_attribute("value") or found[0].get_attribute("content")


def test_3_an_operator_sees_a_new_request_live_and_approves_it(lab: Lab) -> None:
    console = lab.console
    console.login(lab.tokens[OPERATOR])
    console.open("/approvals")
    console.wait_for("body")
    _mark_page(console)
    t0 = time.monotonic()
    job = drop_job(lab.home, "http://console.origin.test/ok?x=1")
    # The row appears on the open page: the test looks only at the page (no API call first).
    row_id = console.until(
        "the held request on the Approvals page",
        lambda d: _row_of_host(console, "console.origin.test"),
        timeout=SHOWN_WITHIN_S,
    )
    shown_s = time.monotonic() - t0
    print(f"held request shown {shown_s:.2f} s after the agent's request", flush=True)
    assert _not_reloaded(console), "the page was reloaded to show the request"
    held = lab.held("console.origin.test")
    assert row_id == f"a-{held['id']}"
    row = _row_text(console, held["id"])
    for shown in (lab.box, "console.origin.test", "80", "GET", "/ok"):
        assert shown in row, (shown, row)
    console.screenshot("approvals")
    assert job_result(lab.home, job, timeout=0.5) is None, "the request was not held"

    console.click(f"#a-{held['id']} button.approve")  # once, not persisted
    result = job_result(lab.home, job, timeout=RESULT_TIMEOUT_S)
    assert result is not None and result.get("status") == 200, result
    assert result["body"] == "origin console.origin.test GET /ok?x=1", result
    console.until("the row gone", lambda d: not console.css(f"#a-{held['id']}"))
    [decided] = lab.audit(event="control.approval.approved", approval=held["id"])
    assert decided["actor"] == OPERATOR and decided["actor_kind"] == "console", decided
    assert decided["persist"] is False and decided["sandbox"] == lab.box, decided
    assert lab.audit(event="egress.approved", sandbox=lab.box, approval=held["id"])
    console.screenshot("approvals-approved")


def test_4_the_operator_denies_from_the_page(lab: Lab) -> None:
    console = lab.console
    held = lab.held("viewer.origin.test")  # the viewer could not decide it
    console.open("/approvals")
    _row_text(console, held["id"])
    console.click(f"#a-{held['id']} button.deny")
    console.until("the row gone", lambda d: not console.css(f"#a-{held['id']}"))
    [denied] = lab.audit(event="control.approval.denied", approval=held["id"])
    assert denied["actor"] == OPERATOR and denied["actor_kind"] == "console", denied
    result = job_result(lab.home, lab.jobs["viewer.origin.test"], timeout=RESULT_TIMEOUT_S)
    assert result is not None and result.get("status") == 403, result
    assert "denied by operator" in result["body"], result


def test_4b_a_one_tap_link_approves_once_in_a_phone_browser(lab: Lab) -> None:
    console = lab.console
    console.logout()  # the phone has no session: the link is all it has
    job = drop_job(lab.home, "http://tap.origin.test/tapped")
    [held] = [p for p in lab.plane.wait_pending(lab.box, 1) if p["host"] == "tap.origin.test"]

    def link() -> str | None:
        for got in received(lab.inbox):
            body = got["body"]
            if body.get("event") == "approval.pending" and body.get("approval") == held["id"]:
                return body["link"]
        return None

    url = console.until("the approval.pending notification", lambda d: link(), RESULT_TIMEOUT_S)
    assert url.startswith(f"{console.base_url}/one-tap/"), url
    console.driver.get(url)
    page = console.wait_for("main").text
    assert "tap.origin.test" in page and lab.box in page, page
    console.screenshot("one-tap")
    assert job_result(lab.home, job, timeout=0.5) is None, "opening the link approved it"

    console.click("main form button")
    console.until("the approval confirmed", lambda d: "Approved" in (console.text("main") or ""))
    result = job_result(lab.home, job, timeout=RESULT_TIMEOUT_S)
    assert result is not None and result.get("status") == 200, result
    assert result["body"] == "origin tap.origin.test GET /tapped", result
    [approved] = lab.audit(event="control.approval.approved", approval=held["id"])
    assert approved["actor"] == f"webhook:{HOOK}" and approved["actor_kind"] == "link", approved
    console.screenshot("one-tap-approved")

    console.driver.get(url)  # the same link again: used
    console.until("the link refused", lambda d: "already used" in (console.text("main") or ""))
    assert len(lab.audit(event="control.approval.approved", approval=held["id"])) == 1
    assert console.cookie("appliance_session") is None  # it never logged anyone in
    console.login(lab.tokens[OPERATOR])  # for the steps that follow


def test_5_a_form_without_its_csrf_token_is_refused(lab: Lab) -> None:
    console = lab.console
    console.open(f"/kill/confirm?action=one&name={lab.box}")
    form = console.wait_for("form[action='/kill']")
    # The browser posts the real confirmation form, its csrf field removed.
    console.driver.execute_script(
        "const f = arguments[0]; f.querySelector('input[name=csrf]').remove(); f.submit();", form
    )
    console.until("the refusal", lambda d: "CSRF" in d.page_source)
    console.screenshot("csrf-refused")
    assert lab.plane.states()[lab.box] == "running"
    # The same from outside the browser, with its cookie: refused too, and nothing killed.
    with httpx.Client(base_url=console.base_url, timeout=30) as client:
        client.cookies.set("appliance_session", console.cookie("appliance_session") or "")
        for data in ({}, {"csrf": "forged"}):
            data |= {"action": "one", "name": lab.box, "confirmed": "yes"}
            refused = client.post("/kill", data=data, headers={"Origin": console.base_url})
            assert refused.status_code == 403, refused.text
        # The API with the console's cookie: an unsafe method needs the X-CSRF-Token header.
        api = client.post("/api/v1/kill", json={"sandboxes": [lab.box], "reason": "csrf test"})
        assert api.status_code == 403, api.text
    assert lab.plane.states()[lab.box] == "running"
    assert not lab.audit(event="control.kill")


def test_6_every_page_renders(lab: Lab) -> None:
    console = lab.console
    for path, name in (
        ("/", "overview"),
        ("/agents", "agents"),
        ("/approvals", "approvals-history"),
        ("/spend", "spend"),
        ("/audit", "audit"),
        ("/kill", "kill"),
    ):
        console.open(path)
        console.wait_for("main")
        assert console.path == path, (path, console.driver.current_url)
        assert "Internal Server Error" not in console.driver.page_source
        console.screenshot(name)
    console.open("/audit")  # the chain the steps wrote verifies, and the page says so
    assert "verified" in (console.text("main") or ""), console.text("main")


def test_7_the_operator_kills_the_sandbox_after_confirming(lab: Lab) -> None:
    console = lab.console
    from selenium.webdriver.support.select import Select

    console.open("/kill")
    Select(console.wait_for("select[name=name]")).select_by_value(lab.box)
    console.wait_for("form[action='/kill/confirm'] input[value=one] ~ button").click()
    console.until("the confirmation page", lambda d: console.path == "/kill/confirm")
    assert lab.plane.states()[lab.box] == "running", "the first click killed without confirming"
    console.screenshot("kill-confirm")
    console.wait_for("form[action='/kill'] button.danger").click()
    console.until("back on the kill switch", lambda d: console.path == "/kill")
    states = lab.plane.states()
    assert states[lab.box] != "running", states
    container = podman_client().containers.get(lab.box)
    assert container.attrs["State"]["Status"] in ("exited", "stopped"), container.attrs["State"]
    [killed] = lab.audit(event="control.kill")
    assert killed["actor"] == OPERATOR and killed["actor_kind"] == "console", killed
    assert killed["sandboxes"] == [lab.box] and killed["hold"] is False, killed
    console.screenshot("kill-done")


def test_8_kill_all_holds_until_the_operator_releases(lab: Lab) -> None:
    console = lab.console
    console.open("/kill")
    console.click("form[action='/kill/confirm'] input[value=all] ~ button")
    console.until("the confirmation page", lambda d: console.path == "/kill/confirm")
    assert not lab.audit(event="control.kill", hold=True), "killed without confirming"
    console.click("form[action='/kill'] button.danger")
    console.wait_for("p.held")
    console.screenshot("kill-held")
    [killed] = lab.audit(event="control.kill", hold=True)
    assert killed["actor"] == OPERATOR, killed
    refused = lab.plane.cli("sandbox", "start", lab.box, ok=False)
    assert refused.returncode != 0 and "kill switch" in refused.stderr, refused.stderr

    console.click("form[action='/kill/confirm'] input[value=release] ~ button")
    console.until("the confirmation page", lambda d: console.path == "/kill/confirm")
    console.click("form[action='/release'] button")
    console.until("the hold released", lambda d: not console.css("p.held"))
    [released] = lab.audit(event="release")
    assert released["actor"] == OPERATOR and released["actor_kind"] == "console", released


def test_9_an_agent_runs_a_turn_and_is_killed_from_its_page(lab: Lab) -> None:
    console, plane = lab.console, lab.plane
    name = f"echo-{os.getpid()}"
    blueprint = plane.scratch / "echo.yaml"  # kind: command, its turn echoes session|message
    blueprint.write_text(yaml.safe_dump(blueprint_doc("console-echo", turn=TURN)))
    lab.agents.append(name)
    plane.created.add(name)  # its sandbox, should `agent rm` fail
    plane.cli("agent", "create", name, "--blueprint", str(blueprint))
    console.open(f"/agents/{name}")
    console.wait_for("#turn-message").send_keys("hello from the console")
    console.wait_for("#turn-session").send_keys("web")
    console.click("form.turn-form button")
    reply = console.until(
        "the turn's reply on the agent's page",
        lambda d: console.text("pre.reply"),
        timeout=RESULT_TIMEOUT_S,
    )
    assert reply == "web|hello from the console", reply
    console.screenshot("agent")
    # turns.py writes the transcript (the reply shown) before the audit record: wait for it
    turns = console.until(
        "the turn's audit record",
        lambda d: [r for r in lab.audit(event="agent.turn") if r.get("agent") == name],
    )
    [turn] = turns
    assert turn["actor"] == OPERATOR, turn

    console.click("#agent-kill")
    console.until("the confirmation page", lambda d: console.path == "/kill/confirm")
    assert plane.states()[name] == "running", "killed without confirming"
    console.click("form[action='/kill'] button.danger")
    console.until("back on the kill switch", lambda d: console.path == "/kill")
    [agent] = json.loads(plane.cli("status", "--json").stdout)["agents"]["agents"]
    assert agent["name"] == name and agent["state"] == "stopped", agent
    [killed] = [r for r in lab.audit(event="control.kill") if r["sandboxes"] == [name]]
    assert killed["actor"] == OPERATOR and killed["actor_kind"] == "console", killed
    console.open(f"/agents/{name}")
    console.until("the page saying stopped", lambda d: console.text("#agent-state") == "stopped")
