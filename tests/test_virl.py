"""V-IRL-L's routes, label rule, verifier and episode, with the authors' worked behaviour
(SFTvsRL's gym_virl NavigationEnvironment and step_rewards_virl) as test vectors."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from rlheal.config import ConfigError
from tasks.virl import navigation as nv
from tasks.virl import routes
from tasks.virl.routes import Milestone, Route

START = (40.75, -73.99)


def route(*legs, init=0):
    """A route from (heading, landmarks) legs of 100 m each."""
    points, ms = [START], []
    for heading, landmarks in legs:
        ms.append(Milestone(heading, routes.compass(heading), landmarks, 100))
        points.append(routes._walk(points[-1], heading, 100))
    return Route("here", "there", tuple(points), tuple(ms), init, seed=1, index=0)


def reply(action: str, observation: str = "No landmarks nearby; ") -> str:
    return f'\n{{\n  "current observation": "{observation}",\n  "current instruction": "x",\n  "action": "{action}",\n}}\n'


# ---------------------------------------------------------------------------- the label rule


@pytest.mark.parametrize(
    "previous, heading, exact, reference",
    [
        (0, 0, "slightly left", "slightly left"),  # a delta of exactly 0 is "slightly left"
        (90, 45, "slightly left", "slightly left"),  # -45
        (90, 44, "left", "left"),  # -46
        (0, 45, "slightly right", "slightly right"),
        (0, 46, "right", "right"),
        (350, 10, "slightly right", "left"),  # the authors do not wrap: -340
        (10, 350, "slightly left", "right"),  # +340
        (270, 0, "right", "left"),  # -270 unwrapped, +90 wrapped
        (0, 180, "right", "right"),
    ],
)
def test_relative_labels_with_and_without_the_wrap(previous, heading, exact, reference):
    assert nv.relative(previous, heading, "exact") == exact
    assert nv.relative(previous, heading, "reference") == reference


def test_compass_names_are_the_nearest_of_eight():
    assert [routes.compass(h) for h in (0, 22, 23, 67, 68, 177, 202, 203, 337, 338, 359)] == ["north", "north", "northeast", "northeast", "east", "south", "south", "southwest", "northwest", "north", "north"]


# ---------------------------------------------------------------------------- instruction, rail, prompt


def test_instruction_names_both_the_relative_word_and_the_compass_direction():
    r = route((40, "Cafe is on your left"), (130, routes.NO_LANDMARK), (200, "Bank is on your right"), init=0)
    assert nv.instruction(r) == (
        "1. First, turn slightly right to face northeast.\n"
        "2. Move forward until you reach next intersection where Cafe is on your left.\n"
        "3. Turn right to face southeast.\n"
        "4. Move forward until you reach next intersection.\n"
        "5. Turn right to face south.\n"
        "6. Move forward until you reach destination where Bank is on your right.\n"
    )


def test_the_rail_turns_walks_and_stops_the_same_in_both_splits():
    r = route((40, "Cafe is on your left"), (130, routes.NO_LANDMARK), (200, "Bank is on your right"))
    points = nv.rail(r)
    ids = [p.action["id"] for p in points]
    oods = [p.action["ood"] for p in points]
    assert ids[0] == "turn_direction(northeast)" and oods[0] == "turn_direction(slightly right)"
    assert [a for a in ids if a.startswith("turn")] == ["turn_direction(northeast)", "turn_direction(southeast)", "turn_direction(south)"]
    assert [a for a in oods if a.startswith("turn")] == ["turn_direction(slightly right)", "turn_direction(right)", "turn_direction(right)"]
    assert ids[-1] == oods[-1] == "stop()" and ids.count("forward()") == oods.count("forward()")
    assert [p.observation for p in points if p.intersection] == ["Cafe is on your left; You observe an intersection", "No landmark nearby; You observe an intersection"]
    assert points[0].observation == "No landmarks nearby; " and points[-1].observation == "Bank is on your right; "
    # each of 3 legs keeps about half of its 4 walking points, the same ones every time
    assert 0 <= ids.count("forward()") <= 12 and nv.rail(r) == points


def test_the_prompt_is_the_authors_text():
    r = route((40, "Cafe is on your left"), (200, "Bank is on your right"))
    points = nv.rail(r)
    text = nv.prompt(r, "id", points[:1], points[1])
    assert text.startswith("\n[Task Description]\nYou are an expert in navigation. You will receive a sequence of instructions to follow. You\nare also")
    assert "identify the next sentence to be executed. \nThen," in text  # the trailing space is theirs
    assert "[Instruction]\n1. First, turn slightly right to face northeast.\n" in text and "right.\n\n\n[Action space]\n" in text
    assert f"O_1: No landmarks nearby; \nA_1: turn_direction(northeast)\nO_2: {points[1].observation}\nA_2: \n\n\n[Output]\n{{\n" in text
    assert text.endswith('  "action": the action to be taken chosen from the action space,\n}\n')
    assert "x could be any following 8 directions ['north', 'northeast'" in text
    assert "x could be any following ['left', 'right', 'slightly left', 'slightly right']" in nv.prompt(r, "ood", [], points[0])


# ---------------------------------------------------------------------------- rewards


def test_rewards_follow_step_rewards_virl():
    r = route((40, "Cafe is on your left"), (200, "Bank is on your right"))
    points = nv.rail(r)
    start, corner = points[0], next(p for p in points if p.intersection)
    assert nv.score(reply("turn_direction(northeast)"), start, "id").reward == 1.0
    assert nv.score(reply("turn_direction(slightly right)"), start, "id").reward == -1.0  # the other split's word
    wrong_claim = nv.score(reply("forward()", "Cafe; You observe an intersection"), start, "id")
    assert (wrong_claim.reward, wrong_claim.reason) == (-1.5, nv.NOT_AT_INTERSECTION)
    missed = nv.score(reply("forward()", "No landmarks nearby; "), corner, "id")
    assert (missed.reward, missed.reason) == (-1.5, nv.AT_AN_INTERSECTION)
    # a right claim with a wrong action: -1, but -1.5 in the authors' code (it checks the landmark part only)
    right_claim = reply("forward()", corner.observation)
    assert nv.score(right_claim, corner, "id", "exact").reward == -1.0
    assert (nv.score(right_claim, corner, "id", "reference").reward, nv.score(right_claim, corner, "id", "reference").reason) == (-1.5, nv.NOT_AT_INTERSECTION)
    garbled = nv.score("I would go north", start, "id")
    assert (garbled.reward, garbled.outcome, garbled.format_error, garbled.action) == (-1.0, "no_action", True, "None")
    assert nv.score(reply("stop()"), points[-1], "ood").outcome == "arrived"


def test_the_correction_messages_are_the_authors_text():
    assert nv.WRONG_ACTION.startswith("you make incorrect action. Please avoid this action and try again in the same format:\n[Output]\n{{\n")
    assert nv.WRONG_ACTION.endswith('"action": the action to be taken chosen from the action space,\n}}.')
    assert nv.NOT_AT_INTERSECTION.startswith("you are not at any intersection. Please avoid this observation and try again")


# ---------------------------------------------------------------------------- episodes


def walk(ep, answers):
    for a in answers:
        ep.record(a)
    return ep


def test_a_right_walk_advances_point_by_point_and_stop_solves_the_route():
    r = route((40, "Cafe is on your left"), (200, "Bank is on your right"))
    ep = nv.Episode(r, "ood")
    for k, point in enumerate(ep.rail):
        assert ep.position == k and len(ep.messages()) == 1  # each point is a fresh prompt
        ep.record(reply(point.action["ood"], point.observation))
    assert ep.done and ep.success and not ep.truncated and ep.scores[-1].outcome == "arrived"
    assert f"A_{len(ep.rail) - 1}: {ep.rail[-2].action['ood']}\n" in nv.prompt(r, "ood", ep.rail[:-1], ep.rail[-1])


def test_two_graded_tries_per_point_then_the_route_fails():
    r = route((40, "Cafe is on your left"), (200, "Bank is on your right"))
    ep = walk(nv.Episode(r, "id"), [reply("forward()")])
    assert ep.messages()[-1] == {"role": "user", "content": f"You failed this trial because {nv.WRONG_ACTION}"}
    assert ep.messages()[1]["content"] == reply("forward()") and ep.position == 0
    ep.record(reply("stop()"))
    assert ep.done and not ep.success and [s.reward for s in ep.scores] == [-1.0, -1.0]
    with pytest.raises(RuntimeError):
        ep.record("more")


def test_in_rl_the_third_call_is_ungraded_and_truncates():
    r = route((40, "Cafe is on your left"), (200, "Bank is on your right"))
    ep = walk(nv.Episode(r, "id", rl=True), [reply("forward()"), reply("forward()")])
    assert not ep.done and ep.truncation_pending
    s = ep.record(reply("turn_direction(northeast)"))  # right, but never graded
    assert (s.reward, s.truncated, ep.done, ep.success, ep.truncated) == (-1.0, True, True, False, True)


def test_a_right_try_after_a_wrong_one_moves_on():
    r = route((40, "Cafe is on your left"), (200, "Bank is on your right"))
    ep = walk(nv.Episode(r, "id"), [reply("forward()"), reply("turn_direction(northeast)")])
    assert ep.position == 1 and len(ep.messages()) == 1 and not ep.done


def test_the_step_limit_counts_every_generation(monkeypatch):
    monkeypatch.setattr(nv, "STEP_LIMIT", 3)
    r = route((40, "Cafe is on your left"), (200, "Bank is on your right"))
    ep = nv.Episode(r, "id")
    for point in ep.rail[:3]:
        ep.record(reply(point.action["id"], point.observation))
    assert ep.done and ep.truncated and not ep.success


# ---------------------------------------------------------------------------- generated routes and the authors' schema


def test_generated_routes_are_pure_functions_of_seed_and_index():
    a, b = routes.generate(3, 7), routes.generate(3, 7)
    assert a == b and routes.generate(3, 8) != a and routes.generate(4, 7) != a
    many = [routes.generate(0, i) for i in range(200)]
    assert {len(r.milestones) - 1 for r in many} == set(range(2, 7))  # 2-6 turns
    assert {m.direction for r in many for m in r.milestones} == set(routes.COMPASS)  # diagonals included
    assert all(m.heading != n.heading for r in many for m, n in zip(r.milestones, r.milestones[1:]))
    assert all(r.milestones[-1].landmarks != routes.NO_LANDMARK for r in many)


def test_the_authors_schema_round_trips(tmp_path):
    made = [routes.generate(5, i) for i in range(20)]
    path = routes.write(made, tmp_path / "route_infos.json")
    data = json.loads(path.read_text())
    assert data[1] == 20 and set(data[0][0]) >= {"start_place", "dest_place", "route_results", "milestone_info"}
    assert '"to_next_intersection_heading": "' in data[0][0]["milestone_info"]
    loaded = routes.load(path)
    assert [dataclasses.replace(r, seed=None, index=None) for r in made] == loaded


@pytest.mark.parametrize(
    "damage, field",
    [
        (lambda d: d[0][2].pop("milestone_info"), r"routes\[2\]: missing field 'milestone_info'"),
        (lambda d: d[0][1]["route_results"].update(geocode_list=[[1.0]]), r"routes\[1\].route_results.geocode_list"),
        (lambda d: d[0][3].update(init_heading=360), r"routes\[3\].init_heading: 360"),
        (lambda d: d.pop(), r"expected \[routes, number_of_routes\]"),
    ],
)
def test_a_file_that_is_not_the_schema_is_refused_with_the_field_named(tmp_path, damage, field):
    path = routes.write([routes.generate(5, i) for i in range(4)], tmp_path / "route_infos.json")
    data = json.loads(path.read_text())
    damage(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=field) as err:
        routes.load(path)
    assert str(path) in str(err.value)


def test_a_heading_outside_0_359_and_a_one_point_route_are_refused():
    r = routes.to_record(routes.generate(5, 0))
    bad = re.sub(r'"to_next_intersection_heading": "\d+ \((\w+)\)"', r'"to_next_intersection_heading": "999 (\1)"', r["milestone_info"], count=1)
    with pytest.raises(ConfigError, match=r"f: routes\[0\].milestone_info\[0\].to_next_intersection_heading: heading 999 is outside 0-359"):
        routes.from_record(dict(r, milestone_info=bad), "f: routes[0]")
    garbled = r["milestone_info"].replace("(", "", 1)
    with pytest.raises(ConfigError, match="is not '<degrees> \\(<compass name>\\)'"):
        routes.from_record(dict(r, milestone_info=garbled), "f: routes[0]")
    one = dict(r, route_results={"geocode_list": [], "landmark_list": []}, milestone_info="")
    with pytest.raises(ConfigError, match="at least two points"):
        routes.from_record(dict(one, start_geocode=[1.0, 2.0]), "f: routes[0]")


# ---------------------------------------------------------------------------- the whole study on task: virl


def test_the_virl_smoke_study_runs_every_stage(prefect_api, tmp_path):
    """configs/smoke-virl.yaml through `rlheal run`: the tables carry the task's columns and
    metrics, both splits walk the same routes, no training route is an evaluation route."""
    import os
    import subprocess
    import sys

    import polars as pl
    import yaml

    from tasks.benchmark import get
    from tests.conftest import CONFIGS, _home

    cfg = yaml.safe_load((CONFIGS / "smoke-virl.yaml").read_text()) | {"store": str(tmp_path / "store")}
    path = tmp_path / "smoke-virl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(_home)}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    t = {p.stem: pl.read_parquet(p) for p in (tmp_path / "store" / "studies" / "smoke-virl" / "tables").glob("*.parquet")}
    assert {"sft_train", "eval_set_id", "eval_set_ood", "checkpoints", "rl_log", "eval_attempts", "eval_summary", "svd_pair_metrics", "edit_eval_results"} <= set(t)
    assert t["sft_train"].height == 256 and "step" in t["sft_train"].columns
    assert t["eval_set_id"]["route"].to_list() == t["eval_set_ood"]["route"].to_list()  # one set of routes, two action rules
    virl = get("virl")
    held = {virl.overlap_key(virl.from_row(row), "ordered") for row in t["eval_set_id"].iter_rows(named=True)}
    trained = {virl.overlap_key(virl.deal("id", 0, i), "ordered") for i in set(t["sft_train"]["index"])}
    assert not held & trained
    s = t["eval_summary"]
    assert {"step_accuracy", "accuracy", "accuracy_ci_low"} <= set(s.columns) and s.height == 2 * t["checkpoints"].height
    a = t["eval_attempts"]
    assert "action" in a.columns and set(a["outcome"]) <= set(virl.outcomes)
    assert (t["rl_log"]["count_no_action"] >= 0).all() and "count_arrived" in t["rl_log"].columns
    md = (tmp_path / "store" / "studies" / "smoke-virl" / "report" / "report.md").read_text()
    assert "## Verdicts" in md and "number field" not in md
    assert "| ckpt_id | step | split | n | k | accuracy | accuracy_ci_low | accuracy_ci_high | first_attempt_accuracy | format_error_rate | step_accuracy | first_action |" in md


def test_a_bad_routes_file_is_refused_before_anything_is_written(tmp_path):
    """`virl.routes` pointing at a file that is not the authors' schema: exit 2, the file and
    the field named, no store created."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import CONFIGS

    good = routes.write([routes.generate(5, i) for i in range(3)], tmp_path / "route_infos.json")
    data = json.loads(good.read_text())
    data[0][1]["init_heading"] = 400
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    cfg = yaml.safe_load((CONFIGS / "smoke-virl.yaml").read_text()) | {"store": str(tmp_path / "store"), "virl": {"routes": str(bad)}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{bad}: routes[1].init_heading: 400" in r.stderr and not (tmp_path / "store").exists()
    cfg["virl"]["routes"] = str(good)  # 3 routes, 8 for evaluation: none left to train on
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "holds 3 routes and data.eval_size takes 8" in r.stderr
    cfg["virl"]["routes"] = str(routes.write([routes.generate(5, i) for i in range(12)], tmp_path / "twelve.json"))
    path.write_text(yaml.safe_dump(cfg))
    assert subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(path)], capture_output=True, text=True, timeout=300).returncode == 0


