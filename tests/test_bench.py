"""The benchmark suite: `python -m bench --smoke` runs every section on tiny random models and
writes results.json (in the documented schema), REPORT.md and plots.html."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE_METHODS = {"dense", "uniform", "adaptive", "torch-pruning", "torch-pruning-magnitude", "one-shot"}


def run_bench(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` offline from the project root; asserts it succeeded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = run_bench("bench", "--smoke", "--out", str(out), "--only", "recon,quality,speed,analysis,ui,methods")
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_results_schema(smoke):
    from explorer.methods import METHODS
    _, res, _ = smoke
    assert {"quality", "speed", "analysis_cost", "ui", "methods", "meta"} <= set(res)
    allowed = BASE_METHODS | set(METHODS)
    assert res["quality"], "no quality rows"
    for r in res["quality"]:
        assert {"model", "budget", "method", "metric", "mean", "std", "seeds"} <= set(r)
        assert r["method"] in allowed
        assert r["metric"] in ("accuracy", "perplexity")
        assert isinstance(r["seeds"], list) and r["std"] >= 0
    for model in {r["model"] for r in res["quality"]}:
        methods = {r["method"] for r in res["quality"] if r["model"] == model}
        assert {"dense", "uniform", "adaptive", "torch-pruning", "one-shot"} <= methods
    recon_methods = {"uniform", "adaptive", "flap", "flap+refit", "torch-pruning"}
    assert {r["model"] for r in res["recon"]} == {"tiny-bert", "tiny-llama"}
    for model in res["recon"]:
        assert {r["method"] for r in model["rows"]} == recon_methods
        for r in model["rows"]:
            assert {"cut", "recon", "widths", "block_params"} <= set(r)
            # one recovery row per method (FLAP's is trained from its refit plan), at the recovery budget
            assert ("recovered" in r) == (r["method"] != "flap" and r["budget"] in model["case"]["recovery_budgets"])
    for r in res["speed"]:
        assert {"model", "budget", "method", "speedup", "limit_speedup"} <= set(r)
        assert r["widths_from"].startswith("recon")  # the speed rows time the recon section's plans
        assert r["method"] in allowed | recon_methods and r["speedup"] > 0 and r["limit_speedup"] > 0
        assert r["own_reference"] == (len(set(r["heads"])) == 1 and len(set(r["neurons"])) == 1)
    for r in res["analysis_cost"]:
        assert {"model", "samples", "ratio"} <= set(r) and r["ratio"] > 0
    assert res["ui"] and all({"action", "server_ms"} <= set(r) for r in res["ui"])
    assert any("pruning stage" in r["action"] for r in res["ui"])
    names = {r["method"] for r in res["methods"]}
    assert names == set(METHODS), f"methods table misses {set(METHODS) - names}"
    for r in res["methods"]:
        if not METHODS[r["method"]].structural and not r.get("error"):
            assert r["speed_note"] == "no speed-up (masks)"
    meta = res["meta"]
    assert meta["mode"] == "smoke" and meta["machine"]["cpu"] and meta["machine"]["torch"]
    assert meta["commands"] and meta["commands"][-1].startswith("python -m bench")
    assert len(res["provenance"]["commit"]) == 40 and isinstance(res["provenance"]["dirty"], bool)


def test_equal_parameters(smoke):
    """Pruned models of one budget remove the same share of block parameters (to a neuron or two)."""
    _, res, _ = smoke
    for (model, budget) in {(r["model"], r["budget"]) for r in res["quality"] if r["method"] != "dense"}:
        fr = [r["removed_fraction"] for r in res["quality"] if (r["model"], r["budget"]) == (model, budget)
              and r["method"] != "dense"]
        assert max(fr) - min(fr) < 0.01, (model, budget, fr)
        assert abs(fr[0] - budget) < 0.01


def test_report_written(smoke):
    out, res, stdout = smoke
    report = (out / "REPORT.md").read_text()
    for part in ("## Machine and commands", "## Headline: methods at equal parameters", "### tiny-llama",
                 "Recovery (reconstruct+kd", "## K-stage runs", "## Targets", "adaptive ≥ flap+refit (reconstructed)",
                 "## Speed", "## Cost of analysis", "## UI server time", "## All methods", "python -m bench --smoke"):
        assert part in report, part
    assert res["meta"]["machine"]["cpu"] in report
    assert f"- code: Commit `{res['provenance']['commit'][:12]}`" in report
    assert (out / "plots.html").stat().st_size > 1000
    assert "== recon" in stdout and "== quality" in stdout  # figures are printed as it goes


def test_recon_targets_paired_and_goals():
    """Adaptive against a baseline is judged on the paired difference per seed (a tie when inside the
    spread); the issue's goals read the recon / recovered columns relative to dense."""
    from bench.report import recon_targets

    def row(method, seed, ppl, rec=None):
        r = {"method": method, "budget": 0.2, "seed": seed, "recon": {"perplexity": ppl}, "cut": {"perplexity": 99.0},
             "recon_seconds": 30.0, "analysis_seconds": 20.0, "block_params": 80}
        if rec is not None:
            r["recovered"], r["recovery"] = {"perplexity": rec}, {"seconds": 1.0, "steps": 4}
        return r
    rows = [row("adaptive", 0, 12.0, 11.0), row("adaptive", 1, 12.2, 11.1), row("adaptive", 2, 11.8, 10.9),
            row("uniform", 0, 13.0), row("uniform", 1, 13.1), row("uniform", 2, 12.9),  # always worse: a result
            row("torch-pruning", 0, 11.0), row("torch-pruning", 1, 13.5), row("torch-pruning", 2, 12.0)]  # noisy
    res = {"recon": [{"model": "smollm2-135m", "task": "causal-lm", "dense": {"perplexity": 10.0}, "rows": rows,
                      "block_params_dense": 100, "case": {}}], "meta": {}}
    got = {t["target"]: t for t in recon_targets(res)}
    assert got["adaptive ≥ uniform (reconstructed)"]["ok"] and not got["adaptive ≥ uniform (reconstructed)"]["tie"]
    tp = got["adaptive ≥ torch-pruning (reconstructed)"]
    assert tp["tie"] and "inside the spread" in tp["detail"]
    assert got["adaptive ≤ 1.30x dense (reconstruction)"]["ok"]  # 12.0 / 10 = 1.2
    assert got["adaptive ≤ 1.15x dense (reconstruction + recovery)"]["ok"]  # mean 11.0 / 10
    res["recon"][0]["dense"]["perplexity"] = 9.0
    got = {t["target"]: t for t in recon_targets(res)}
    assert not got["adaptive ≤ 1.30x dense (reconstruction)"]["ok"]  # 12.0 / 9 = 1.33
    assert got["a reconstructed stage (analysis + refit) ≤ 60 s"]["ok"]  # 20 + 30 s


