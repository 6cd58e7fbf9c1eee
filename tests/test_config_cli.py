"""Config loading, dotted overrides and the CLI's one-line errors (no model is loaded here)."""

import subprocess
import sys
from pathlib import Path

import pytest

from mlx_grpo.cli import build_parser, parse_args, train_main
from mlx_grpo.config import Config, iter_fields, load_config
from mlx_grpo.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_the_demo_config():
    # configs/default.yaml documents the demo; running outside the repo falls back to the
    # dataclass defaults, so both must describe the same run.
    assert load_config(REPO / "configs" / "default.yaml") == Config()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  beta: 0.1\ntrain:\n  steps: 7\nrubric: r.yaml\n")
    cfg = load_config(path, {"train.steps": 9, "optim.learning_rate": "1e-3"})
    assert (cfg.grpo.beta, cfg.train.steps, cfg.rubric) == (0.1, 9, "r.yaml")
    assert cfg.optim.learning_rate == pytest.approx(1e-3)  # PyYAML reads "1e-3" as a string


@pytest.mark.parametrize("text, fragment", [
    ("grpo: [1, 2\n", "c.yaml:2: invalid YAML"),
    ("- 1\n- 2\n", "top level must be a mapping"),
    ("grpo:\n  betta: 0.1\n", "unknown key 'grpo.betta' (valid: grpo.beta"),
    ("nonsense: 1\n", "unknown key 'nonsense'"),
    ("train:\n  steps: many\n", "train.steps: expected int, got 'many'"),
    ("logging:\n  wandb: maybe\n", "logging.wandb must be one of auto, on, off"),
    ("rollout:\n  group_size: 1\n", "rollout.group_size must be at least 2"),
    ("grpo:\n  loss_type: ppo\n", "grpo.loss_type must be one of grpo, bnpo, dapo, dr_grpo"),
    ("rollout:\n  top_p: 0\n", "rollout.top_p must be in (0, 1]"),
    ("optim:\n  grad_accum_steps: 3\n", "must divide the batch_size * group_size = 32"),
])
def test_bad_config_is_one_line(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserInputError) as err:
        load_config(path)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_every_field_has_help_and_a_flag():
    help_text = build_parser().format_help()
    for name, field, _ in iter_fields():
        assert field.metadata.get("help"), name
        assert f"--{name}" in help_text or name == "rubric"


def test_shorthands_map_to_fields():
    args, overrides = parse_args(["--model", "x/y", "--data", "d.jsonl", "--run-name", "r", "--no-wandb",
                                  "--grpo.beta", "0.04", "--lora.target_modules", "[q_proj, v_proj]"])
    assert overrides == {"model.path": "x/y", "data.dataset": "d.jsonl", "train.run_name": "r",
                         "logging.wandb": "off", "grpo.beta": 0.04, "lora.target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("argv, fragment", [
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--grpo.beta", "-1"], "grpo.beta must be >= 0"),
    (["--rubric", "missing.yaml"], "missing.yaml"),
    (["--data", "no_such_task"], "not a built-in task"),
    (["--model", "./missing-model.gguf"], "missing-model.gguf"),
    (["--config", "missing.yaml"], "missing.yaml: config file not found"),
])
def test_cli_errors_exit_2_without_traceback_or_run_dir(tmp_path, capsys, argv, fragment):
    code = train_main(argv + ["--train.output_dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not (tmp_path / "logs").exists()


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "mlx_grpo.cli", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0 and "--rollout.group_size" in out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_optimised_blas_is_loaded_before_mlx():
    code = "import mlx_grpo, mlx_grpo.blas as b; import mlx.core; print(b.loaded_blas)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "openblas" in out.stdout.lower()
    assert "no optimised BLAS" not in out.stderr
