"""Config composition, the paper's model pairs, and one clear line for each invalid value."""

import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from sae_reasoning.cli import compose_config, group_options
from sae_reasoning.config import validate
from sae_reasoning.errors import ConfigError

from conftest import REPO

PAIRS = {  # METHOD.md: thinking, base, steering layer, paper SAE layer / size, depth
    "deepseek-r1-distill": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Qwen/Qwen2.5-Math-1.5B", 10, 4, 15, 28),
    "r1-distill-llama-8b": ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "meta-llama/Llama-3.1-8B", 12, 6, 15, 32),
    "r1-distill-qwen-14b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "Qwen/Qwen2.5-14B", 18, 38, 5, 48),
    "r1-distill-qwen-32b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "Qwen/Qwen2.5-32B", 24, 27, 15, 64),
    "qwq-32b": ("Qwen/QwQ-32B", "Qwen/Qwen2.5-32B", 24, 27, 10, 64),
}


def test_default_is_the_organism():
    cfg = compose_config([])
    assert cfg.model.name == "organism" and cfg.data.name == "organism"
    assert cfg.sae.n_latents == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50] and cfg.sae.k == 3
    assert cfg.judge.backend == "offline" and cfg.wandb.mode == "offline"
    assert set(group_options("model")) == set(PAIRS) | {"organism"}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_paper_pairs(name):
    thinking, base, steer, sae_layer, size, depth = PAIRS[name]
    cfg = compose_config([f"model={name}"])
    validate(cfg)
    m = cfg.model
    assert (m.thinking.path, m.base.path, m.steering_layer, m.paper_sae_layer, m.paper_n_latents, m.n_layers) == (
        thinking, base, steer, sae_layer, size, depth)
    assert sae_layer in m.sae_layers and len(m.sae_layers) == 6 and max(m.sae_layers) < depth


def test_unknown_key_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="sae.nlatents|nlatents"):
        compose_config(["sae.nlatents=5"])


@pytest.mark.parametrize("override, message", [
    ("model.sae_layers=[4]", "model.sae_layers=4: the model has 4 layers"),
    ("model.steering_layer=-1", "model.steering_layer=-1"),
    ("sae.k=11", "sae.k=11 is larger than sae.n_latents=5"),
    ("sae.n_latents=0", "sae.n_latents=0: must be > 0"),
    ("sae.batch_size=-3", "sae.batch_size=-3: must be > 0"),
    ("sae.val_fraction=1.5", "sae.val_fraction=1.5"),
    ("sae.n_latents=[]", "sae.n_latents is empty"),
    ("sae.n_latents=[5,x]", "expected an integer"),
    ("data.max_new_tokens=0", "data.max_new_tokens=0"),
    ("data.activation_dtype=int8", "data.activation_dtype='int8': choose one of"),
    ("model.dtype=fp8", "model.dtype='fp8'"),
    ("model.device=tpu", "model.device='tpu'"),
    ("steering.layer=9", "steering.layer=9"),
    ("steering.objective=mse", "steering.objective='mse'"),
    ("hybrid.granularity=word", "hybrid.granularity='word'"),
    ("judge.backend=openai judge.model=null", "judge.backend=openai needs judge.model"),
    ("wandb.mode=cloud", "wandb.mode='cloud'"),
    ("model.thinking.path=./no/such/model", "model.thinking.path='./no/such/model': no such folder"),
    ("data=gsm8k data.source=/no/such/file.jsonl", "data.source='/no/such/file.jsonl': no such file"),
    ("train_dir=/no/such/run", "train_dir='/no/such/run': no such folder"),
])
def test_each_invalid_value_gives_one_clear_error(override, message):
    cfg = compose_config(override.split())
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def run_cli(*args, timeout=60):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def test_cfg_job_prints_the_paper_pair():
    proc, _ = run_cli("train.py", "--cfg", "job", "model=deepseek-r1-distill")
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.model.thinking.path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert cfg.model.base.path == "Qwen/Qwen2.5-Math-1.5B"
    assert list(cfg.model.sae_layers) == [4, 8, 12, 16, 20, 24] and cfg.model.steering_layer == 10


