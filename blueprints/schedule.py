"""A blueprint's `schedule:` entries, and when each one runs.

The control plane runs schedules, never the agent. An entry runs `every` interval (`30m`, `2h`,
`1h30m`; at least a minute) or on a five-field `cron` expression in its `tz`, optionally only
inside `active_hours` (a run outside is skipped), with a `prompt` sent to its `session`.
`next_run` and `in_active_hours` are pure: the scheduler keeps the clock and the state.

Cron across daylight-saving changes: a wall time that does not exist (the spring gap) runs at
the first minute after the gap; a wall time that occurs twice (autumn) runs once, in its first
occurrence, unless the hour field is a wildcard (`*`, `*/2`), which runs in real time.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MIN_EVERY = timedelta(minutes=1)
MAX_EVERY = timedelta(days=30)  # rarer runs read better as a cron expression
MAX_PROMPT = 100_000  # characters
MAX_ENTRIES = 32
SESSION = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_EVERY = re.compile(r"^(?:(\d{1,4})d)?(?:(\d{1,5})h)?(?:(\d{1,6})m)?$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_TZ = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+){0,2}$")
_CRON_MAX = 120
_CRON_KEYWORDS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def parse_every(value: str) -> timedelta:
    """`30m`, `2h`, `1h30m`, `1d` -> a timedelta (ValueError for anything else)."""
    m = _EVERY.fullmatch(value)
    if not value or m is None:
        raise ValueError(f"{value[:40]!r} is not an interval like 30m, 2h or 1h30m")
    days, hours, minutes = (int(g or 0) for g in m.groups())
    interval = timedelta(days=days, hours=hours, minutes=minutes)
    if interval < MIN_EVERY:
        raise ValueError(f"{value!r} is too short (at least 1m)")
    if interval > MAX_EVERY:
        raise ValueError(f"{value!r} is too long (at most 30d; use cron for rarer runs)")
    return interval


def cron_fields(expr: str) -> str:
    """The five-field form of a cron expression (`@daily` spelled out); ValueError if invalid."""
    if len(expr) > _CRON_MAX:
        raise ValueError(f"longer than {_CRON_MAX} characters")
    fields = _CRON_KEYWORDS.get(expr.strip(), expr).split()
    if len(fields) != 5:
        raise ValueError(
            f"{expr[:40]!r} needs five fields (minute hour day month weekday), not {len(fields)}"
        )
    spelled = " ".join(fields)
    from croniter import croniter  # here: ~20 ms to import, and most blueprints have no cron

    try:
        croniter(spelled, datetime(2026, 1, 1, tzinfo=ZoneInfo("UTC"))).get_next(datetime)
    except Exception as exc:  # CroniterError, and for some input a bare ValueError or KeyError
        raise ValueError(f"{expr[:40]!r} is not a valid cron expression ({exc})") from None
    return spelled


@cache
def zone(name: str) -> ZoneInfo:
    """A zoneinfo zone by its name (`Europe/Paris`, `UTC`); ValueError otherwise."""
    if len(name) > 64 or not _TZ.fullmatch(name):
        raise ValueError(f"{name[:64]!r} is not a time zone name like Europe/Paris or UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"no time zone named {name!r}") from None


def _clock(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 18:00 as the base-60 number 1080.
        raise ValueError(f'quote the time, e.g. "{value // 60:02d}:{value % 60:02d}"')
    if isinstance(value, str) and not _HHMM.fullmatch(value):
        raise ValueError(f"{value[:20]!r} is not a time of day HH:MM (00:00 to 23:59)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActiveHours(_Strict):
    """A daily window in the entry's tz, `start` included, `end` excluded; an `end` before
    `start` spans midnight (22:00 to 06:00)."""

    start: str = Field(json_schema_extra={"pattern": _HHMM.pattern})
    end: str = Field(json_schema_extra={"pattern": _HHMM.pattern})

    _times = field_validator("start", "end", mode="before")(_clock)

    @model_validator(mode="after")
    def _not_empty(self) -> ActiveHours:
        if self.start == self.end:
            raise ValueError("start and end are the same (leave it out for always)")
        return self

    def contains(self, moment: time) -> bool:
        start, end = time.fromisoformat(self.start), time.fromisoformat(self.end)
        if start < end:
            return start <= moment < end
        return moment >= start or moment < end


class ScheduleEntry(_Strict):
    """One scheduled turn: exactly one of `every` or `cron`."""

    every: str | None = Field(default=None, json_schema_extra={"pattern": _EVERY.pattern})
    cron: str | None = Field(default=None, max_length=_CRON_MAX)
    tz: str = "UTC"  # a zoneinfo name
    active_hours: ActiveHours | None = None
    prompt: str = Field(max_length=MAX_PROMPT)
    # A Blueprint fills in `schedule-<index>` where none is given.
    session: str | None = Field(default=None, json_schema_extra={"pattern": SESSION.pattern})

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"give a unit, e.g. {value}m or {value}h")
        if isinstance(value, str):
            parse_every(value)
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            cron_fields(value)
        return value

    @field_validator("tz")
    @classmethod
    def _tz(cls, value: str) -> str:
        zone(value)
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value

    @field_validator("session")
    @classmethod
    def _session(cls, value: str | None) -> str | None:
        if value is not None and not SESSION.fullmatch(value):
            raise ValueError(
                f"{value[:50]!r}: 1-40 of a-z, 0-9 and '-', starting a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _one_trigger(self) -> ScheduleEntry:
        if (self.every is None) == (self.cron is None):
            raise ValueError("give exactly one of `every` (like 30m) or `cron` (like 0 9 * * 1-5)")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return zone(self.tz)

    @property
    def interval(self) -> timedelta | None:
        return parse_every(self.every) if self.every is not None else None


def _aware(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return moment


def next_run(entry: ScheduleEntry, after: datetime, anchor: datetime | None = None) -> datetime:
    """When `entry` runs next, strictly after `after` (aware datetimes; the result in UTC).

    `every`: the next `anchor + k * interval` (anchor defaults to `after`, giving
    `after + interval`): a scheduler that passes its start time keeps a steady grid and does
    not replay runs missed while it was down. `cron`: the next matching minute in the entry's tz.
    """
    after = _aware(after, "after")
    utc = ZoneInfo("UTC")
    interval = entry.interval
    if interval is not None:
        base = _aware(anchor, "anchor") if anchor is not None else after
        steps = max((after - base) // interval + 1, 1)
        return (base + steps * interval).astimezone(utc)
    assert entry.cron is not None  # one of every/cron, checked at validation
    fields = cron_fields(entry.cron)
    from croniter import croniter  # see cron_fields

    wildcard_hour = fields.split()[1].startswith("*")
    it = croniter(fields, after.astimezone(entry.zone))
    while True:
        local = it.get_next(datetime).astimezone(utc).astimezone(entry.zone)
        # The second pass through a repeated wall-clock hour: a fixed-hour entry already ran.
        repeated = local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()
        if not (repeated and not wildcard_hour):
            return local.astimezone(utc)


def in_active_hours(entry: ScheduleEntry, when: datetime) -> bool:
    """Whether a run of `entry` at `when` (aware) falls inside its active hours (always, with
    none), read on the wall clock of the entry's tz."""
    if entry.active_hours is None:
        return True
    local = _aware(when, "when").astimezone(entry.zone)
    return entry.active_hours.contains(local.time().replace(second=0, microsecond=0))


def with_sessions(entries: list[ScheduleEntry]) -> list[ScheduleEntry]:
    """The entries, each with its session (`schedule-<index>` where none is given)."""
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"at most {MAX_ENTRIES} schedule entries")
    return [
        e if e.session is not None else e.model_copy(update={"session": f"schedule-{i}"})
        for i, e in enumerate(entries)
    ]