def test_routes_from_a_file_are_dealt_in_a_seeded_order(tmp_path):
    from tasks.virl.benchmark import Virl

    made = [routes.generate(9, i) for i in range(6)]
    filed = Virl(str(routes.write(made, tmp_path / "r.json")))
    loaded = {r.points for r in routes.load(tmp_path / "r.json")}
    dealt = [filed.deal("id", 1, i).route.points for i in range(12)]
    assert set(dealt) == loaded and dealt[:6] == dealt[6:] and len(set(dealt[:6])) == 6  # a permutation, cycled
    assert [filed.deal("ood", 1, i).route for i in range(6)] == [filed.deal("id", 1, i).route for i in range(6)]
    assert [filed.deal("id", 2, i).route.points for i in range(6)] != dealt[:6]
    assert Virl().deal("id", 9, 3).route == made[3]


def test_a_ppo_resume_brings_a_route_back_where_it_was():
    """The resume point replays every recorded response: a V-IRL conversation holds only the
    current point's turns, so replaying the conversation alone restarted the route."""
    from rlheal.config import parse_config
    from tasks.benchmark import training_stream
    from tasks.rl.rollout import Envs
    from tasks.virl.benchmark import Virl

    bench, cfg = Virl(), parse_config({"name": "v", "task": "virl"})
    stream = lambda i: training_stream(bench, cfg.rl.seed, set(), "ordered", i)  # noqa: E731
    envs = Envs(bench, 1, stream, cfg.rl.seed, "exact", 2)
    ep = envs.episodes[0]
    for point in ep.rail[:2]:
        envs.step(0, reply(point.action["id"], point.observation))
    envs.step(0, reply("stop()"))  # a wrong try at the third point
    again = Envs(bench, 1, stream, cfg.rl.seed, "exact", 2)
    again.restore(json.loads(json.dumps(envs.state())))
    back = again.episodes[0]
    assert (back.position, back.points, back.responses) == (2, [0, 1, 2], ep.responses)
    assert again.conversations() == envs.conversations()