@pytest.mark.parametrize("args, message", [
    (["model=no-such-pair"], "unknown model 'no-such-pair': choose one of"),
    (["sae.k=11"], "sae.k=11 is larger than"),
    (["sae.batch_size=abc"], "sae.batch_size=abc"),
    (["model.sae_layers=[7]"], "the model has 4 layers"),
])
def test_entry_point_fails_with_one_line(args, message):
    proc, _ = run_cli("train.py", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("offline", ["1", "0"])
def test_hub_model_without_network_fails_fast(offline, monkeypatch):
    """No network here: with or without HF_HUB_OFFLINE, a hub id fails in seconds with one line saying what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HOME", str(REPO / ".cache" / "empty-hf-home"))
    proc, seconds = run_cli("train.py", "model=deepseek-r1-distill", "hydra.run.dir=outputs/test-hub")
    assert proc.returncode == 2 and seconds < 30
    line = proc.stderr.strip()
    assert "\n" not in line and "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in line
    assert "hf download" in line and "model.thinking.path" in line


def test_generations_key_ignores_only_the_hybrid_speed_knobs(tmp_path):
    """A resumed eval keeps its finished batches when only a setting that changes speed, not tokens, differs
    (lazy thinking, speculative steps, shared drafts); any setting that changes what is generated changes the key."""
    from sae_reasoning.pipeline import HYBRID_SPEED_KNOBS, generations_key

    (tmp_path / "taxonomy.json").write_text('{"name": "a"}')
    dirs = [f"train_dir={tmp_path}", f"steer_dir={tmp_path}"]

    def key(*overrides, ids=("q1", "q2")):
        return generations_key(compose_config(dirs + list(overrides)), "hybrid", 512, list(ids))

    base = key()
    assert set(HYBRID_SPEED_KNOBS) <= set(compose_config([]).hybrid)
    assert key("hybrid.lazy_thinking=false", "hybrid.speculative=always", "hybrid.shared_drafts=true") == base
    for changed in ("hybrid.coefficient=0.5", "hybrid.granularity=token", "hybrid.draft=token", "seed=1",
                    "+hybrid.behavior_scales.plan=2"):
        assert key(changed) != base, changed
    assert key(ids=["q1"]) != base
    (tmp_path / "taxonomy.json").write_text('{"name": "b"}')  # another chosen taxonomy
    assert key() != base


def test_each_model_of_the_pair_can_have_its_own_device(stories_path, monkeypatch):
    """`model.thinking.device` / `model.base.device` override `model.device` (two GPUs for the 32B pairs). With no
    GPU visible `model.device=cuda` cannot load, so the pair loads only if both overrides take effect."""
    import torch

    from sae_reasoning.errors import ModelLoadError
    from sae_reasoning.models import load_pair

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on the CPU machines, also on a GPU one
    common = [f"model.thinking.path={stories_path}", f"model.base.path={stories_path}", "model.n_layers=5",
              "model.sae_layers=[1]", "model.steering_layer=2", "model.dtype=float32"]
    cfg = compose_config([*common, "model.device=cuda"])
    validate(cfg)
    with pytest.raises(ModelLoadError, match="no CUDA GPU is visible"):
        load_pair(cfg.model)
    thinking, base = load_pair(compose_config([*common, "model.device=cuda", "model.thinking.device=cpu",
                                               "model.base.device=cpu"]).model)
    assert thinking.device == base.device == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="no CUDA GPU is visible"):
        load_pair(compose_config([*common, "model.device=cuda", "model.thinking.device=cpu"]).model)  # base: cuda


def test_a_real_model_on_the_default_data_gets_one_note(capsys):
    from sae_reasoning.pipeline import note_organism_data

    for overrides, noted in ((["model=deepseek-r1-distill"], True), ([], False),
                             (["model=deepseek-r1-distill", "data=gsm8k"], False)):
        note_organism_data(compose_config(overrides), "MMLU-Pro traces (data=mmlu_pro)")
        out = capsys.readouterr().out
        assert (out.splitlines() == ["note: data=organism (the default) with model=deepseek-r1-distill: the "
                                     "organism's arithmetic problems; the paper uses MMLU-Pro traces (data=mmlu_pro)"]
                if noted else out == ""), (overrides, out)
