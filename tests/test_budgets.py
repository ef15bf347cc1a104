"""bench.budgets (issue 27): the stage policy, the job order, the claims read from paired seeds, the
reports rendered from the JSON, and one smoke run on the tiny BERT (resumable with --merge)."""
from __future__ import annotations

import json

import pytest

from bench import budgets as B


def test_stage_policy_is_five_percent_a_stage_with_ten_steps_at_least():
    assert B.stages_for(20, 0.5) == 2 and B.stages_for(100, 0.5) == 10 and B.stages_for(1000, 0.5) == 10
    assert B.stages_for(100, 0.3) == 5 and B.stages_for(400, 0.3) == 5  # 6 does not divide: the next divisor
    assert B.stages_for(7, 0.5) == 1
    for T in (20, 100, 400, 1000):
        for target in (0.3, 0.5):
            k = B.stages_for(T, target)
            assert T % k == 0 and T // k >= 10


def _row(method, T, seed, test, target=0.5, lr=5e-4, **kw):
    return {"method": method, "base": method.split("[")[0], "family": B.family(method), "target": target, "budget": T,
            "seed": seed, "lr": lr, "test": test, "val": test, "seconds": T * 1.0, "stages": 1, "steps_run": T,
            "removed_fraction": target, **kw}


def _doc(rows):
    run = {"id": "1", "command": "python -m bench.budgets --mode quick", "date": "2026-12-07 00:00 UTC",
           "seconds": 60.0, "load_before": [1.0, 1.0, 1.0], "load_after": [2.0, 2.0, 2.0]}
    return {"mode": "quick", "model": "minilm-rt", "config": {**B.MODES["quick"].__dict__}, "dense": {"val": 0.83, "test": 0.828},
            "test_examples": 1000, "val_examples": 500, "meta": {"machine": {"cpu": "x", "torch_threads": 1}, "runs": [run]},
            "lr": {"lora": {"method": "adaptive", "budget": 100, "target": 0.5, "seed": 0, "val": {"0.0005": 0.8},
                            "chosen": 5e-4},
                   "apt": {"method": "apt", "budget": 100, "target": 0.5, "seed": 0, "val": {"0.0005": 0.8},
                           "chosen": 5e-4}},
            "rows": rows}


def test_claims_are_read_from_paired_seeds_and_the_spread():
    rows = []
    for s, (a, b) in enumerate([(0.80, 0.78), (0.81, 0.785), (0.79, 0.775)]):  # apt ahead on every seed
        rows += [_row("apt", 1000, s, a), _row("adaptive", 1000, s, b)]
    for s, (a, b) in enumerate([(0.80, 0.79), (0.78, 0.80), (0.79, 0.79)]):  # mixed: inside the spread
        rows += [_row("lora-after", 100, s, a), _row("lora-before", 100, s, b)]
    rows.append(_row("apt", 1000, 3, 0.1, lr=1.5e-3))  # an lr trial at another rate: not in the grid
    doc = _doc(rows)
    cl = {(c["better"], c["budget"]): c for c in B.claims(doc)}
    assert cl[("apt", 1000)]["beyond_spread"] and cl[("apt", 1000)]["diff"] == pytest.approx(0.02, abs=1e-9)
    assert cl[("apt", 1000)]["seeds"] == [0, 1, 2]
    assert not cl[("lora-after", 100)]["beyond_spread"]
    goals = "\n".join(B.goals(doc))
    assert "APT ≥ adaptive at 50 % at the largest budget" in goals and ": met." in goals
    assert "no budget run separates them" in goals
    md = B.render(doc)
    assert "| apt ≥ adaptive | 50% | 1,000 | 3 | +0.0200" in md and "inside the seed spread" in md
    svg = B.svg_chart(doc)
    assert svg.startswith("<svg") and "apt doc" in svg and svg.count("<polyline") == 8  # 4 methods x 2 panels


def test_jobs_run_small_budgets_first_and_only_where_asked():
    mode = B.MODES["full"]
    todo = B.jobs(mode, ("apt", "adaptive"), (20, 1000), (0.5, 0.3), (0, 1), ablations=True, adapruner=True)
    budgets = [j[2] for j in todo]
    assert budgets == sorted(budgets) and set(budgets) == {20, 400, 1000}  # adapruner brings 400
    assert {j[0] for j in todo if j[2] == 400} == {"adapruner"}
    abl = [j for j in todo if j[0] in B.ABLATIONS]
    assert abl and {j[2] for j in abl} == {20, 1000} and {j[1] for j in abl} == {0.5}  # the first target only
    assert not [j for j in B.jobs(mode, ("apt",), (20,), (0.5,), (0,), False, False) if j[0] != "apt"]