# ---------------------------------------------------------------------------- review: the gaps a mutation went through


def test_the_sft_target_names_the_point_the_observation_and_the_sentence():
    r = route((40, "Cafe is on your left"), (200, "Bank is on your right"))
    points = nv.rail(r)
    sentences = nv.sentences(r)
    corner = next(p for p in points if p.intersection)
    assert nv.answer(r, "ood", corner) == (
        '\n{\n  "current observation": "Cafe is on your left; You observe an intersection",\n'
        '  "current instruction": "Turn right to face south.",\n  "action": "turn_direction(right)",\n}\n'
    )
    walking = [sentences[p.sentence] for p in points if p.action["id"] == "forward()"]
    assert all(w.startswith("Move forward") for w in walking)
    assert {p.sentence for p in points if p.intersection} == {2}
    assert sentences[points[-1].sentence] == "Move forward until you reach destination where Bank is on your right."
    assert sentences[points[0].sentence] == "First, turn slightly right to face northeast."


def test_a_one_leg_route_opens_with_turn_as_the_authors_write_it():
    assert nv.instruction(route((90, "Bank is on your right"))).startswith("1. Turn right to face east.\n")


def test_the_correction_texts_in_full():
    tail = ' Please avoid this {} and try again in the same format:\n[Output]\n{{{{\n  "current observation": latest observation from the streetview grid,\n  "current instruction": analyze the full instruction and identify the sentence to be executed,\n  "action": the action to be taken chosen from the action space,\n}}}}.'
    assert nv.WRONG_ACTION == "you make incorrect action." + tail.format("action")
    assert nv.AT_AN_INTERSECTION == "you are at an intersection." + tail.format("observation")
    assert nv.NOT_AT_INTERSECTION == "you are not at any intersection." + tail.format("observation")


