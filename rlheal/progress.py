"""Study progress, kept in the store and mirrored to the Prefect UI.

`studies/<name>/progress.json` holds done/total per stage (atomically replaced), so
`rlheal status` needs no server; inside a flow run every update also refreshes one
Prefect progress artifact per stage.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

_lock = threading.Lock()


def writer() -> str:
    """Who writes a running view: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def alive(by: str | None) -> bool:
    """Whether the process that wrote a running view (`host:pid`) still runs; one on another
    host is taken as running (it cannot be asked from here)."""
    host, _, pid = (by or "").rpartition(":")
    if not host or not pid.isdigit():
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return True


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class Progress:
    def __init__(self, study_dir: Path, study: str):
        self.file = Path(study_dir) / "progress.json"
        self.study = study
        self._artifacts: dict[str, Any] = {}

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}

    def _write(self, state: dict) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".progress.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, self.file)

    def expect(self, stage: str, labels: list[str]) -> None:
        """Declare the units of work of a stage (e.g. one per checkpoint and split)."""
        with _lock:
            state = self._read()
            entry = state.setdefault(stage, {"done": []})
            entry["total"] = sorted(set(labels))
            entry["done"] = [d for d in entry["done"] if d in entry["total"]]
            self._write(state)
        self._publish(stage, state[stage])

    def done(self, stage: str, label: str) -> None:
        with _lock:
            state = self._read()
            entry = state.setdefault(stage, {"total": [label], "done": []})
            if label not in entry["done"]:
                entry["done"].append(label)
            entry["running"] = [r for r in entry.get("running", []) if r not in (label, f"{stage} {label}")]
            self._write(state)
        self._publish(stage, state[stage])

    def running(self, now: dict[str, list[str]]) -> None:
        """What runs now: task run names per stage (the stages not named run nothing). Only
        names of a stage's own units are kept (`eval sft step=4 id`, not SFT's one task)."""
        with _lock:
            state = self._read()
            units = {s: [n for n in now.get(s, []) if n in e.get("total", []) or n.removeprefix(f"{s} ") in e.get("total", [])] for s, e in state.items()}
            me = writer()
            changed = [s for s, e in state.items() if e.get("running", []) != units[s] or (units[s] and e.get("running_by") != me)]
            for s in changed:
                state[s]["running"], state[s]["running_by"] = units[s], me
            if changed:
                self._write(state)
        for s in changed:
            self._publish(s, state[s])

    def note(self, stage: str, text: str) -> None:
        """A line of news about the stage (the drift monitor's latest values), shown by
        `rlheal status` under the stage's bar."""
        with _lock:
            state = self._read()
            state.setdefault(stage, {"total": [], "done": []})["note"] = text
            self._write(state)

    def notes(self) -> dict[str, str]:
        return {stage: e["note"] for stage, e in self._read().items() if e.get("note")}

    def running_now(self) -> dict[str, list[str]]:
        """What runs now, as the running study last wrote it; nothing from a process that is
        gone (a killed run's last view is not what runs now)."""
        return {stage: e["running"] for stage, e in self._read().items() if e.get("running") and alive(e.get("running_by"))}

    def summary(self) -> dict[str, tuple[int, int]]:
        return {stage: (len(e.get("done", [])), len(e.get("total", []))) for stage, e in self._read().items()}

    def _publish(self, stage: str, entry: dict) -> None:
        """Update the stage's Prefect progress artifact when running inside a flow."""
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact
            from prefect.context import FlowRunContext

            if FlowRunContext.get() is None:
                return
            pct = 100.0 * len(entry["done"]) / max(1, len(entry["total"]))
            key = artifact_key(self.study, stage, "progress")
            description = f"{self.study}: {stage} {len(entry['done'])}/{len(entry['total'])}{running_text(stage, entry.get('running', []))}"
            if stage not in self._artifacts:
                self._artifacts[stage] = create_progress_artifact(pct, key=key, description=description)
            else:
                update_progress_artifact(self._artifacts[stage], pct, description=description)
        except Exception:  # the UI mirror must never fail a study
            pass


SHOWN_RUNNING = 2  # task names shown per stage; the rest are counted
NAME_WIDTH = 40  # characters of a task name shown (edit variants' names run to 60)


def running_text(stage: str, names: list[str]) -> str:
    """` (running: sft step=160 ood, ...)`: the task run names without their stage's word."""
    short = [n.removeprefix(f"{stage} ") for n in names]
    short = [n if len(n) <= NAME_WIDTH else n[: NAME_WIDTH - 1] + "…" for n in short]
    if not short:
        return ""
    more = f" +{len(short) - SHOWN_RUNNING}" if len(short) > SHOWN_RUNNING else ""
    return f" (running: {', '.join(short[:SHOWN_RUNNING])}{more})"


def format_status(study: str, summary: dict[str, tuple[int, int]], order: list[str], running: dict[str, list[str]] | None = None, notes: dict[str, str] | None = None) -> str:
    if not summary:
        return f"study {study!r}: nothing run yet"
    lines = [f"study {study!r}"]
    for stage in order + sorted(set(summary) - set(order)):
        if stage in summary:
            done, total = summary[stage]
            bar = "#" * round(20 * done / max(1, total))
            lines.append(f"  {stage:<8} {bar:<20} {done}/{total}{running_text(stage, (running or {}).get(stage, []))}")
            if (notes or {}).get(stage):
                lines.append(f"  {'':<8} {notes[stage]}")
    return "\n".join(lines)


def format_line(study: str, summary: dict[str, tuple[int, int]], order: list[str], elapsed: float, running: dict[str, list[str]] | None = None) -> str:
    """One line for a terminal: every stage of the pipeline, `-` until it has started, and
    what runs now."""
    parts = []
    for stage in order:
        if stage in summary:
            done, total = summary[stage]
            parts.append(f"{stage} {done}/{total}{running_text(stage, (running or {}).get(stage, []))}")
        else:
            parts.append(f"{stage} -")
    m, sec = divmod(int(elapsed), 60)
    return f"[{study} {m}:{sec:02d}] " + " | ".join(parts)


class Watcher:
    """Prints the study's progress line whenever a stage advances, from a daemon thread that
    reads progress.json: the terminal's view of what the Prefect UI shows as artifacts."""

    def __init__(self, progress: Progress, order: list[str], stream: TextIO | None = None, every: float = 2.0):
        self.progress, self.order, self.every = progress, order, every
        self.stream = stream if stream is not None else sys.stderr  # today's stderr, not import time's
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._last: dict | None = None
        self._thread = threading.Thread(target=self._loop, name="rlheal-progress", daemon=True)

    def poll(self) -> str | None:
        """The line to print, or None when nothing advanced or started since the last one."""
        now = (self.progress.summary(), self.progress.running_now())
        if now == self._last:
            return None
        self._last = now
        return format_line(self.progress.study, *now[:1], self.order, time.monotonic() - self.started, now[1])

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            if line := self.poll():
                self._emit(line)

    def _emit(self, line: str) -> None:
        # One write per line: print() writes the text and its newline separately, and a log
        # record from another thread landing between them glues itself onto the progress line.
        self.stream.write(line + "\n")
        self.stream.flush()

    def __enter__(self) -> Watcher:
        self._last = (self.progress.summary(), {})  # what an earlier run finished is not news
        self._emit(format_line(self.progress.study, self._last[0], self.order, 0))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if line := self.poll():
            self._emit(line)
