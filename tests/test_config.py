"""Run config: YAML + dotted overrides -> dataclasses; every bad key or type fails with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from acomp.config import ConfigError, RunConfig, config_from_dict, load_config, parse_override, save_config
from acomp.train.engine import BatchPlan, plan_batches, resolve_ds_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_overrides_parse_and_apply(tmp_path):
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "train.max_steps=7",
            "train.output_dir=/tmp/x",
            "train.checkpoint_every=3",
            "train.resume=never",
            "train.seed=5",
            "data.path=/data/c",
            "optim.lr=3e-4",  # YAML 1.1 reads this as a string; float fields accept it
            "compression.segment_lengths=[64,64]",
            "model.arch.hidden_size=96",
            "--logging.wandb=offline",
        ],
    )
    assert cfg.train.max_steps == 7 and cfg.train.output_dir == "/tmp/x" and cfg.train.checkpoint_every == 3
    assert cfg.train.resume == "never" and cfg.train.seed == 5 and cfg.data.path == "/data/c"
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.compression.segment_lengths == [64, 64]
    assert cfg.model.arch["hidden_size"] == 96 and cfg.model.arch["num_hidden_layers"] == 2
    assert cfg.logging.wandb == "offline"
    assert parse_override("train.resume=auto") == ("train.resume", "auto")
    assert parse_override("model.name_or_path=null") == ("model.name_or_path", None)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_stpes=3", r"unknown config key 'train.max_stpes' \(did you mean 'train.max_steps'\?\)"),
        # a key of another section: that one, not the nearest spelling here (train.eval_every)
        ("train.log_every=1", r"unknown config key 'train.log_every' \(did you mean 'logging.log_every'\?\)"),
        ("trian.max_steps=3", r"unknown config key 'trian'"),
        ("train.max_steps=abc", r"'train.max_steps' must be an integer, got str: 'abc'"),
        ("train.max_steps=2.5", r"'train.max_steps' must be an integer"),
        ("optim.lr=fast", r"'optim.lr' must be a number"),
        (
            "compression.accumulate_summary=yes please",
            r"'compression.accumulate_summary' must be true or false",
        ),
        ("compression.segment_lengths=128", r"'compression.segment_lengths' must be a list"),
        ("compression.segment_lengths=[128,x]", r"'compression.segment_lengths\[1\]' must be an integer"),
        ("train.precision=fp16", r"'train.precision' must be one of auto, bf16, fp32; got 'fp16'"),
        ("logging.wandb=cloud", r"'logging.wandb' must be one of"),
        (
            "model.presence_attention=fused",
            r"'model.presence_attention' must be one of auto, mask, folded; got 'fused'",
        ),
        (
            "compression.training_presence=hard",
            r"'compression.training_presence' must be one of soft, sampled; got 'hard'",
        ),
        ("train.max_steps=0", r"'train.max_steps' must be > 0"),
        ("compression.lambda_warmup_steps=-1", r"'compression.lambda_warmup_steps' must be >= 0, got -1"),
        # the variable mode's fields: refused here, before the model is built (they failed there, or trained)
        ("compression.compression_max_len=0", r"'compression.compression_max_len' must be > 0, got 0"),
        ("compression.compression_lambda=-1", r"'compression.compression_lambda' must be >= 0, got -1"),
        ("compression.compression_alpha=0", r"'compression.compression_alpha' must be > 0, got 0"),
        ("compression.compress_stop_threshold=-0.1", r"'compression.compress_stop_threshold' must be in"),
        (
            "compression.segment_gradient_checkpointing=sometimes",
            r"'compression.segment_gradient_checkpointing' must be true, false or auto; got 'sometimes'",
        ),
        (
            "compression.segment_gradient_checkpointing=null",
            r"'compression.segment_gradient_checkpointing' must be true or false, or a string, got None",
        ),
        ("optim.lr=0", r"'optim.lr' must be > 0"),
        # values torch or peft refused only once the model was built, or that failed at the first step
        ("optim.betas=[1.5,0.999]", r"'optim.betas' must be in \[0, 1\), got \[1.5, 0.999\]"),
        ("optim.eps=-1", r"'optim.eps' must be >= 0, got -1"),
        ("train.seed=-1", r"'train.seed' must be in \[0, 2\*\*63\), got -1"),
        ("train.peak_tflops=0", r"'train.peak_tflops' must be > 0 \(or null: detect\), got 0"),
        (
            "compression.segment_lengths=[128]",
            r"segment_lengths has 1 entries but .*segments_per_substep is 2",
        ),
        ("train", r"must look like section.key=value"),
        ("train=3", r"config must be a mapping|train must be a mapping"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_an_override_fills_a_section_left_empty_in_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    text = (REPO / "configs" / "tiny.yaml").read_text()
    path.write_text(text[: text.index("logging:")] + "logging:\nlora:\n")
    cfg = load_config(path, ["logging.log_every=3", "lora.r=4"])
    assert cfg.logging.log_every == 3 and cfg.lora.r == 4


def test_lora_dropout_is_checked_when_lora_is_on():
    with pytest.raises(ConfigError, match=r"'lora.dropout' must be in \[0, 1\), got 1.5"):
        load_config(REPO / "configs" / "tiny.yaml", ["lora.enabled=true", "lora.dropout=1.5"])
    assert load_config(REPO / "configs" / "tiny.yaml", ["lora.dropout=1.5"]).lora.enabled is False


def test_folded_presence_attention_needs_sdpa():
    overrides = ["model.presence_attention=folded", "model.attn_implementation=eager"]
    with pytest.raises(
        ConfigError, match="'model.presence_attention' folded needs model.attn_implementation sdpa"
    ):
        load_config(REPO / "configs" / "tiny.yaml", overrides)


def test_defaults_need_a_model():
    with pytest.raises(ConfigError, match="model.name_or_path"):
        config_from_dict({})
    cfg = config_from_dict({"model": {"name_or_path": "facebook/opt-125m"}})
    assert cfg.compression.summary_length == 50 and cfg.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.max_steps=9"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_its_deepspeed_config_resolves(path):
    cfg = load_config(path)
    world = 8 if cfg.train.global_batch_size >= 8 * cfg.train.micro_batch_size else 1
    plan = plan_batches(cfg, world)
    ds = resolve_ds_config(cfg, plan, world, torch.device("cuda" if world > 1 else "cpu"), hidden_size=4096)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    assert ds["gradient_accumulation_steps"] == plan.accumulation * cfg.compression.training_substeps
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * ds["gradient_accumulation_steps"] * world


def test_paper_hyperparameters():
    llama = load_config(REPO / "configs" / "llama2-7b-6k.yaml")
    assert (llama.lora.enabled, llama.lora.r, llama.lora.alpha, llama.lora.dropout) == (True, 16, 16, 0.05)
    assert llama.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert llama.lora.modules_to_save == ["embed_summary"]
    assert (llama.optim.lr, llama.optim.warmup_steps, llama.train.global_batch_size) == (8e-4, 5000, 32)
    assert llama.compression.summary_length == 50 and llama.compression.randomize_segments
    opt = load_config(REPO / "configs" / "opt-2.7b-6k.yaml")
    assert (opt.optim.lr, opt.train.global_batch_size, opt.optim.warmup_steps) == (2e-5, 16, 1000)
    assert not opt.lora.enabled


def test_deepspeed_auto_values_and_conflicts(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.deepspeed=ds_configs/zero3.json"])
    cfg.train.deepspeed = str(REPO / cfg.train.deepspeed)
    ds = resolve_ds_config(cfg, BatchPlan(8, 1, 2), 1, torch.device("cpu"), hidden_size=128)
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5 * 10**7
    forced = tmp_path / "forced.json"
    forced.write_text('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}')
    cfg.train.deepspeed = str(forced)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 4 but the run config implies 8"):
        resolve_ds_config(cfg, BatchPlan(8, 1, 2), 1, torch.device("cpu"), hidden_size=128)
    cfg.train.deepspeed = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="no such DeepSpeed config"):
        resolve_ds_config(cfg, BatchPlan(8, 1, 2), 1, torch.device("cpu"), hidden_size=128)
    (tmp_path / "list.json").write_text("[1, 2]")
    cfg.train.deepspeed = str(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="list.json': expected a JSON object, got list$"):
        resolve_ds_config(cfg, BatchPlan(8, 1, 2), 1, torch.device("cpu"), hidden_size=128)


def test_batch_plan_must_divide():
    cfg = RunConfig()
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 32, 2
    assert plan_batches(cfg, 8).accumulation == 2
    with pytest.raises(
        ConfigError, match="global_batch_size=32 is not a multiple of .*micro_batch_size=2 x 3 ranks"
    ):
        plan_batches(cfg, 3)


def test_launcher_reports_a_bad_key_before_building_anything():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "launchers/train.py", "--config", "configs/tiny.yaml", "train.max_step=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)" in proc.stderr


def test_a_renamed_key_is_read_under_its_new_name_with_a_message(capsys):
    raw = {
        "model": {"name_or_path": "x", "init_summary_from_eos": "never"},
        "compression": {"randomize_substeps": False, "segment_lengths": [8, 8]},
    }
    cfg = config_from_dict(raw)
    assert cfg.compression.randomize_segments is False and cfg.model.init_summary == "never"
    err = capsys.readouterr().err
    assert "'compression.randomize_substeps' is now called 'compression.randomize_segments'" in err
    assert "'model.init_summary_from_eos' is now called 'model.init_summary'" in err
    raw["compression"]["randomize_segments"] = True
    with pytest.raises(
        ConfigError, match="randomize_substeps' and 'compression.randomize_segments' are the same"
    ):
        config_from_dict(raw)


def test_a_removed_key_loads_at_its_old_default_and_is_refused_otherwise():
    """Saved runs' configs (every one says `liger_kernel: false`) still load; setting it names why it went."""
    raw = {"model": {"name_or_path": "x", "liger_kernel": False}, "compression": {"segment_lengths": [8, 8]}}
    cfg = config_from_dict(raw)
    assert not hasattr(cfg.model, "liger_kernel") and cfg.model.name_or_path == "x"
    raw["model"]["liger_kernel"] = True
    with pytest.raises(ConfigError, match=r"config key 'model.liger_kernel' was removed: .*2.2x slower"):
        config_from_dict(raw)


def test_model_and_run_config_share_one_set_of_compression_defaults():
    """The trainer's model gets the library's defaults: the run config extends the model's fields."""
    from acomp.modeling import COMPRESSION_DEFAULTS
    from acomp.modeling.config import config_fields

    cfg = RunConfig()
    assert {**config_fields(cfg.compression), **config_fields(cfg.model)} == COMPRESSION_DEFAULTS


def test_choices_come_from_the_registries_that_define_them():
    from acomp.config import choices
    from acomp.modeling import MODEL_CLASSES

    assert choices()["model.family"] == tuple(MODEL_CLASSES)
    with pytest.raises(ConfigError, match="'model.family' must be one of opt, llama, mistral, qwen2, qwen3"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.family=gemma"])