def test_the_ood_history_shows_relative_actions_and_reference_labels_do_not_wrap():
    r = route((350, "Cafe is on your left"), (10, "Bank is on your right"), init=340)
    exact, reference = nv.rail(r, "exact"), nv.rail(r, "reference")
    corner_e = next(p for p in exact if p.intersection)
    corner_r = next(p for p in reference if p.intersection)
    assert (corner_e.action["ood"], corner_r.action["ood"]) == ("turn_direction(slightly right)", "turn_direction(left)")
    text = nv.prompt(r, "ood", exact[:1], exact[1])
    assert "A_1: turn_direction(slightly right)\n" in text and "A_1: turn_direction(north" not in text


def test_an_rl_route_can_fail_after_walking_part_of_the_way():
    r = route((40, "Cafe is on your left"), (200, "Bank is on your right"))
    ep = nv.Episode(r, "id", rl=True)
    ep.record(reply(ep.rail[0].action["id"]))
    ep.record(reply("stop()"))
    assert ep.position == 1 and ep.tries() == 1 and not ep.truncation_pending
    ep.record(reply("stop()"))
    assert ep.truncation_pending and ep.record("x").truncated and ep.done and not ep.success
    assert ep.responses[0] == reply(ep.rail[0].action["id"]) and ep.points == [0, 1, 1, 1]


