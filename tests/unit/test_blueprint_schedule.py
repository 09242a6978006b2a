"""Blueprint `schedule:` entries: strict validation (errors at FILE:LINE), and the pure helpers
the control plane's scheduler calls: next_run (a steady `every` grid, cron in the entry's tz,
across daylight-saving changes) and in_active_hours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from blueprints.catalog import load_blueprint
from blueprints.errors import BlueprintError
from blueprints.model import Blueprint
from blueprints.schedule import (
    MAX_PROMPT,
    ScheduleEntry,
    in_active_hours,
    next_run,
    parse_every,
)

DIGEST = "sha256:" + "ab" * 32


def doc(schedule: list) -> dict:
    return {
        "name": "demo",
        "version": "1.0.0",
        "runtime": {"kind": "command", "command": ["sleep", "infinity"]},
        "image": {"name": "localhost/appliance-base", "digest": DIGEST},
        "sandbox": {"base": "default"},
        "schedule": schedule,
    }


def entry(**fields) -> ScheduleEntry:
    return ScheduleEntry.model_validate({"prompt": "go", **fields})


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "interval"),
    [("1m", 1), ("30m", 30), ("2h", 120), ("1h30m", 90), ("1d", 1440), ("1d2h3m", 1563)],
)
def test_every_parses_units(text: str, interval: int) -> None:
    assert parse_every(text) == timedelta(minutes=interval)


@pytest.mark.parametrize(
    ("every", "needle"),
    [
        ("0m", "too short"),
        ("0h0m", "too short"),
        ("30s", "not an interval"),
        ("30m1h", "not an interval"),
        ("-5m", "not an interval"),
        ("", "not an interval"),
        ("30m\n", "not an interval"),
        ("1.5h", "not an interval"),
        ("31d", "too long"),
        ("9" * 50 + "m", "not an interval"),
        (30, "give a unit, e.g. 30m"),
    ],
)
def test_bad_intervals(every: object, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        entry(every=every)


@pytest.mark.parametrize(
    ("cron", "needle"),
    [
        ("banana", "needs five fields"),
        ("* * * *", "needs five fields"),
        ("* * * * * *", "needs five fields"),  # no seconds field
        ("61 * * * *", "not a valid cron expression"),
        ("0 0 30 2 *", "not a valid cron expression"),  # 30 February never comes
        ("$(rm) -rf / ; *", "not a valid cron expression"),
        ("* " * 500, "at most 120 characters"),
    ],
)
def test_cron_garbage_is_refused(cron: str, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        entry(cron=cron)


def test_cron_keywords_and_ranges() -> None:
    assert entry(cron="@daily").cron == "@daily"
    assert entry(cron="0 9 * * 1-5").cron == "0 9 * * 1-5"


@pytest.mark.parametrize(
    "tz",
    [
        "../../etc/passwd",
        "/etc/localtime",
        "Europe/../../etc/passwd",
        "Europe/Nowhere",
        "",
        "A" * 300,
    ],
)
def test_time_zones_are_names_never_paths(tz: str) -> None:
    with pytest.raises(ValidationError, match="tz"):
        entry(every="1h", tz=tz)


def test_known_time_zones() -> None:
    for tz in ("UTC", "Europe/Paris", "America/Argentina/Buenos_Aires", "Etc/GMT+5"):
        assert entry(every="1h", tz=tz).tz == tz


@pytest.mark.parametrize(
    "session", ["a/b", "../x", "Daily", "-x", "x" * 41, "daily run", "é", "a\nb", "daily\n"]
)
def test_sessions_are_short_plain_names(session: str) -> None:
    with pytest.raises(ValidationError, match="session"):
        entry(every="1h", session=session)


def test_prompts_are_required_and_capped() -> None:
    assert len(entry(every="1h", prompt="x" * MAX_PROMPT).prompt) == MAX_PROMPT
    for prompt in ("", "  \n", "x" * (MAX_PROMPT + 1)):
        with pytest.raises(ValidationError, match="prompt"):
            entry(every="1h", prompt=prompt)
    with pytest.raises(ValidationError, match="prompt"):
        ScheduleEntry.model_validate({"every": "1h"})


def test_exactly_one_trigger() -> None:
    for fields in ({}, {"every": "1h", "cron": "* * * * *"}):
        with pytest.raises(ValidationError, match="exactly one of"):
            entry(**fields)


def test_sessions_default_to_the_entry_index() -> None:
    bp = Blueprint.model_validate(
        doc([{"every": "1h", "prompt": "a"}, {"every": "2h", "prompt": "b", "session": "mine"}])
    )
    assert [e.session for e in bp.schedule] == ["schedule-0", "mine"]
    assert Blueprint.model_validate_json(bp.canonical()) == bp


def test_schedule_errors_name_file_and_line(tmp_path: Path) -> None:
    text = (
        yaml.safe_dump({k: v for k, v in doc([]).items() if k != "schedule"}, sort_keys=False)
        + "schedule:\n"
        "  - every: 0m\n"
        "    prompt: a\n"
        "  - cron: not cron\n"
        "    tz: ../../etc/passwd\n"
        "    prompt: b\n"
        "    session: a/b\n"
        "    active_hours: {start: 9:00, end: '18:00'}\n"
        "lifecycle: {fail_closed_after: 5}\n"
    )
    path = tmp_path / "bp.yaml"
    path.write_text(text)
    with pytest.raises(BlueprintError) as info:
        load_blueprint(path)
    lines = str(info.value).splitlines()
    numbered = text.splitlines()

    def at(needle: str) -> str:
        return f"bp.yaml:{next(i for i, ln in enumerate(numbered, 1) if needle in ln)}:"

    expected = {
        "schedule.0.every": at("every: 0m"),
        "schedule.1.cron": at("cron: not cron"),
        "schedule.1.tz": at("tz: ../"),
        "schedule.1.session": at("session: a/b"),
        "schedule.1.active_hours.start": at("active_hours"),
        "lifecycle.fail_closed_after": at("lifecycle"),
    }
    for key, where in expected.items():
        assert any(f"{where} {key}:" in ln for ln in lines), (key, lines)
    assert any('quote the time, e.g. "09:00"' in ln for ln in lines)  # YAML read 9:00 as 540


def test_too_many_entries() -> None:
    with pytest.raises(ValidationError, match="at most 32"):
        Blueprint.model_validate(doc([{"every": "1h", "prompt": "a"}] * 33))


def test_lifecycle_is_off_or_at_least_ten_seconds() -> None:
    base = doc([])
    assert Blueprint.model_validate({**base, "lifecycle": {"fail_closed_after": 0}})
    assert Blueprint.model_validate({**base, "lifecycle": {"fail_closed_after": 10}})
    for bad in (1, 9, -1, 86401, "soon"):
        with pytest.raises(ValidationError, match="fail_closed_after"):
            Blueprint.model_validate({**base, "lifecycle": {"fail_closed_after": bad}})


@pytest.mark.parametrize(
    "hours", [{"start": "09:00", "end": "09:00"}, {"start": "24:00", "end": "01:00"}]
)
def test_bad_active_hours(hours: dict) -> None:
    with pytest.raises(ValidationError, match="start"):
        entry(every="1h", active_hours=hours)


# -- next_run ----------------------------------------------------------------------------------


def test_every_keeps_a_grid_from_its_anchor() -> None:
    e = entry(every="30m")
    anchor = utc(2026, 12, 7, 18, 0)
    assert next_run(e, anchor) == utc(2026, 12, 7, 18, 30)  # no anchor: after + interval
    assert next_run(e, anchor, anchor) == utc(2026, 12, 7, 18, 30)
    assert next_run(e, utc(2026, 12, 7, 18, 29, 59), anchor) == utc(2026, 12, 7, 18, 30)
    assert next_run(e, utc(2026, 12, 7, 18, 30), anchor) == utc(2026, 12, 7, 19, 0)
    # Down for hours: the next slot on the grid, not one per missed run.
    assert next_run(e, utc(2026, 12, 8, 3, 10), anchor) == utc(2026, 12, 8, 3, 30)
    assert next_run(e, utc(2026, 12, 7, 17, 0), anchor) == utc(2026, 12, 7, 18, 30)


def test_every_is_real_time_across_a_clock_change() -> None:
    e = entry(every="1h", tz="Europe/Paris")
    before = utc(2026, 10, 25, 0, 30)  # 02:30 summer time, an hour before the clocks go back
    assert next_run(e, before) - before == timedelta(hours=1)


def test_cron_runs_on_the_entry_wall_clock() -> None:
    e = entry(cron="0 9 * * 1-5", tz="Europe/Paris")
    friday = utc(2026, 12, 4, 9, 0)  # 10:00 in Paris
    assert next_run(e, friday) == utc(2026, 12, 7, 8, 0)  # Monday 09:00 CET
    summer = utc(2026, 7, 1, 6, 0)  # a Wednesday, 08:00 CEST
    assert next_run(e, summer) == utc(2026, 7, 1, 7, 0)
    assert next_run(e, utc(2026, 7, 1, 7, 0)) == utc(2026, 7, 2, 7, 0)  # strictly after
    assert next_run(entry(cron="@hourly"), utc(2026, 1, 1, 0, 0, 1)) == utc(2026, 1, 1, 1, 0)


def test_cron_in_the_spring_gap_runs_after_it() -> None:
    # 2026-03-29 in Paris: 02:00 CET becomes 03:00 CEST; 02:30 never happens.
    e = entry(cron="30 2 * * *", tz="Europe/Paris")
    first = next_run(e, utc(2026, 3, 28, 12, 0))
    assert first == utc(2026, 3, 29, 1, 0)  # 03:00 CEST, right after the gap
    assert next_run(e, first) == utc(2026, 3, 30, 0, 30)  # then 02:30 CEST as usual


def test_cron_in_the_repeated_autumn_hour_runs_once() -> None:
    # 2026-10-25 in Paris: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
    e = entry(cron="30 2 * * *", tz="Europe/Paris")
    first = next_run(e, utc(2026, 10, 24, 12, 0))
    assert first == utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    assert next_run(e, first) == utc(2026, 10, 26, 1, 30)  # not again at 02:30 CET


def test_cron_with_a_wildcard_hour_runs_in_both_passes() -> None:
    e = entry(cron="*/30 * * * *", tz="Europe/Paris")
    runs, at = [], utc(2026, 10, 24, 23, 50)
    for _ in range(5):
        at = next_run(e, at)
        runs.append(at)
    assert [r - runs[0] for r in runs] == [timedelta(minutes=30 * i) for i in range(5)]


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_run(entry(every="1h"), datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        in_active_hours(entry(every="1h", active_hours={"start": "09:00", "end": "17:00"}),
                        datetime(2026, 1, 1))  # fmt: skip


# -- in_active_hours ---------------------------------------------------------------------------


def test_active_hours_read_the_entry_wall_clock_across_dst() -> None:
    e = entry(every="1h", tz="Europe/Paris", active_hours={"start": "09:00", "end": "18:00"})
    assert in_active_hours(e, utc(2026, 7, 1, 7, 30))  # 09:30 CEST
    assert not in_active_hours(e, utc(2026, 12, 1, 7, 30))  # 08:30 CET
    assert in_active_hours(e, utc(2026, 12, 1, 8, 0))  # 09:00 CET: start included
    assert not in_active_hours(e, utc(2026, 12, 1, 17, 0))  # 18:00 CET: end excluded
    assert in_active_hours(e, utc(2026, 12, 1, 16, 59, 59))
    assert in_active_hours(entry(every="1h"), utc(2026, 1, 1, 3, 0))  # none: always


def test_active_hours_across_midnight() -> None:
    e = entry(every="1h", active_hours={"start": "22:00", "end": "06:00"})
    assert in_active_hours(e, utc(2026, 1, 1, 23, 0))
    assert in_active_hours(e, utc(2026, 1, 1, 0, 0))
    assert in_active_hours(e, utc(2026, 1, 1, 5, 59))
    assert not in_active_hours(e, utc(2026, 1, 1, 6, 0))
    assert not in_active_hours(e, utc(2026, 1, 1, 12, 0))