def test_targets_pass_fail():
    from bench.report import targets
    res = {"quality": [
        {"model": "m", "budget": 0.2, "method": "adaptive", "metric": "accuracy", "mean": 0.8, "std": 0.0, "seeds": [0]},
        {"model": "m", "budget": 0.2, "method": "uniform", "metric": "accuracy", "mean": 0.7, "std": 0.0, "seeds": [0]},
        {"model": "m", "budget": 0.2, "method": "torch-pruning", "metric": "accuracy", "mean": 0.9, "std": 0.0,
         "seeds": [0]},
        {"model": "p", "budget": 0.2, "method": "adaptive", "metric": "perplexity", "mean": 20.0, "std": 0.0, "seeds": [0]},
        {"model": "p", "budget": 0.2, "method": "uniform", "metric": "perplexity", "mean": 25.0, "std": 0.0, "seeds": [0]}],
        "speed": [{"model": "m", "budget": 0.2, "method": "adaptive", "speedup": 1.2, "limit_speedup": 1.5,
                   "fraction_of_limit": 0.8}],
        "analysis_cost": [{"model": "m", "samples": 32, "ratio": 1.4, "analysis_s": 1.4, "forward_backward_s": 1.0}]}
    got = {(t["target"], t["model"]): t["ok"] for t in targets(res)}
    assert got[("adaptive ≥ uniform", "m")] is True
    assert got[("adaptive ≥ Torch-Pruning", "m")] is False
    assert got[("adaptive ≥ uniform", "p")] is True  # lower perplexity is better
    assert got[("speed-up ≥ 85 % of the same-width limit", "m")] is False
    assert got[("analysis ≤ 1.5x forward+backward", "m")] is True