def test_the_step_limit_truncates_the_score_too_and_spares_a_finished_route(monkeypatch):
    r = route((40, "Cafe is on your left"))
    ep = nv.Episode(r, "id")
    monkeypatch.setattr(nv, "STEP_LIMIT", len(ep.rail))
    for point in ep.rail:
        s = ep.record(reply(point.action["id"], point.observation))
    assert ep.success and not ep.truncated and not s.truncated  # the last call arrived
    ep = nv.Episode(r, "id")
    monkeypatch.setattr(nv, "STEP_LIMIT", 1)
    s = ep.record(reply(ep.rail[0].action["id"]))
    assert s.truncated and ep.truncated and ep.done and not ep.success


def test_compact_json_answers_are_read_as_the_authors_read_them():
    point = nv.rail(route((40, "Cafe is on your left")))[0]
    assert nv.score('{"current observation": "No landmarks nearby; ", "action": "turn_direction(northeast)"}', point, "id").reward == 1.0


def test_rescore_grades_each_attempt_against_its_own_point():
    from tasks.virl.benchmark import Virl, Walk

    r = route((350, "Cafe is on your left"), (10, "Bank is on your right"), init=340)
    bench = Virl()
    ep = bench.episode(Walk("ood", 0, r), "exact", 2)
    for point in ep.rail:
        if point.intersection:
            break
        ep.record(reply(point.action["ood"], point.observation))
    ep.record(reply("turn_direction(slightly right)", "Cafe is on your left; You observe an intersection"))  # right when wrapped
    assert [s.reward for s in ep.scores][-1] == 1.0
    others = bench.rescore(ep, "reference")
    # reference: "left" at that corner, and the claim checked against the landmark text alone: -1.5
    assert others[:-1] == [1.0] * (len(others) - 1) and others[-1] == -1.5


