"""Every metric name of the five seed references is logged by a real run.

The names are every backticked text of the seed files, kept in tests/data/seed_metric_names.txt so
that the test runs on a checkout without them (where the seeds sit beside the project, a test checks
the list is still theirs). The test runs a short training of the embedded
SmolLM2 with the optional capabilities on (difficulty levels and the curriculum, the adaptive
window, S-GRPO, entropy dumps, a KL penalty, held-out evaluation), reads the TensorBoard event
files back with TensorBoard's own reader (and metrics.jsonl for the names without a group) and fails on any name that is neither logged nor listed
below as not a metric or not applicable, each with its reason. The README's metric table must
name every metric it checks.
"""

import json
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlx_grpo import rollout_source
from mlx_grpo.cli import train_main
from mlx_grpo.curriculum import Curriculum

ROOT = Path(__file__).resolve().parents[1]
NAMES = ROOT / "tests" / "data" / "seed_metric_names.txt"
SEEDS = ROOT.parent / "shared" / "seeds"  # the seed files themselves, where they are beside the project

# Backticked text in the seeds that names no metric.
NOT_METRICS = {
    # W&B run config keys (the W&B sink writes them: test_observability checks the config).
    "model_id", "num_steps", "learning_rate", "batch_size", "use_lora", "lora_rank", "lora_alpha", "num_generations",
    "beta", "epsilon", "temperature", "max_prompt_length", "max_generation_steps", "weight_decay", "max_grad_norm",
    "warmup_fraction", "num_tpu_cores", "has_tpu", "rubric_file", "rubric_weight",
    # Other trainers' config switches, flags, environment variables, example values and commands.
    "agent.adaptive_window.enable=True", "agent.entropy_logging.enable=True", "algorithm.adv_estimator=grpo",
    "actor_rollout_ref.rollout.n", "use_kl_loss=True", "n", "--no-wandb", "--rubric-file", "WANDB_API_KEY",
    "google/gemma-3-1b-it", "http://localhost:6006", "tail -f grpo_runs/learning.log", "0.5",
    "(0.25 + 0.50) / 2 = 0.375", "<reasoning>...</reasoning><answer>...</answer>",
    # Reward-function names of the seed's own code (our rubric checks are named in rubrics/*.yaml).
    "answer_check", "format_approx", "format_exact", "number_check",
    # Files, not metrics (the run directory's learning.log, batch_metrics.jsonl, completions.jsonl
    # and reward_breakdown.jsonl are tested in test_observability).
    "learning.log", "batch_metrics.jsonl", "grpo_runs/reward_logs/completions.jsonl",
    "grpo_runs/reward_logs/syntax_aware_breakdown.jsonl", ".pt",
}
# Names that cannot exist in GRPO, which has no critic (value network).
NOT_APPLICABLE = {
    "critic/values/mean": "no critic", "critic/values/max": "no critic", "critic/values/min": "no critic",
    "critic/vf_explained_var": "no critic", "timing_s/values": "no critic to run",
    "timing_s/update_critic": "no critic to update", "timing_per_token_ms/values": "no critic to run",
    "timing_per_token_ms/update_critic": "no critic to update", "ppo/val/mean": "no value head",
    "ppo/val/var": "no value head", "ppo/val/error": "no value head", "ppo/val/var_explained": "no value head",
    "ppo/val/clipfrac": "no value head", "ppo/loss/value": "no value loss",
}
# Names the seeds give as examples of a pattern: checked through this run's instance of it.
INSTANCES = {
    # The seed's example code rubric; this run's rubric has the criterion Answer.
    "Scoring/CodeQuality": "Scoring/Answer", "Scoring/Correctness": "Scoring/Answer",
    "Scoring/Documentation": "Scoring/Answer", "Scoring/Efficiency": "Scoring/Answer",
    "rewards/syntax_aware_reward/mean": "rewards/Answer/mean", "rewards/syntax_aware_reward/std": "rewards/Answer/std",
    "responses_len_mean": "tokens/responses_len_mean",  # written as a suffix of tokens/queries_len_mean
}
# The entropy dump's keys (local files, never TensorBoard or W&B).
DUMP_KEYS = {"old_entropy", "old_varentropy", "attention_mask", "responses"}


def seed_names() -> set[str]:
    names = set(NAMES.read_text(encoding="utf-8").splitlines()) - {""}
    assert len(names) > 200, f"{NAMES} lists only {len(names)} names"  # an empty list would check nothing
    return names


def names_in_seed_files() -> set[str]:
    names = set()
    for path in sorted(SEEDS.glob("*.md")):
        names |= set(re.findall(r"`([^`\n]+)`", path.read_text(encoding="utf-8")))
    return names