def _speed_row(method, heads, neurons, fraction):
    return {"model": "m", "budget": 0.4, "method": method, "speedup": 1.5 * fraction, "limit_speedup": 1.5,
            "fraction_of_limit": fraction, "heads": heads, "neurons": neurons}


def test_speed_target_does_not_count_plans_that_are_their_own_reference():
    """A plan with the same widths in every layer (Torch-Pruning's) is timed against itself: 100 % by
    construction. It is set aside, so a target made of such rows alone cannot pass."""
    from bench.report import _targets_section, targets
    name = "speed-up ≥ 85 % of the same-width limit"
    own = _speed_row("torch-pruning", [2, 2, 2], [40, 40, 40], 1.0)
    got = targets({"speed": [own]})
    assert [(t["ok"], t["by_construction"]) for t in got] == [(None, 1)]
    assert "its own reference" in got[0]["detail"]
    summary = "\n".join(_targets_section({"speed": [own]}))
    assert f"| {name} | 0 / 0; 1 tied by construction, not counted | – (nothing to judge) |" in summary
    # a non-uniform plan below 85 % fails the target; the own-reference row does not dilute it
    slow = _speed_row("adaptive", [1, 3, 2], [30, 50, 40], 0.8)
    got = targets({"speed": [own, slow]})
    assert [t["ok"] for t in got] == [None, False]
    assert f"| {name} | 0 / 1; 1 tied by construction, not counted | **FAIL** |" in "\n".join(
        _targets_section({"speed": [own, slow]}))
    # the flag bench.speed records wins over the widths (rows of earlier runs have only the widths)
    assert targets({"speed": [{**slow, "own_reference": True}]})[0]["ok"] is None
    assert targets({"speed": [{**own, "own_reference": False}]})[0]["ok"] is True


def _recon_res(rows):
    return {"recon": [{"model": "minilm-rt", "task": "classification", "dense": {"accuracy": 0.83}, "rows": rows,
                       "block_params_dense": 100, "case": {}}], "meta": {}}


def _recon_row(method, seed, acc, amplitude=None):
    r = {"method": method, "budget": 0.6, "seed": seed, "recon": {"accuracy": acc}, "cut": {"accuracy": 0.5},
         "recon_seconds": 1.0, "analysis_seconds": 1.0, "block_params": 40}
    if amplitude is not None:
        r["amplitude"] = amplitude
    return r


def test_recon_seeds_merges_the_seeds_of_runs_made_side_by_side():
    """bench.recon_seeds: per model the rows of every run, the newest run's meta first; runs of
    other settings or other dense figures are not one measurement and are refused."""
    from bench.recon import model_tables
    from bench.recon_seeds import merge_runs

    def doc(date, model, seeds, command, samples=8, dense=0.83):
        rows = [_recon_row(m, s, 0.80 + 0.01 * s) for m in ("uniform", "flap") for s in seeds]
        return {"meta": {"date": date, "command": command},
                "results": [{"model": model, "task": "classification", "dense": {"accuracy": dense}, "rows": rows,
                             "block_params_dense": 100,
                             "case": {"samples": samples, "seeds": seeds, "budgets": [0.6], "test_n": 0}}]}
    a = doc("2026-12-08 00:37 UTC", "m", [0, 1], "seeds 0,1")
    b = doc("2026-12-08 01:40 UTC", "m", [2], "seeds 2")
    other = doc("2026-12-08 00:10 UTC", "other", [0], "other model")
    meta, results, kept = merge_runs([b, other, a])
    m = next(r for r in results if r["model"] == "m")
    assert m["case"]["seeds"] == [0, 1, 2] and len(m["rows"]) == 6 and len(kept) == 3
    assert {r["model"] for r in results} == {"m", "other"}
    assert [meta["command"], meta["earlier"]["command"], meta["earlier"]["earlier"]["command"]] == \
        ["seeds 2", "seeds 0,1", "other model"]
    assert "| 60% | uniform | 3 | 60.0% | 0.5000 ± 0.0000 | 0.8100 ± 0.0100 |" in "\n".join(model_tables([m]))
    with pytest.raises(ValueError, match="samples"):
        merge_runs([a, doc("2026-12-08 01:40 UTC", "m", [2], "16 samples", samples=16)])
    with pytest.raises(ValueError, match="dense"):
        merge_runs([a, doc("2026-12-08 01:40 UTC", "m", [2], "another model", dense=0.5)])