def test_an_eval_row_gives_back_the_route_and_its_rail():
    from rlheal.config import parse_config
    from tasks.virl.benchmark import Virl

    bench = Virl()
    cfg = parse_config({"name": "v", "task": "virl"})
    for split in ("id", "ood"):
        walk = bench.deal(split, 42, 3)
        back = bench.from_row(bench.eval_row(walk, cfg))
        assert back == walk and nv.rail(back.route) == nv.rail(walk.route)


def test_step_accuracy_counts_right_actions_over_graded_calls_with_an_interval():
    import polars as pl

    from tasks.virl.benchmark import Virl

    counts = pl.DataFrame({"n": [4], "k": [1], "attempts": [20], "count_correct": [9], "count_arrived": [1]})
    out = counts.select(**Virl().summary_metrics(pl.col("n"), pl.col("k"), pl.col("attempts"))).row(0, named=True)
    from tasks.eval import wilson_interval

    assert out["step_accuracy"] == 0.5
    assert (out["step_accuracy_ci_low"], out["step_accuracy_ci_high"]) == pytest.approx(wilson_interval(10, 20), abs=1e-9)


def test_a_route_without_an_initial_heading_gets_a_seeded_random_one(tmp_path):
    rec = routes.to_record(routes.generate(5, 0))
    rec.pop("init_heading")
    a, b = routes.from_record(dict(rec), "f"), routes.from_record(dict(rec), "f")
    assert a.init_heading == b.init_heading and 0 <= a.init_heading <= 359
    assert routes.from_record(dict(rec, init_heading=0), "f").init_heading == a.init_heading  # 0 means none, as theirs
    with pytest.raises(ConfigError, match="init_heading: True"):
        routes.from_record(dict(rec, init_heading=True), "f")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"start_geocode": 5}, "start_geocode: 5 is not a"),
        ({"start_geocode": [1, 2, 3]}, "start_geocode"),
        ("strings", "coordinates must be numbers"),
    ],
)
def test_bad_fields_are_named_not_crashed_on(change, field):
    rec = routes.to_record(routes.generate(5, 0))
    if change == "strings":
        change = {"route_results": {"geocode_list": [["a", "b"]] * len(rec["route_results"]["geocode_list"]), "landmark_list": []}}
    rec |= change
    with pytest.raises(ConfigError, match=field):
        routes.from_record(rec, "f: routes[0]")