@pytest.mark.skipif(not SEEDS.is_dir(), reason="the seed files are not beside this checkout")
def test_the_name_list_is_the_seed_files_names():
    assert seed_names() == names_in_seed_files()


def pattern(name: str) -> re.Pattern:
    """A seed name as a regex over tags: {placeholder} and * stand for a name part, k for an exit."""
    if name.startswith("/"):  # "/mean": a suffix the seed's statistics share
        return re.compile(".+" + re.escape(name))
    if name.endswith("/"):  # "Epoch/": the group
        return re.compile(re.escape(name) + ".+")
    text = re.escape(name).replace(r"\*", ".+")
    text = re.sub(r"\\\{[^}]*\\\}", "[^/]+", text)
    text = text.replace("exit_k_", r"exit_\d+_")
    return re.compile(text)


def expand_braces(text: str) -> list[str]:
    """`critic/score/{mean,max,min}` -> the three names (braces without a comma stay)."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", text)
    if not match:
        return [text]
    return [n for part in match.group(1).split(",")
            for n in expand_braces(text[:match.start()] + part.strip() + text[match.end():])]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("coverage") / "logs"

    class FourWide(Curriculum):  # the next level unlocks after 4 completions (64 in training), within 4 steps
        def __init__(self, *args):
            super().__init__(*args, window=4)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rollout_source, "Curriculum", FourWide)
        code = train_main([
            "--train.steps", "4", "--run-name", "cov", "--train.output_dir", str(out), "--no-wandb",
            "--rollout.batch_size", "2", "--rollout.group_size", "4", "--rollout.max_new_tokens", "12",
            "--task.min_list_size", "3", "--task.list_size", "4", "--data.curriculum", "true",
            "--data.curriculum_threshold", "0", "--data.epoch_size", "4",
            "--rollout.adaptive_window", "true", "--rollout.sgrpo", "true", "--rollout.sgrpo_answer_tokens", "6",
            "--logging.entropy_dump_every", "2", "--grpo.beta", "0.04", "--eval.every", "2", "--eval.num_prompts", "4",
            "--logging.histogram_every", "2", "--logging.sample_every", "1",
            "--optim.warmup_steps", "0",
        ])
    assert code == 0
    events = EventAccumulator(str(out / "tensorboard" / "cov"), size_guidance={"scalars": 0, "histograms": 0,
                                                                               "tensors": 0})
    events.Reload()
    tags = events.Tags()
    logged = set(tags["scalars"]) | set(tags["histograms"]) | set(tags["tensors"])
    # Names without a group ("loss", "pass_at_1": the learning-log seed's) stay out of TensorBoard,
    # whose dashboard groups tags by prefix; they are in every line of metrics.jsonl (and in W&B).
    run_dir = out / "runs" / "cov"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged |= {key for line in lines for key in line if "/" not in key}
    dumps = sorted((run_dir / "entropy_data").glob("*.safetensors"))
    return logged, dumps


def test_every_seed_metric_is_logged(run):
    from safetensors.numpy import load_file

    logged, dumps = run
    assert dumps, "no entropy dump was written"
    dump_keys = set(load_file(str(dumps[0])))
    missing = []
    for name in sorted(seed_names() - NOT_METRICS - set(NOT_APPLICABLE)):
        if name in DUMP_KEYS:
            if name not in dump_keys:
                missing.append(f"{name} (entropy dump)")
            continue
        wanted = pattern(INSTANCES.get(name, name))
        if not any(wanted.fullmatch(tag) for tag in logged):
            missing.append(name)
    assert not missing, f"seed metrics missing from TensorBoard: {missing}"


def test_the_entropy_dump_has_its_own_time(run):
    logged, _ = run
    assert "timing_s/entropy_dump" in logged  # not charged to the reference log-probs' timing_s/ref


def test_not_applicable_names_are_not_logged_as_zeros(run):
    logged, _ = run
    assert not set(NOT_APPLICABLE) & logged


def test_readme_metric_table_names_every_seed_metric():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Metric reference"):]
    section = section[:section.index("\n## ", 4)] if "\n## " in section[4:] else section
    listed = {n for text in re.findall(r"`([^`\n]+)`", section) for n in expand_braces(text)}
    concrete = {n for n in seed_names() - NOT_METRICS - DUMP_KEYS
                if not ("*" in n or "{" in n or n.startswith("/") or n.endswith("/"))}
    unlisted = sorted(n for n in concrete if n not in listed and INSTANCES.get(n) not in listed)
    assert not unlisted, f"README's metric table does not name: {unlisted}"
    for name in NOT_APPLICABLE:
        assert name in listed, f"README should say {name} does not apply"