def test_adaptive_vs_uniform_sets_aside_the_seeds_where_val_chose_uniform():
    """Where val chose A = 0, adaptive is the uniform plan itself (the same accuracy): "val chose uniform",
    tied by construction, never a pass."""
    from bench.report import _targets_section, recon_targets
    name = "adaptive ≥ uniform (reconstructed)"
    uni = [_recon_row("uniform", s, a) for s, a in ((0, 0.80), (1, 0.81), (2, 0.79))]
    every = [_recon_row("adaptive", s, a, 0.0) for s, a in ((0, 0.80), (1, 0.81), (2, 0.79))]
    got = [t for t in recon_targets(_recon_res(uni + every)) if t["target"] == name]
    assert [(t["ok"], t["by_construction"]) for t in got] == [(None, 3)]
    assert "val chose uniform (A = 0) on seeds 0, 1, 2" in got[0]["detail"]
    summary = "\n".join(_targets_section(_recon_res(uni + every)))
    assert f"| {name} | 0 / 0; 3 tied by construction, not counted | – (nothing to judge) |" in summary
    # seeds 0 and 2 chose uniform; seed 1 chose A = 0.1 and lost: the target fails on that seed alone
    mixed = [every[0], _recon_row("adaptive", 1, 0.80, 0.1), every[2]]
    t = next(t for t in recon_targets(_recon_res(uni + mixed)) if t["target"] == name)
    assert t["ok"] is False and t["by_construction"] == 2 and "(1 seed)" in t["detail"]
    assert t["detail"].startswith("0.8000 vs 0.8100; paired -0.0100")
    # the other baselines are compared on every seed, A = 0 or not
    tp = [_recon_row("torch-pruning", s, 0.7) for s in (0, 1, 2)]
    t = next(t for t in recon_targets(_recon_res(uni + mixed + tp)) if t["target"] == "adaptive ≥ torch-pruning "
             "(reconstructed)")
    assert t["ok"] is True and t["by_construction"] == 0 and "over 3 seeds" in t["detail"]


def test_k_stage_adaptive_vs_uniform_where_val_chose_uniform():
    from bench.report import targets

    def q(method, mean, **kw):
        return {"model": "m", "budget": 0.2, "method": method, "metric": "accuracy", "mean": mean, "std": 0.0,
                "seeds": [0, 1], **kw}
    got = {t["target"]: t for t in targets({"quality": [q("adaptive", 0.8, amplitude=0.0), q("uniform", 0.8),
                                                        q("torch-pruning", 0.9)]})}
    assert got["adaptive ≥ uniform"]["ok"] is None and got["adaptive ≥ uniform"]["by_construction"] == 2
    assert got["adaptive ≥ Torch-Pruning"]["ok"] is False
    got = {t["target"]: t for t in targets({"quality": [q("adaptive", 0.7, amplitude=0.05), q("uniform", 0.8)]})}
    assert got["adaptive ≥ uniform"]["ok"] is False