def test_a_binary_or_miscounted_file_is_refused(tmp_path):
    (tmp_path / "b.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not a readable JSON routes file"):
        routes.load(tmp_path / "b.json")
    path = routes.write([routes.generate(5, i) for i in range(2)], tmp_path / "r.json")
    data = json.loads(path.read_text())
    data[1] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="number_of_routes is 7 but the file holds 2"):
        routes.load(path)


def test_the_whole_prompt_and_the_walking_points_match_the_authors_text():
    """The research notes' repr of the authors' formatted Q_VIRL_L, filled in by hand."""
    r = route((90, "Bank is on your right"), init=0)
    points = nv.rail(r)
    expected = (
        "\n[Task Description]\nYou are an expert in navigation. You will receive a sequence of instructions to follow. You\n"
        "are also provided with your observation and action history in text. Your goal is to first analyze the instruction and identify the next sentence to be executed. \n"
        "Then, you need to provide the action to be taken based on the current observation and instruction.\n\n"
        "[Instruction]\n1. Turn right to face east.\n2. Move forward until you reach destination where Bank is on your right.\n\n\n"
        "[Action space]\n" + nv.action_space("id") + "\n\n"
        "[Observations and actions sequence]\nO_1: No landmarks nearby; \nA_1: \n\n\n"
        '[Output]\n{\n  "current observation": latest observation from the observation sequence,\n'
        '  "current instruction": analyze the full instruction and identify the sentence to be executed,\n'
        '  "action": the action to be taken chosen from the action space,\n}\n'
    )
    assert nv.prompt(r, "id", [], points[0]) == expected
    assert nv.action_space("ood") == (
        '"forward()": indicates moving forward one step\n"turn_direction(x)": indicates adjust the ego agent direction towards x direction. '
        "x could be any following ['left', 'right', 'slightly left', 'slightly right']\n\"stop()\": indicates the navigation is finished."
    )
    walking = [p for p in nv.rail(route((40, "Cafe is on your left"), (200, "Bank is on your right"), (300, "X is on your left"))) if p.action["id"] == "forward()"]
    assert walking and all(p.observation == "No landmarks nearby; " for p in walking)


def test_a_heading_of_360_is_outside_the_range():
    rec = routes.to_record(routes.generate(5, 0))
    bad = re.sub(r'"to_next_intersection_heading": "\d+ \((\w+)\)"', r'"to_next_intersection_heading": "360 (\1)"', rec["milestone_info"], count=1)
    with pytest.raises(ConfigError, match="heading 360 is outside 0-359"):
        routes.from_record(dict(rec, milestone_info=bad), "f")


def test_each_leg_keeps_at_most_four_walking_points_about_half_of_them():
    legs = []
    for i in range(200):
        r = routes.generate(0, i)
        run, per_leg = 0, []
        for p in nv.rail(r)[1:]:
            if p.action["id"] == "forward()":
                run += 1
            else:
                per_leg.append(run)
                run = 0
        legs += per_leg
    assert max(legs) == 4 and 1.8 < sum(legs) / len(legs) < 2.2  # 4 candidates kept with probability 0.5


