"""The journal: every start, crash, restart and replay, for diagnosis afterwards.

Append-only JSON lines in the state directory (``journal.jsonl``), one
``fsync`` per event so a crash of sentinel itself loses nothing, mode 0600,
rotated at 10 MB keeping 5 old files. Every event carries ``ts`` (wall
clock, ISO 8601), ``mono`` (monotonic seconds) and ``run`` (one id per
``sentinel up``). No prompt text ever goes in: requests appear by id,
fingerprint and size.

Events: ``server_start``, ``ready``, ``crash``, ``exit``, ``hang_kill``,
``restart``, ``replay``, ``gave_up``, ``quarantine``, ``crash_loop_failed``,
``orphan_reaped``, ``stop``.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs

__all__ = ["Journal", "read_events", "format_table", "parse_since", "JOURNAL_FILE"]

JOURNAL_FILE = "journal.jsonl"


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="microseconds")


@attrs.define(eq=False)
class Journal:
    directory: Path
    clock: Callable[[], float] = time.monotonic
    max_bytes: int = 10 * 1024 * 1024
    keep: int = 5
    run: str = attrs.field(factory=lambda: secrets.token_hex(4))
    #: The last events, newest last, for ``status`` and tests.
    recent: list[dict[str, Any]] = attrs.field(factory=list)

    @property
    def path(self) -> Path:
        return self.directory / JOURNAL_FILE

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"ts": _now_iso(), "mono": round(self.clock(), 6), "run": self.run, "event": event,
                 **fields}
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rotate_if_needed(len(line))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.recent = [*self.recent[-99:], entry]
        return entry

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming <= self.max_bytes:
            return
        for index in range(self.keep, 0, -1):
            older = self.path.with_name(f"{JOURNAL_FILE}.{index}")
            if index == self.keep:
                older.unlink(missing_ok=True)
            else:
                newer = older.with_name(f"{JOURNAL_FILE}.{index + 1}")
                if older.exists():
                    older.replace(newer)
        self.path.replace(self.path.with_name(f"{JOURNAL_FILE}.1"))


def journal_files(directory: Path) -> list[Path]:
    """Oldest first."""
    rotated = sorted(directory.glob(f"{JOURNAL_FILE}.*"),
                     key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0, reverse=True)
    current = directory / JOURNAL_FILE
    return [*rotated, *([current] if current.exists() else [])]


def read_events(directory: Path, since: datetime.datetime | None = None) -> Iterator[dict[str, Any]]:
    for path in journal_files(directory):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a torn last line, if sentinel died mid-write
                if since is None or datetime.datetime.fromisoformat(entry["ts"]) >= since:
                    yield entry


def parse_since(text: str) -> datetime.datetime:
    """``30m``, ``2h``, ``1d``, or an ISO 8601 time."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    now = datetime.datetime.now(datetime.timezone.utc)
    if text[:-1].replace(".", "", 1).isdigit() and text[-1] in units:
        return now - datetime.timedelta(seconds=float(text[:-1]) * units[text[-1]])
    moment = datetime.datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.astimezone()


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return ""
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"


def describe(entry: dict[str, Any]) -> str:
    """The one-line detail of an event."""
    event = entry["event"]
    if event in ("crash", "exit"):
        tail = (entry.get("stderr_tail") or "").strip().splitlines()
        return tail[-1][-80:] if tail else ""
    if event == "restart":
        return f"after {entry.get('backoff', 0):g}s backoff"
    if event == "server_start":
        return f"pid {entry.get('pid')} {Path(str(entry.get('model', ''))).name}"
    if event in ("gave_up", "quarantine", "crash_loop_failed", "hang_kill", "orphan_reaped"):
        return str(entry.get("reason") or entry.get("cause") or "")
    if event == "replay":
        return f"attempt {entry.get('attempt')}"
    return ""


def format_table(entries: list[dict[str, Any]]) -> str:
    rows = [("WHEN", "WHAT", "SIGNAL", "UPTIME", "REQUEST", "DOWNTIME", "DETAIL")]
    down_since: dict[str, float] = {}
    for entry in entries:
        run, event = entry.get("run", ""), entry["event"]
        downtime = ""
        if event in ("crash", "exit", "hang_kill") and run not in down_since:
            down_since[run] = entry["mono"]
        elif event == "ready" and run in down_since:
            downtime = _seconds(entry["mono"] - down_since.pop(run))
        when = datetime.datetime.fromisoformat(entry["ts"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        rows.append((when, event, entry.get("signal") or "", _seconds(entry.get("uptime")),
                     entry.get("request_id") or "", downtime, describe(entry)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows).rstrip()


def last_crash_line(directory: Path) -> str | None:
    """The newest crash in one line, for ``sentinel status`` and the banner."""
    last = None
    for entry in read_events(directory):
        if entry["event"] in ("crash", "hang_kill", "crash_loop_failed"):
            last = entry
    if last is None:
        return None
    when = datetime.datetime.fromisoformat(last["ts"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    cause = last.get("signal") or last.get("reason") or f"exit code {last.get('returncode')}"
    request = f", request {last['request_id']}" if last.get("request_id") else ""
    return f"last crash: {when} {last['event']} ({cause}{request}) {describe(last)}".rstrip()