def test_write_json_records_the_commit(tmp_path):
    """Every bench JSON goes through bench.common.write_json, which records the commit it ran on."""
    from bench import common
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    doc = {"meta": {"x": 1}}
    prov = common.write_json(tmp_path / "x.json", doc)
    saved = json.loads((tmp_path / "x.json").read_text())
    assert saved["meta"] == {"x": 1} and saved["provenance"] == prov == doc["provenance"]
    assert prov["commit"] == head and isinstance(prov["dirty"], bool)
    assert prov["ran_at"].endswith("+00:00") and prov["ran_at"][:4].isdigit()
    assert prov["machine_load"] is None or len(prov["machine_load"]) == 3
    assert "merged" not in prov
    assert f"Commit `{head[:12]}`" in common.provenance_text(prov)
    meta = {"date": "d", "seconds": 60, "machine": {"cpu": "c"}, "load_before": [1], "load_after": [2]}
    assert head[:12] in common.generated_line("python -m bench.x", meta, prov)
    assert "Commit" not in common.generated_line("python -m bench.x", meta)  # an old JSON: as before
    # rows kept from earlier documents keep their commits: an old file without provenance is "unrecorded"
    older = {"provenance": {"commit": "a" * 40, "dirty": False, "ran_at": "2020-01-01T00:00:00+00:00"}}
    prov = common.write_json(tmp_path / "x.json", {}, earlier=[{"rows": []}, older, {"provenance": prov}])
    assert [r["commit"] for r in prov["merged"]] == [None, "a" * 40]
    assert "an unrecorded commit, `aaaaaaaaaaaa`" in common.provenance_text(prov)
    again = common.write_json(tmp_path / "y.json", {}, earlier=[json.loads((tmp_path / "x.json").read_text())])
    assert again["merged"] == prov["merged"]  # a merge of a merge keeps every run