# ---------------------------------------------------------------------------- a Hugging Face model

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_shaped(out, texts):
    """A Qwen2-architecture model with a byte-level BPE tokenizer trained here on V-IRL texts
    and a ChatML template: the shape of the paper's Qwen preset, small and built locally."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tok.chat_template = QWEN_TEMPLATE
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    Qwen2ForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_the_virl_stages_run_on_a_hugging_face_model_with_a_bpe_tokenizer(tmp_path):
    """data -> model -> SFT -> eval on a local Qwen2-shaped model whose tokenizer is byte-level
    BPE with a ChatML template (not the tiny word-level one): SFT moves the weights and the
    episodes walk routes of both splits, retries included."""
    import polars as pl

    from rlheal.config import parse_config
    from rlheal.store import Store
    from tasks import data, eval as eval_stage, lm, model, sft
    from tasks.benchmark import get

    virl = get("virl")
    texts = []
    for i in range(30):
        for row in virl.sft_rows(virl.deal("ood" if i % 2 else "id", 0, i), parse_config({"name": "t", "task": "virl"})):
            texts += [row["prompt"][0]["content"], row["completion"][0]["content"]]
    qwen = build_qwen_shaped(tmp_path / "qwen", texts)
    cfg = parse_config({
        "name": "hf-virl", "task": "virl", "model": {"name_or_path": str(qwen)},
        "data": {"train_size": 32, "eval_size": 3},
        "sft": {"save_steps": [0, 2], "batch_size": 8, "per_device_batch_size": 8, "learning_rate": 3e-3, "lr_schedule": "constant", "warmup_steps": 0, "ce_every": 2},
        "eval": {"ce_hands": 3, "decoding": {"max_new_tokens": 16}}, "rl": {"from_steps": []}, "edit": {"enabled": False},
    })  # fmt: skip
    store = Store(tmp_path / "store")
    data_dir, model_dir = data.run(store, cfg), model.run(store, cfg)
    assert model.model_dir(model_dir) == qwen  # used in place
    run_dir = sft.run(store, cfg, model_dir, data_dir)
    ckpts = pl.read_parquet(f"{run_dir}/checkpoints.parquet")
    before, after = lm.weights_hash(qwen), lm.weights_hash(ckpts.filter(pl.col("ckpt_id") == "sft-2")["path"][0])
    assert before != after
    tok = lm.load_tokenizer(qwen)
    assert type(tok).__name__ != "LlamaTokenizerFast" and "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    for split in ("id", "ood"):
        out = eval_stage.run(store, cfg, ckpts.filter(pl.col("ckpt_id") == "sft-2").to_dicts()[0], split, data_dir)
        attempts = pl.read_parquet(f"{out}/eval_attempts.parquet")
        summary = pl.read_parquet(f"{out}/eval_summary.parquet")
        assert summary["n"][0] == 3 and summary["step_accuracy"][0] is not None and set(attempts["outcome"]) <= set(virl.outcomes)
        # an untrained model fails a point twice (verify_iter 2), so each route ends after >= 2 calls
        assert attempts.group_by("hand_index").len()["len"].min() >= 2


def test_ppo_scores_the_text_from_the_action_key_on_as_the_action():
    """The authors' V-IRL PPO splits the sequence score at `"action":` (their GeneralPoints
    one at `"formula":`): the observation and instruction fields are the thought."""
    from tasks import model
    from tasks.benchmark import get
    from tasks.rl import ppo

    virl = get("virl")
    tok = model.build_tokenizer(virl)
    text = reply("turn_direction(left)", 'I read "action": twice; You observe an intersection')  # the LAST key counts
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    s = ppo.split_index(tok, ids, virl.action_key)
    tail = tok.decode(ids[s:])
    assert tail.count('"action":') == 1 and '"action": "turn_direction(left)"' in tail and tok.decode(ids[:s]).count('"action":') == 1
    assert s != ppo.split_index(tok, ids)  # GeneralPoints' key is absent: the n - 5 fallback


def test_first_action_reads_the_start_turn_in_either_format_on_the_first_try_only():
    import polars as pl

    from tasks.benchmark import get

    virl = get("virl")
    ood = pl.DataFrame({"split": ["ood", "ood"], "index": [0, 1], "answer": [reply("turn_direction(left)"), reply("turn_direction(right)")]})
    attempts = pl.DataFrame({
        "ckpt_id": ["s"] * 5, "split": ["ood"] * 5, "hand_index": [0, 1, 1, 0, 2], "attempt": [1, 1, 2, 2, 1],
        "response": ["observation: x\ninstruction: y\naction: turn_direction(left)\n", reply("turn_direction(northeast)"), reply("turn_direction(right)"), "junk", "no action here"],
    })  # fmt: skip
    ood = pl.concat([ood, pl.DataFrame({"split": ["ood"], "index": [2], "answer": [reply("forward()")]})])
    out = virl.report_columns({"eval_set_ood": ood, "eval_attempts": attempts})
    # route 0: right in the plain format; route 1: wrong on its first try (its right retry does
    # not count); route 2: no action written, counted as wrong
    assert out.to_dicts() == [{"ckpt_id": "s", "split": "ood", "first_action": 1 / 3}]
    assert virl.report_columns({"eval_set_ood": ood}) is None
