"""Smoke test of benchmarks/: every script runs end to end at toy sizes and prints one JSON object."""

import importlib.util
import json
import sys

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks"

CASES = {
    "bench_extractor": ["--quick", "--n-traces", "4", "--batch-sizes", "2"],
    "bench_sae_grid": ["--quick", "--data", "synthetic", "--n-vectors", "600", "--sizes", "5,10", "--epochs", "1",
                       "--layers", "1"],
    "bench_steering": ["--quick", "--n-train", "4", "--n-val", "2", "--batch-size", "2"],
    "bench_hybrid": ["--quick", "--tokens", "6", "--batches", "2", "--ref-checkpoints", "2", "--ref-live", "1",
                     "--no-diag"],
}


def run_script(name, argv, monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv, "--no-profile"])
    spec = importlib.util.spec_from_file_location(f"_smoke_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    module.main()
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_prints_one_json_object(name, monkeypatch, capsys, tmp_path):
    out = tmp_path / "result.json"
    result = run_script(name, CASES[name] + ["--out", str(out)], monkeypatch, capsys)
    assert json.loads(out.read_text()) == result
    assert not list(tmp_path.glob("*.partial"))  # bench_hybrid's partial results go once the whole run is written
    assert result["machine"]["nproc"] >= 1 and result["versions"]["torch"]
    if name == "bench_extractor":
        assert all(c["equal"] for c in result["equality"].values())  # same means as the naive way
        assert "met" in result["target"]
    elif name == "bench_sae_grid":
        assert len(result["fvu"]["rows"]) == 2 and "met" in result["target"]
    elif name == "bench_steering":
        assert set(result["examples_per_s"]) == {"batched_b2", "one_at_a_time_b1"}
    else:
        row = result["settings"][0]
        assert row["tokens_generated"]["hybrid_sentence"] == row["tokens_generated"]["base_cached_loop"] == 12
        assert row["greedy_agree_hf_vs_loop"]
        assert {"hybrid_over_base", "hybrid_over_reference"} <= set(result["targets"])


def test_hybrid_benchmark_names_an_unknown_diagnostic(monkeypatch, capsys):
    """A misspelt --diag name is one line listing the real ones and exit 2, before any model is loaded; it used to
    run no diagnostic at all, silently."""
    with pytest.raises(SystemExit) as e:
        run_script("bench_hybrid", ["--diag", "shared_drafts,token_nospec"], monkeypatch, capsys)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bench_hybrid.py: error: --diag token_nospec: no such diagnostic run; choose from ")
    assert "token_no_speculative" in err and "shared_drafts" in err


def test_hybrid_stages_counts_each_stage_calls(tmp_path, monkeypatch, capsys):
    """benchmarks/hybrid_stages.py (the short-lease GPU diagnostic): each stage's model calls match what the method
    must make: the cached loop one base call a token, a reference step 2 thinking calls and 1 base call, plus the
    10 x 5 steered base calls where it disagrees. The JSON written to --out holds every stage."""
    out = tmp_path / "stages.json"
    result = run_script("hybrid_stages", ["--quick", "--stages", "warm:1:8,base:1:8,sentence:2:8,ref_agree:1:4,"
                                          "ref_disagree:1:4", "--out", str(out)], monkeypatch, capsys)
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == ["warm:1:8", "base:1:8", "sentence:2:8", "ref_agree:1:4", "ref_disagree:1:4"]
    loops = len(stages["warm:1:8"]["warm_up"]["ms_per_call"])  # each warm-up loop: 8 base calls
    assert stages["warm:1:8"]["calls"]["base"]["calls"] == 8 * loops and loops >= 1
    assert {k: v["calls"] for k, v in stages["base:1:8"]["calls"].items()} == {"thinking": 0, "base": 8}
    assert stages["sentence:2:8"]["calls"]["thinking"]["calls"] >= 1 and stages["sentence:2:8"]["tokens_per_s"] > 0
    assert stages["sentence:2:8"]["n_decisions"] >= 2  # each row decides at its first sentence
    assert {k: v["calls"] for k, v in stages["ref_agree:1:4"]["calls"].items()} == {"thinking": 2, "base": 1}
    assert {k: v["calls"] for k, v in stages["ref_disagree:1:4"]["calls"].items()} == {"thinking": 2, "base": 51}
    assert json.loads(out.read_text())["stages"] == result["stages"]
    with pytest.raises(SystemExit, match="bad stage 'tokens:1:8'"):
        run_script("hybrid_stages", ["--stages", "tokens:1:8"], monkeypatch, capsys)


def test_gpu_warm_up_stops_once_two_timings_agree(monkeypatch):
    """bench_hybrid's GPU warm-up (run here on the CPU model): it times n-token base-only loops until two in a row
    agree within 10% or its budget ends, and reports each loop's time per call."""
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("_warm_bench_hybrid", BENCH / "bench_hybrid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, base, _ = module.C.load_pair(torch.device("cpu"))
    prompt = [base.tokenizer("Tom has 3 apples.")["input_ids"]]
    out = module.warm_until_steady(base, prompt, torch.device("cpu"), n=8, budget_s=20.0)
    ms = out["ms_per_call"]
    assert len(ms) >= 1 and all(t > 0 for t in ms)
    assert out["steady"] == (len(ms) >= 2 and abs(ms[-1] - ms[-2]) <= 0.1 * ms[-2] + 1e-9)
    if out["steady"]:  # it stopped at the first agreeing pair
        assert all(abs(b - a) > 0.1 * a for a, b in zip(ms[:-2], ms[1:-1]))
