"""The study's progress: progress.json in the store and the terminal line `rlheal run` prints."""

import io

from rlheal.progress import Progress, Watcher, format_line

ORDER = ["data", "sft", "eval", "report"]


def test_progress_counts_units_and_survives_a_new_reader(tmp_path):
    p = Progress(tmp_path, "toy")
    p.expect("eval", ["a id", "a ood", "b id"])
    p.done("eval", "a id")
    p.done("eval", "a id")  # reported twice (a retried task): counted once
    p.done("data", "data")
    assert Progress(tmp_path, "toy").summary() == {"eval": (1, 3), "data": (1, 1)}
    p.expect("eval", ["a id", "b id"])  # a unit no longer expected is dropped, done ones kept
    assert p.summary()["eval"] == (1, 2)


def test_watcher_prints_only_when_a_stage_advances(tmp_path):
    p = Progress(tmp_path, "toy")
    out = io.StringIO()
    w = Watcher(p, ORDER, stream=out, every=3600)  # the loop never fires: poll by hand
    with w:
        assert w.poll() is None
        p.expect("sft", ["step 4", "step 8"])
        p.done("sft", "step 4")
        line = w.poll()
        assert line is not None and line.endswith("data - | sft 1/2 | eval - | report -")
        assert w.poll() is None
        p.done("sft", "step 8")
    printed = out.getvalue().splitlines()
    assert printed[0] == "[toy 0:00] data - | sft - | eval - | report -"
    assert printed[-1].endswith("sft 2/2 | eval - | report -")  # the last change is printed on exit


def test_line_format():
    assert format_line("s", {"data": (1, 1), "eval": (3, 40)}, ORDER, 125.7) == "[s 2:05] data 1/1 | sft - | eval 3/40 | report -"


class _Writes(io.StringIO):
    """Records each write call: a line must reach the stream whole."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def write(self, s):
        self.calls.append(s)
        return super().write(s)


def test_each_progress_line_is_one_write(tmp_path):
    # print() wrote the text and then its newline; a log record from the flow's thread landing in
    # between glued itself onto the last progress line (seen in CI: "report 1/12026-12-01 ... Finished").
    p = Progress(tmp_path, "toy")
    out = _Writes()
    with Watcher(p, ORDER, stream=out, every=3600):
        p.done("data", "data")
    assert len(out.calls) == 2 and all(c.startswith("[toy ") and c.endswith(" -\n") for c in out.calls), out.calls


def test_what_runs_now_is_shown_per_stage_and_cleared_when_it_ends(tmp_path):
    p = Progress(tmp_path, "toy")
    p.expect("eval", ["eval sft step=4 id", "eval sft step=4 ood", "eval base id"])
    p.expect("sft", ["step 4"])
    # Prefect's task run names; SFT's one task is not one of its units (steps), so not shown
    p.running({"eval": ["eval sft step=4 id", "eval sft step=4 ood", "eval stray"], "sft": ["sft steps=[0, 4]"]})
    assert p.running_now() == {"eval": ["eval sft step=4 id", "eval sft step=4 ood"]}
    line = format_line("toy", p.summary(), ORDER, 3, p.running_now())
    assert line == "[toy 0:03] data - | sft 0/1 | eval 0/3 (running: sft step=4 id, sft step=4 ood) | report -"
    p.done("eval", "eval sft step=4 id")  # ended: no longer running, before the next look at the API
    assert p.running_now() == {"eval": ["eval sft step=4 ood"]}
    p.running({})
    assert p.running_now() == {}


def test_a_running_view_left_by_a_process_that_is_gone_is_not_shown(tmp_path):
    """A run killed with -9 leaves its last view of what runs in progress.json: `rlheal
    status` must not show those tasks as running (their process is gone); a view written
    on another host is shown, since it cannot be asked from here."""
    import json
    import subprocess
    import sys

    p = Progress(tmp_path, "toy")
    p.expect("eval", ["eval base id"])
    code = f"from rlheal.progress import Progress; Progress({str(tmp_path)!r}, 'toy').running({{'eval': ['eval base id']}})"
    subprocess.run([sys.executable, "-c", code], check=True)  # writes the view, then ends
    assert json.loads(p.file.read_text())["eval"]["running"] == ["eval base id"]  # still in the file
    assert p.running_now() == {}
    p.running({"eval": ["eval base id"]})  # this process, alive
    assert p.running_now() == {"eval": ["eval base id"]}
    state = json.loads(p.file.read_text())
    state["eval"]["running_by"] = "another-host.example:1"
    p.file.write_text(json.dumps(state))
    assert p.running_now() == {"eval": ["eval base id"]}


def test_a_stages_note_is_shown_under_its_bar_by_status(tmp_path):
    from rlheal.progress import format_status

    p = Progress(tmp_path, "toy")
    p.expect("drift", ["drift sft step=4"])
    p.done("drift", "drift sft step=4")
    p.note("drift", "last: sft step=4: OOD JS from the base 0.0170")
    text = format_status("toy", p.summary(), ORDER, p.running_now(), p.notes())
    assert text.splitlines()[-1].strip() == "last: sft step=4: OOD JS from the base 0.0170"
    assert "drift" in text.splitlines()[-2] and "1/1" in text.splitlines()[-2]
    assert format_status("toy", p.summary(), ORDER).count("last:") == 0  # no notes given, none shown


def test_many_running_tasks_are_counted_and_long_names_cut():
    from rlheal.progress import running_text

    names = [f"edit E2_swap_directions_sft-{k}_to_sft-40_top0.2_tail0" for k in (4, 8, 12)]
    text = running_text("edit", names)
    assert text == " (running: E2_swap_directions_sft-4_to_sft-40_top0…, E2_swap_directions_sft-8_to_sft-40_top0… +1)"
    assert running_text("eval", []) == ""


def test_the_watcher_prints_when_a_task_starts(tmp_path):
    p = Progress(tmp_path, "toy")
    p.expect("eval", ["eval base id"])
    w = Watcher(p, ORDER, stream=io.StringIO(), every=3600)
    with w:
        assert w.poll() is None
        p.running({"eval": ["eval base id"]})
        assert w.poll().endswith("eval 0/1 (running: base id) | report -")