def test_smoke_run_writes_the_reports_and_resumes(tmp_path):
    argv = ["--mode", "smoke", "--out", str(tmp_path), "--methods", "adaptive,apt", "--budgets", "4",
            "--seeds", "0,1", "--no-ablations", "--no-adapruner"]
    assert B.main(argv) == 0
    doc = json.loads((tmp_path / "budgets.json").read_text())
    assert doc["provenance"]["command"] and set(doc["lr"]) == {"lora", "apt"}
    grid = B.grid_rows(doc)
    assert {(r["method"], r["seed"]) for r in grid} == {(m, s) for m in ("adaptive", "apt") for s in (0, 1)}
    assert all(r["steps_run"] == 4 and r["test"] is not None for r in grid)
    apt = next(r for r in grid if r["method"] == "apt")
    assert apt["apt"]["schedule"]["steps"] == 4 and apt["stages"] == 1
    md = (tmp_path / "BUDGETS.md").read_text()
    assert "| adaptive |" in md and "apt ≥ adaptive" in md and (tmp_path / "budgets.svg").exists()
    n = len(doc["rows"])
    assert B.main(argv + ["--merge"]) == 0  # everything is there already: nothing reruns
    again = json.loads((tmp_path / "budgets.json").read_text())
    assert len(again["rows"]) == n and len(again["meta"]["runs"]) == 2
    # a rate given on the command line adds rows but keeps the record of the rate chosen on val (CI-free
    # regression: a --lr run once replaced it and its report crashed on the missing fields)
    chosen = again["lr"]["apt"]
    assert B.main(argv + ["--merge", "--budgets", "6", "--methods", "apt", "--seeds", "0",
                          "--lr", f"apt={chosen['chosen']}"]) == 0
    third = json.loads((tmp_path / "budgets.json").read_text())
    assert third["lr"]["apt"] == chosen and len(third["rows"]) == n + 1
    assert "apt" in (tmp_path / "BUDGETS.md").read_text()
    # --redo runs a held run again: its row is replaced (same count), names the new run, and that run
    # its commit
    first = {r["run"] for r in third["rows"] if r["method"] == "apt" and r["budget"] == 6}
    assert B.main(argv + ["--merge", "--redo", "--budgets", "6", "--methods", "apt", "--seeds", "0",
                          "--lr", f"apt={chosen['chosen']}"]) == 0
    fourth = json.loads((tmp_path / "budgets.json").read_text())
    redone = [r for r in fourth["rows"] if r["method"] == "apt" and r["budget"] == 6]
    assert len(fourth["rows"]) == n + 1 and len(redone) == 1 and {redone[0]["run"]} != first
    run = next(r for r in fourth["meta"]["runs"] if r["id"] == redone[0]["run"])
    assert run["commit"] and "--redo" in run["command"]


def test_the_readme_names_many_merged_runs_in_one_line():
    """The README's summary of a JSON that many --merge runs wrote: one line (how many, when, which
    commits, the load's range), BUDGETS.md keeping each run's command."""
    from bench.readme import budgets_summary_block, runs_line
    doc = _doc([_row("apt", 20, s, 0.7) for s in range(3)] + [_row("adaptive", 20, s, 0.75) for s in range(3)])
    run = doc["meta"]["runs"][0]
    doc["meta"]["runs"] = [{**run, "id": str(i), "date": f"2026-12-07 0{i}:00 UTC", "commit": f"c{i}" * 6,
                            "load_before": [float(i), 0, 0], "load_after": [i + 0.5, 0, 0]} for i in range(4)]
    doc["provenance"] = {"commit": "f" * 40, "dirty": False, "merged": [{"commit": "e" * 40, "dirty": True}]}
    line = runs_line(doc)
    assert line.startswith("From 4 runs of `python -m bench.budgets` (`--merge`) between 2026-12-07 00:00 UTC "
                           "and 2026-12-07 03:00 UTC")
    assert "load average 0.0-3.5" in line and "`c0c0c0c0c0c0`" in line and "`eeeeeeeeeeee (dirty)`" in line
    assert "`ffffffffffff`" in line and "BUDGETS.md" in line
    block = budgets_summary_block(doc)
    assert block.startswith(line) and "Runs merged into the same JSON" not in block
