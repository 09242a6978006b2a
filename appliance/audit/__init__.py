"""The host's audit log: append-only, hash-chained JSON lines that many processes append to.

    <state_dir>/audit/audit.jsonl   one record a line (file 0600, directory 0700)
    <state_dir>/audit/audit.head    {"seq", "hash"} of the last record: the tail's anchor

A record is {"seq": n, "ts": ISO-8601 UTC, "event": ..., <fields>, "prev": ..., "hash": ...}: hash
is the SHA-256 of the record's canonical JSON without "hash" (sorted keys, no spaces, ASCII), prev
is the previous record's hash, and record 1's prev is 64 zeros. Editing, deleting, inserting or
reordering a line breaks the chain. Cutting whole records off the end does not: that is what the
head file is for.

Writers (the gateway, each egress proxy, CLI commands, the supervisor) serialise on an exclusive
flock of the log. Under it a writer reads the last line by seeking back from the end, writes its
line(s) with one O_APPEND write, fdatasyncs, then rewrites the head in place. A writer that finds
the log and the head disagreeing (records cut off the tail, a line torn by a crash) first appends
an `audit.anomaly` record, so the evidence survives the head being rewritten; `verify` reports it.

Fields named like a credential (key, token, secret, password, authorization...) are redacted, and
so are values that look like one (`sk-...`, `Bearer ...`): the log must never hold a secret. The
rule is hardware/secret_names.py's, the one every layer asks.

The package: records.py (what a record is, redaction), logfile.py (reading the file, its head),
writer.py (appending), verify.py (checking the chain). Standard library only (and the secret
rule, itself stdlib-only): each egress proxy's monitor imports it
(appliance/control/egress_monitor.py).

Limits: a plain hash chain is tamper-evident only against someone who does not recompute it.
Whoever can write both the log and the head can rewrite them consistently, so anchor the head
elsewhere (`appliance audit verify --json` prints it, exports carry it). The head is not fsynced
after each append: after a power loss it may lag the log, which verify accepts. Rotation is out of
scope: the log grows until an operator archives it.
"""

from appliance.audit.logfile import Head, last_records, records, snapshot
from appliance.audit.records import (
    ANOMALY,
    GENESIS,
    REDACTED,
    TamperError,
    audit_path,
    canonical,
    head_path,
    parse_record,
    record_hash,
    record_line,
)
from appliance.audit.verify import Problem, Verification, verify
from appliance.audit.writer import BackgroundAudit, ChainWriter

__all__ = [
    "ANOMALY",
    "GENESIS",
    "REDACTED",
    "BackgroundAudit",
    "ChainWriter",
    "Head",
    "Problem",
    "TamperError",
    "Verification",
    "audit_path",
    "canonical",
    "head_path",
    "last_records",
    "parse_record",
    "record_hash",
    "record_line",
    "records",
    "snapshot",
    "verify",
]