def test_every_bench_writer_goes_through_write_json():
    """No bench module writes a JSON document of its own (the children's result file of bigmodel is a
    pipe between processes, not a bench document)."""
    for path in sorted((ROOT / "bench").glob("*.py")):
        if path.name == "common.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if ("write_text(json.dumps" in line or "json.dump(" in line) and "a.result" not in line:
                pytest.fail(f"{path.name}:{n} writes JSON without bench.common.write_json: {line.strip()}")


def test_recon_bench_smoke(tmp_path):
    """`python -m bench.recon --mode smoke`: every method, both phases, seeds, paired differences."""
    run_bench("bench.recon", "--mode", "smoke", "--out", str(tmp_path))
    res = json.loads((tmp_path / "recon.json").read_text())
    assert [r["model"] for r in res["results"]] == ["tiny-bert", "tiny-llama"]
    bert = res["results"][0]
    assert {r["method"] for r in bert["rows"]} == {"uniform", "adaptive", "flap", "flap+refit", "torch-pruning"}
    assert {r["seed"] for r in bert["rows"]} == {0, 1}
    for r in bert["rows"]:
        assert 0 <= r["recon"]["accuracy"] <= 1 and r["calibration_error_ratio"] <= 1.0 + 1e-9
        assert r["method"] == "flap+refit" or "cut" in r
    adaptive = [r for r in bert["rows"] if r["method"] == "adaptive"]
    assert all(r["chosen_on"] == "val" and r["val"] for r in adaptive)
    llama = res["results"][1]
    assert all("perplexity_imdb" in r["recon"] for r in llama["rows"])
    tp = [r for r in res["results"][1]["rows"] if r["method"] == "torch-pruning"]
    assert tp and all(r["units"] == "FFN channels only (GQA)" and "cut" in r and "recon" in r for r in tp)
    md = (tmp_path / "RECON.md").read_text()
    assert "## tiny-bert" in md and "| 30% | flap+refit | 2 |" in md and "vs uniform" in md
    commit = res["provenance"]["commit"]
    assert len(commit) == 40 and f"Commit `{commit[:12]}`" in md
    # an incremental run adds a seed's rows for one method and keeps the rest
    run_bench("bench.recon", "--mode", "smoke", "--models", "tiny-bert", "--methods", "torch-pruning",
              "--seeds", "5", "--merge", "--out", str(tmp_path))
    merged = json.loads((tmp_path / "recon.json").read_text())["results"]
    rows = next(r for r in merged if r["model"] == "tiny-bert")["rows"]
    assert len(rows) == len(bert["rows"]) + 1 and {r["seed"] for r in rows} == {0, 1, 5}
    assert [r["model"] for r in merged] == ["tiny-llama", "tiny-bert"]
    prov = json.loads((tmp_path / "recon.json").read_text())["provenance"]
    assert prov["commit"] == commit and "merged" not in prov  # both runs on the same commit and tree


def test_recipe_bench_smoke(tmp_path):
    """`python -m bench.recipe --mode smoke`: a grid on val, the recipe on test with every phase."""
    run_bench("bench.recipe", "--mode", "smoke", "--out", str(tmp_path))
    res = json.loads((tmp_path / "recipe.json").read_text())
    assert len(res["grid"]) == 2 and set(res["recipe"]) == {"steps", "lr", "kd_hidden_weight"}
    for r in res["rows"]:
        assert {"cut", "reconstructed", "trained", "val"} <= set(r)
    md = (tmp_path / "RECIPE.md").read_text()
    assert "after distillation" in md
    assert res["provenance"]["commit"] and all(r["meta"]["commit"] == res["provenance"]["commit"]
                                               for r in res["results"])
    assert md.count(f"Commit `{res['provenance']['commit'][:12]}`") == len(res["results"])


def test_decode_bench_smoke(tmp_path):
    """`python -m bench.decode --mode smoke`: interleaved decode / latency figures and the ONNX check."""
    run_bench("bench.decode", "--mode", "smoke", "--out", str(tmp_path))
    res = json.loads((tmp_path / "decode.json").read_text())["results"]
    lm, enc = res
    assert [r["name"] for r in lm["rows"]] == ["dense", "uniform 30%"]
    for r in lm["rows"]:
        assert r["decode_tokens_per_s"] > 0 and r["decode_tokens_per_s_b8"] > 0 and r["prefill_ms"] > 0
        assert len(r["spread"]["prefill_ms"]) == 2 and r["onnx"]["ok"]
    assert lm["rows"][1]["params"] < lm["rows"][0]["params"]
    assert all(r["latency_b32x128_ms"] > 0 and r["onnx"]["max_abs_diff"] < 1e-4 for r in enc["rows"])
    assert "decode tok/s b1" in (tmp_path / "DECODE.md").read_text()


# --- every target can fail --------------------------------------------------------------------------

def _failing_results() -> dict:
    """One result per target of bench.report that meets its failure condition."""
    def q(method, mean, **kw):
        return {"model": "m", "budget": 0.2, "method": method, "metric": "accuracy", "mean": mean, "std": 0.0,
                "seeds": [0, 1], **kw}

    def recon(method, seed, value, budget, metric, rec=None, amplitude=None, seconds=1.0):
        r = {"method": method, "budget": budget, "seed": seed, "recon": {metric: value}, "cut": {metric: value},
             "recon_seconds": seconds, "analysis_seconds": seconds, "block_params": 40}
        if rec is not None:
            r["recovered"], r["recovery"] = {metric: rec}, {"seconds": 1.0, "steps": 4}
        if amplitude is not None:
            r["amplitude"] = amplitude
        return r
    acc_rows = [recon("adaptive", s, 0.70, 0.4, "accuracy", amplitude=0.05, seconds=10.0) for s in (0, 1)]
    acc_rows += [recon(m, s, 0.80 + 0.01 * s, 0.4, "accuracy") for m in ("uniform", "torch-pruning", "flap",
                                                                         "flap+refit") for s in (0, 1)]
    ppl_rows = [recon("adaptive", s, 14.0, 0.2, "perplexity", rec=12.0, seconds=40.0) for s in (0, 1)]
    return {
        "quality": [q("adaptive", 0.70, amplitude=0.05), q("uniform", 0.80), q("torch-pruning", 0.80),
                    q("torch-pruning-magnitude", 0.80)],
        "speed": [_speed_row("adaptive", [1, 3, 2], [30, 50, 40], 0.84)],
        "analysis_cost": [{"model": "m", "samples": 32, "ratio": 1.6, "analysis_s": 1.6, "forward_backward_s": 1.0}],
        "recon": [{"model": "minilm-rt", "task": "classification", "dense": {"accuracy": 0.83}, "rows": acc_rows,
                   "block_params_dense": 100, "case": {}},
                  {"model": "smollm2-135m", "task": "causal-lm", "dense": {"perplexity": 10.0}, "rows": ppl_rows,
                   "block_params_dense": 100, "case": {}}],
        "meta": {}}


def test_every_target_states_what_fails_it_and_fails_on_such_a_result():
    """Each target of REPORT.md, given a result that meets the condition it states under "fails when",
    is judged a failure (ok False, and **FAIL** in the summary): none of them passes by construction."""
    from bench.report import _targets_section, targets
    got = targets(_failing_results())
    names = {t["target"] for t in got}
    assert names == {
        "adaptive ≥ uniform", "adaptive ≥ Torch-Pruning", "adaptive ≥ Torch-Pruning (magnitude)",
        "speed-up ≥ 85 % of the same-width limit", "analysis ≤ 1.5x forward+backward",
        "adaptive ≥ uniform (reconstructed)", "adaptive ≥ torch-pruning (reconstructed)",
        "adaptive ≥ flap (reconstructed)", "adaptive ≥ flap+refit (reconstructed)",
        "adaptive ≥ 0.99x dense (best of recon / recovered)", "a reconstructed stage (analysis + refit) ≤ 10 s",
        "adaptive ≤ 1.30x dense (reconstruction)", "adaptive ≤ 1.15x dense (reconstruction + recovery)",
        "a reconstructed stage (analysis + refit) ≤ 60 s"}
    for t in got:
        assert t["ok"] is False, t
        assert t["fails_when"], t["target"]
    section = "\n".join(_targets_section(_failing_results(), fails_when=True))
    summary = section.split("<details>")[0].splitlines()
    summary = summary[summary.index("| target | rows passing | verdict | fails when |") + 2:]
    summary = [line for line in summary if line.startswith("| ")]
    assert len(summary) == len(names) and all("| **FAIL** |" in line for line in summary), summary
    assert "| target | rows passing | verdict |\n" in "\n".join(_targets_section(_failing_results()))  # README


def test_a_methods_claim_fails_only_beyond_the_seed_spread():
    """bench.methods_goals: a claim "better ≥ worse" fails when better is worse on every seed by more than
    the spread; a difference inside the spread is no result either way; the report states the rule."""
    from bench.methods_goals import FAILS_WHEN, aggregate, paired, render

    def row(method, seed, test):
        return {"model": "minilm-rt", "method": method, "budget": 0.5, "seed": seed, "test": test, "stages": 2,
                "recovery_steps_per_stage": 10, "recovery": "lora", "amplitude": 0.05, "structural": True,
                "removed_fraction": 0.5, "recovery_steps_run": 20, "seconds": 1.0}
    worse = aggregate([row("apt", s, 0.70 + 0.001 * s) for s in range(3)]
                      + [row("adaptive", s, 0.80 + 0.001 * s) for s in range(3)])
    assert paired(worse, "apt", "adaptive", 0.5)["reading"] == "fails"
    noisy = aggregate([row("apt", s, a) for s, a in enumerate((0.70, 0.90, 0.78))]
                      + [row("adaptive", s, 0.80) for s in range(3)])
    assert paired(noisy, "apt", "adaptive", 0.5)["reading"] == "no difference shown"
    one_seed = aggregate([row("apt", 0, 0.5), row("adaptive", 0, 0.8)])
    assert paired(one_seed, "apt", "adaptive", 0.5)["reading"] == "no difference shown"  # no spread to judge by
    better = aggregate([row("apt", s, 0.90 + 0.001 * s) for s in range(3)]
                       + [row("adaptive", s, 0.80) for s in range(3)])
    assert paired(better, "apt", "adaptive", 0.5)["reading"] == "holds"
    doc = {"meta": {"dense": 0.83, "model": "minilm-rt", "test_examples": 1000, "calib_samples": 64,
                    "machine": {"cpu": "c"}, "date": "d", "seconds": 60, "load_before": [1], "load_after": [1]},
           "rows": [row("apt", s, 0.70 + 0.001 * s) for s in range(3)]
           + [row("adaptive", s, 0.80 + 0.001 * s) for s in range(3)]}
    text = render(doc)
    assert FAILS_WHEN[1:] in text and "| apt ≥ adaptive | 50% | 3 | -0.1000 ± 0.0000 | **fails**, beyond the spread |" \
        in text
