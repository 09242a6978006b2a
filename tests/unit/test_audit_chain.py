"""The hash-chained audit log: record shape, redaction, and that every kind of tampering is caught
and named (line and seq): edited, deleted, inserted, reordered, truncated, corrupt, anchor."""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from appliance.audit import (
    ANOMALY,
    GENESIS,
    BackgroundAudit,
    ChainWriter,
    Problem,
    audit_path,
    canonical,
    head_path,
    last_records,
    record_hash,
    verify,
)
from appliance.cli.main import app, main
from appliance.store.inference_store import InferenceStore

N = 8
REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "audit" / "audit.jsonl"
    writer = ChainWriter(path)
    for i in range(N):
        writer.append("test.event", i=i, sandbox=f"sb{i % 2}")
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def rehash(raw: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """An edit by someone who knows the scheme: the record's own hash is recomputed."""
    rec = json.loads(raw)
    change(rec)
    rec["hash"] = record_hash(rec)
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


def first(path: Path) -> Problem:
    result = verify(path)
    assert not result.ok, "tampering went unnoticed"
    return result.problems[0]


# -- shape ---------------------------------------------------------------------------------


def test_records_chain_from_genesis_and_hash_their_canonical_json(log: Path) -> None:
    recs = [json.loads(raw) for raw in lines_of(log)]
    assert [r["seq"] for r in recs] == list(range(1, N + 1))
    assert recs[0]["prev"] == GENESIS
    for before, rec in itertools.pairwise(recs):
        assert rec["prev"] == before["hash"]
    for rec in recs:
        body = {k: v for k, v in rec.items() if k != "hash"}
        expected = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        assert rec["hash"] == expected == hashlib.sha256(canonical(body)).hexdigest()
        assert rec["ts"].endswith("Z") and "T" in rec["ts"]
    result = verify(log)
    assert result.ok and result.records == N and result.last_seq == N
    assert result.head == {"seq": N, "hash": recs[-1]["hash"]}


def test_file_and_directory_modes(log: Path) -> None:
    assert log.stat().st_mode & 0o777 == 0o600
    assert log.parent.stat().st_mode & 0o777 == 0o700
    assert head_path(log).stat().st_mode & 0o777 == 0o600


def test_audit_path_is_under_the_state_dir(tmp_path: Path) -> None:
    assert audit_path(tmp_path) == tmp_path / "audit" / "audit.jsonl"


def test_secrets_never_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    rec = ChainWriter(path).append(
        "key.used",
        key_id="key_1",
        api_key="sk-app-0123456789abcdefghijkl",
        headers={"Authorization": "Bearer abc", "accept": "*/*"},
        reason="upstream said: invalid key sk-app-0123456789abcdefghijkl",
        note="Bearer eyJhbGciOi.x.y",
        prompt_tokens=12,
    )
    text = path.read_text()
    assert "sk-app-0123456789" not in text and "eyJhbGciOi" not in text and "abc" not in text
    assert rec["api_key"] == "[redacted]" and rec["headers"]["Authorization"] == "[redacted]"
    assert rec["headers"]["accept"] == "*/*" and rec["key_id"] == "key_1"
    assert rec["prompt_tokens"] == 12 and "[redacted]" in rec["reason"]


def test_reserved_names_and_odd_values_are_kept_safely(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    rec = ChainWriter(path).append(
        "odd", seq=99, ts=1.5, prev="x", hash="y", nan=float("nan"), path=Path("/a"), s={3}
    )
    assert rec["seq"] == 1 and rec["seq_"] == 99 and rec["ts_"] == 1.5 and rec["hash_"] == "y"
    assert rec["nan"] == "nan" and rec["path"] == "/a" and rec["s"] == [3]
    assert verify(path).ok


# -- tampering -----------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(N))
def test_editing_any_line_is_detected(log: Path, index: int) -> None:
    lines = lines_of(log)
    lines[index] = lines[index].replace(b'"i":%d' % index, b'"i":%d' % (index + 100))
    rewrite(log, lines)
    assert first(log) == Problem(
        index + 1, index + 1, "edited", "the record does not match its own hash"
    )


@pytest.mark.parametrize("index", range(N))
def test_editing_and_rehashing_any_line_is_detected(log: Path, index: int) -> None:
    lines = lines_of(log)
    lines[index] = rehash(lines[index], lambda r: r.update(i=-1))
    rewrite(log, lines)
    problem = first(log)
    assert (problem.line, problem.seq, problem.kind) == (index + 1, index + 1, "edited")


@pytest.mark.parametrize("index", range(N - 1))
def test_deleting_any_line_is_detected(log: Path, index: int) -> None:
    lines = lines_of(log)
    del lines[index]
    rewrite(log, lines)
    problem = first(log)
    assert (problem.line, problem.seq, problem.kind) == (index + 1, index + 1, "deleted")
    assert f"holds seq {index + 2}" in problem.detail


@pytest.mark.parametrize("index", range(N - 1))
def test_swapping_two_lines_is_detected(log: Path, index: int) -> None:
    lines = lines_of(log)
    lines[index], lines[index + 1] = lines[index + 1], lines[index]
    rewrite(log, lines)
    problem = first(log)
    assert (problem.line, problem.seq, problem.kind) == (index + 1, index + 2, "reordered")


def test_swapping_distant_lines_is_detected(log: Path) -> None:
    lines = lines_of(log)
    lines[1], lines[6] = lines[6], lines[1]
    rewrite(log, lines)
    kinds = {(p.line, p.kind) for p in verify(log).problems}
    assert (2, "reordered") in kinds and (7, "reordered") in kinds


@pytest.mark.parametrize("cut", [1, 2, N])
def test_truncating_whole_records_off_the_tail_is_detected(log: Path, cut: int) -> None:
    lines = lines_of(log)
    rewrite(log, lines[:-cut])
    problem = first(log)
    assert (problem.line, problem.seq, problem.kind) == (N - cut + 1, N - cut + 1, "truncated")
    assert f"head records seq {N}" in problem.detail


def test_deleting_the_log_file_is_detected(log: Path) -> None:
    log.unlink()
    assert first(log).kind == "truncated"


def test_cutting_the_last_line_short_is_detected(log: Path) -> None:
    data = log.read_bytes()
    log.write_bytes(data[:-20])
    problem = first(log)
    assert (problem.line, problem.kind, problem.detail) == (N, "truncated", "partial last line")


def test_cutting_only_the_final_newline_is_detected(log: Path) -> None:
    log.write_bytes(log.read_bytes()[:-1])
    problem = first(log)
    assert (problem.line, problem.seq, problem.kind) == (N, N, "truncated")


def test_editing_the_last_line_and_the_head_together_still_breaks_the_link(log: Path) -> None:
    lines = lines_of(log)
    lines[N - 2] = rehash(lines[N - 2], lambda r: r.update(i=-1))
    rewrite(log, lines)
    problem = first(log)
    assert (problem.line, problem.seq, problem.kind) == (N - 1, N - 1, "edited")


def test_a_duplicated_line_is_an_insertion(log: Path) -> None:
    lines = lines_of(log)
    lines.insert(4, lines[3])
    rewrite(log, lines)
    problem = first(log)
    assert (problem.line, problem.seq, problem.kind) == (5, 4, "inserted")


def test_a_forged_record_placed_before_the_genuine_one_is_named(log: Path) -> None:
    lines = lines_of(log)
    lines.insert(3, rehash(lines[3], lambda r: r.update(i=666)))  # same seq, valid prev and hash
    rewrite(log, lines)
    problem = first(log)
    assert (problem.line, problem.seq, problem.kind) == (4, 4, "inserted")


def test_a_foreign_line_is_corrupt(log: Path) -> None:
    lines = lines_of(log)
    lines.insert(2, b"not json at all\n")
    rewrite(log, lines)
    assert first(log) == Problem(3, None, "corrupt", "not an audit record")


def test_a_missing_or_unreadable_head_is_reported(log: Path) -> None:
    head_path(log).unlink()
    assert first(log).kind == "anchor"
    head_path(log).write_text("garbage")
    assert first(log).kind == "anchor"


def test_a_head_lagging_the_log_is_fine(log: Path) -> None:
    """After a power loss the head (not fsynced) may be older than the log."""
    second = json.loads(lines_of(log)[1])
    head_path(log).write_text(json.dumps({"seq": 2, "hash": second["hash"]}))
    assert verify(log).ok


# -- writers keep the evidence -------------------------------------------------------------


def test_a_writer_after_a_tail_cut_records_the_cut(log: Path) -> None:
    rewrite(log, lines_of(log)[:-2])
    rec = ChainWriter(log).append("after.cut")
    assert rec["seq"] == N  # seq N-1 is the anomaly: the chain continues from what is there
    recs = [json.loads(raw) for raw in lines_of(log)]
    assert recs[-2]["event"] == ANOMALY and recs[-2]["kind"] == "truncated"
    assert recs[-2]["head_seq"] == N
    problem = first(log)  # the head now matches, but the anomaly stays in the chain
    assert (problem.kind, problem.line, problem.seq) == ("truncated", N - 1, N - 1)


def test_a_writer_after_a_rehashed_last_line_records_the_edit(log: Path) -> None:
    """Chaining on from a forged last record would bury it: the writer says so first."""
    lines = lines_of(log)
    lines[-1] = rehash(lines[-1], lambda r: r.update(i=-1))
    rewrite(log, lines)
    ChainWriter(log).append("after.edit")
    problem = first(log)
    assert (problem.line, problem.seq, problem.kind) == (N + 1, N + 1, "edited")
    assert "the last record, does not match the head" in problem.detail


def test_a_writer_after_a_torn_line_closes_it_and_chains_on(log: Path) -> None:
    with log.open("ab") as f:
        f.write(b'{"seq":9,"ts":"2025')  # a writer that died mid-line
    ChainWriter(log).append("after.crash")
    recs = [json.loads(raw) for raw in lines_of(log)[-2:]]
    assert [r["event"] for r in recs] == [ANOMALY, "after.crash"]
    assert recs[0]["seq"] == N + 1 and recs[0]["kind"] == "truncated"
    kinds = [(p.line, p.kind) for p in verify(log).problems]
    assert kinds == [(N + 1, "corrupt"), (N + 2, "truncated")]


def test_background_sink_keeps_order_and_flushes_on_close(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = BackgroundAudit(ChainWriter(path), batch=7)
    for i in range(100):
        sink.audit("bg", i=i)
    sink.close()
    recs = [json.loads(raw) for raw in lines_of(path)]
    assert [r["i"] for r in recs] == list(range(100)) and verify(path).ok


def test_last_records_reads_from_the_end_with_a_filter(log: Path) -> None:
    recs, size = last_records(log, 2, lambda r: r["sandbox"] == "sb0")
    assert [r["i"] for r in recs] == [4, 6] and size == log.stat().st_size


# -- the store writes both the table and the chain -----------------------------------------


def test_store_audit_goes_to_the_table_and_the_chain(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with InferenceStore(state) as store:
        key, secret = store.create_key("alpha")
        store.audit("budget.warning", key_id=key.id, budget="daily_tokens", percent=83)
        assert [e["event"] for e in store.audit_events()] == ["key.created", "budget.warning"]
    recs = [json.loads(raw) for raw in lines_of(audit_path(state))]
    assert [(r["event"], r["key_id"]) for r in recs] == [
        ("key.created", key.id),
        ("budget.warning", key.id),
    ]
    assert secret not in audit_path(state).read_text()
    assert verify(audit_path(state)).ok


OURS = ("appliance", "hardware", "inference", "sandbox", "blueprints")


def _module_files(dotted: str) -> list[Path]:
    """The files importing `dotted` runs: each package's __init__ on the way, then the module."""
    parts, files = dotted.split("."), []
    for i in range(1, len(parts) + 1):
        base = REPO.joinpath(*parts[:i])
        if (base / "__init__.py").exists():
            files.append(base / "__init__.py")
        elif base.with_suffix(".py").exists():
            files.append(base.with_suffix(".py"))
    return files


def test_chain_module_imports_only_the_stdlib() -> None:
    """The egress proxy process runs it: no third-party import may sneak in, directly or through
    a module of ours that it imports (followed transitively)."""
    todo = _module_files("appliance.audit") + sorted((REPO / "appliance" / "audit").glob("*.py"))
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from pkg import mod` runs pkg and, when mod is a module, mod too
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in OURS:
                    todo += _module_files(name)
                else:
                    rel = path.relative_to(REPO)
                    assert top in sys.stdlib_module_names or top == "__future__", f"{rel}: {name}"
    assert {REPO / "appliance" / "errors.py", REPO / "hardware" / "secret_names.py"} <= seen


# -- CLI -----------------------------------------------------------------------------------


@pytest.fixture
def state_log(isolated_env: Path) -> Path:
    path = audit_path(isolated_env / "state")
    writer = ChainWriter(path)
    for i in range(5):
        writer.append("egress.allow", sandbox=f"sb{i % 2}", host=f"h{i}.test", i=i)
    writer.append("kill", sandboxes=["sb0", "sb1"], reason="test")
    return path


def test_cli_verify_ok_and_json(state_log: Path) -> None:
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 0 and "ok: 6 records" in result.stdout
    data = json.loads(runner.invoke(app, ["audit", "verify", "--json"]).stdout)
    assert data["ok"] is True and data["last_seq"] == 6 and data["problems"] == []


def test_cli_verify_names_the_first_bad_line(
    state_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(state_log)
    del lines[2]
    rewrite(state_log, lines)
    assert main(["audit", "verify"]) == 4
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("appliance: error: ") and "line 3 (seq 3): deleted" in err[0]
    assert err[1].startswith("  hint: ") and len(err) == 2
    assert main(["audit", "verify", "--json"]) == 4
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["problems"][0]["kind"] == "deleted"


@pytest.mark.usefixtures("control_plane")  # `audit tail` reads through GET /api/v1/audit
def test_cli_tail_filters(state_log: Path) -> None:
    out = json.loads(runner.invoke(app, ["audit", "tail", "-n", "2", "--json"]).stdout)
    assert [r["seq"] for r in out] == [5, 6]
    argv = ["audit", "tail", "--event", "egress.*", "--sandbox", "sb1", "--json"]
    out = json.loads(runner.invoke(app, argv).stdout)
    assert [r["i"] for r in out] == [1, 3]
    out = json.loads(runner.invoke(app, ["audit", "tail", "--sandbox", "sb0", "--json"]).stdout)
    assert [r["event"] for r in out] == ["egress.allow"] * 3 + ["kill"]
    human = runner.invoke(app, ["audit", "tail", "-n", "1"]).stdout
    assert '#6  kill  sandboxes=["sb0","sb1"] reason=test' in human


def test_cli_export_jsonl_and_json(state_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"
    assert runner.invoke(app, ["audit", "export", "--out", str(out)]).exit_code == 0
    header, *recs = (json.loads(line) for line in out.read_text().splitlines())
    assert header["audit_export"]["verification"]["ok"] is True and len(recs) == 6
    assert out.read_bytes().split(b"\n", 1)[1] == state_log.read_bytes()  # records verbatim
    assert out.stat().st_mode & 0o777 == 0o600
    ts = recs[3]["ts"]
    out_json = tmp_path / "export.json"
    argv = ["audit", "export", "--out", str(out_json), "--format", "json", "--since", ts]
    assert runner.invoke(app, argv).exit_code == 0
    data = json.loads(out_json.read_text())
    assert [r["seq"] for r in data["records"]] == [4, 5, 6]
    assert data["audit_export"]["records"] == 3


def test_cli_export_of_a_tampered_log_writes_it_and_fails(
    state_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(state_log)
    lines[1] = lines[1].replace(b"h1.test", b"h9.test")
    rewrite(state_log, lines)
    out = tmp_path / "evidence.jsonl"
    assert main(["audit", "export", "--out", str(out)]) == 4
    header = json.loads(out.read_text().splitlines()[0])["audit_export"]
    assert header["verification"]["problems"][0]["line"] == 2
    assert "exported anyway" in capsys.readouterr().err


def test_cli_export_rejects_a_bad_since(state_log: Path, tmp_path: Path) -> None:
    argv = ["audit", "export", "--out", str(tmp_path / "x"), "--since", "yesterday"]
    assert main(argv) == 2
