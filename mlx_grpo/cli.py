"""Command-line entry points. `uv run train --help` lists every option."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import yaml

import mlx_grpo  # noqa: F401  (loads the optimised BLAS before mlx.core)
from mlx_grpo.config import (Config, dropped_settings, iter_fields, load_config, load_run_config, old_name_message,
                             parse_cli_value, to_dict)
from mlx_grpo.errors import UserInputError

DEFAULT_CONFIG = "configs/default.yaml"
SHORTHANDS = {
    "model": ("model.path", "Model: built-in alias, HF id, mlx-lm directory or .gguf file."),
    "rubric": ("rubric", "Rubric YAML."),
    "data": ("data.dataset", "A JSONL path or a built-in task name (arithmetic, coding)."),
    "run_name": ("train.run_name", "Name of the run directory under logs/runs/."),
}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserInputError(f"command line: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="train",
        description="GRPO fine-tuning on MLX. Options come from --config, then the flags below "
                    "(any config field can be set as --section.key VALUE).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="Training config YAML.")
    parser.add_argument("--resume", metavar="RUN_DIR|latest", help="Continue a previous run.")
    parser.add_argument("--no-wandb", action="store_true", help="Disable the W&B mirror.")
    parser.add_argument("--force", action="store_true",
                        help="Train even when the memory estimate is above 85%% of the machine's memory, or "
                             "(Linux) without an optimised BLAS, about 50x slower.")
    parser.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")
    for flag, (_, text) in SHORTHANDS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=f"short_{flag}", metavar=flag.upper(), help=text)
    defaults = Config()
    group = parser.add_argument_group("config fields")
    for name, f, _ in iter_fields():
        if name in SHORTHANDS:
            continue  # top-level field that already has a shorthand flag of the same name
        value = defaults
        for part in name.split("."):
            value = getattr(value, part)
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "") + (f" One of: {', '.join(choices)}." if choices else "")
        group.add_argument(f"--{name}", dest=f"field:{name}", metavar="VALUE", default=argparse.SUPPRESS,
                           help=f"{text} (default: {value!r})".replace("%", "%%"))
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    # argparse reads "-1e-4" as a flag; glue a negative number to its option ("--x=-1e-4").
    joined = []
    for token in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and re.match(r"^-\.?\d", token):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    parser = build_parser()
    args, unknown = parser.parse_known_args(joined)
    overrides = dotted_flags(parser, unknown)
    for key, value in vars(args).items():
        if key.startswith("field:"):
            overrides[key[len("field:"):]] = parse_cli_value(value)
    for flag, (dotted, _) in SHORTHANDS.items():
        value = getattr(args, f"short_{flag}")
        if value is not None:
            overrides[dotted] = value if dotted != "data.dataset" else str(value)
    if args.no_wandb:
        overrides["logging.wandb"] = "off"
    return args, overrides


def dotted_flags(parser: argparse.ArgumentParser, tokens: list[str]) -> dict:
    """The flags argparse does not know: --task.OPTION VALUE (a built-in task's own options), and the
    settings of earlier versions, each answered with what to write instead."""
    overrides = {}
    while tokens:
        flag, *rest = tokens.pop(0).split("=", 1)
        name = flag[2:] if flag.startswith("--") else None
        old = old_name_message(name) if name else None
        if old is not None:
            parser.error(old)
        if name is None or not name.startswith("task.") or not (rest or tokens):
            parser.error(f"unrecognized arguments: {flag}")
        overrides[name] = parse_cli_value(rest[0] if rest else tokens.pop(0))
    return overrides


def make_run_dirs(cfg: Config, check: bool = True) -> tuple[Path, Path]:
    name = cfg.train.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.train.output_dir) / "runs" / name
    if check and run_dir.exists():
        raise UserInputError(f"{run_dir}: run directory already exists; choose another --run-name")
    return run_dir, Path(cfg.train.output_dir) / "tensorboard" / name


def validate_inputs(cfg: Config):
    """Check everything the user supplied before the (slow) model load."""
    from mlx_grpo.data import load_dataset
    from mlx_grpo.models import validate_generation_length, validate_model_path
    from mlx_grpo.rewards import load_rubric
    from mlx_grpo.rewards.correct import CorrectRule
    from mlx_grpo.rewards.rubric import dry_call_checks

    rubric = load_rubric(cfg.rubric)  # the rubric's own mistakes first, before the dataset's
    items = load_dataset(cfg.data.dataset, split="train", seed=cfg.train.seed, size=cfg.data.train_size, **cfg.task)
    if items:
        dry_call_checks(rubric, items[0])
    validate_model_path(cfg.model.path)
    validate_generation_length(cfg.model.path, cfg.rollout.max_new_tokens)
    CorrectRule.from_config(cfg).check(rubric)
    return rubric, items


def start_scorer(cfg: Config, rubric, run_dir: Path | None, console, notify):
    """The rubric's scorer, with its teacher checked by one tiny request (before the model loads).
    Its score cache is cfg.teacher_cache, else teacher_cache.sqlite in run_dir (None: no cache)."""
    from mlx_grpo.rewards import Scorer

    cache = Path(cfg.teacher_cache).expanduser() if cfg.teacher_cache else (
        run_dir / "teacher_cache.sqlite" if run_dir is not None else None)
    scorer = Scorer(rubric, cache_path=cache, warn=lambda text: notify(f"teacher: {text}"))
    if scorer.teacher is not None:
        t = scorer.teacher.cfg
        try:
            with console.status(f"Checking the teacher {t.model} at {t.shown_url}..."):
                scorer.preflight()
        except BaseException:
            scorer.close()
            raise
        console.print(f"Teacher: {t.model} at {t.shown_url} ({t.mode} mode) answers; "
                      f"{scorer.teacher.describe_scoring()}. Score cache: {cache}", soft_wrap=True)
    return scorer


class StopRequests:
    """Ctrl-C / SIGTERM: the first finishes the current step, saves a checkpoint and exits 0;
    a second one stops at once."""

    def __init__(self, console):
        self.requested = False
        self.console = console

    def __call__(self) -> bool:
        return self.requested

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.console.print("Stopping after this step (a checkpoint will be saved); press Ctrl-C again to quit now.",
                           markup=False)

    def install(self) -> dict:
        import signal

        return {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def uninstall(previous: dict) -> None:
        import signal

        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resume_target(spec: str, output_dir: str) -> Path:
    """The run directory --resume names: a path, or `latest` (the newest run with a checkpoint)."""
    from mlx_grpo.checkpoint import complete_checkpoints

    if spec != "latest":
        run_dir = Path(spec)
        if not run_dir.is_dir():
            raise UserInputError(f"--resume: {run_dir} is not a directory")
        return run_dir
    runs = [p for p in (Path(output_dir) / "runs").glob("*") if complete_checkpoints(p)]
    if not runs:
        raise UserInputError(f"--resume latest: no run with a checkpoint under {Path(output_dir) / 'runs'}")
    return max(runs, key=lambda p: complete_checkpoints(p)[-1].stat().st_mtime)


def trained_run(spec: str, output_dir: str) -> Path:
    """The run directory that `--run` names for export, chat and eval: a path, or `latest` (the run
    whose adapters were saved last). It must hold the run's config and its saved adapters."""
    if spec == "latest":
        runs = [p for p in (Path(output_dir) / "runs").glob("*") if (p / "adapters.safetensors").is_file()]
        if not runs:
            raise UserInputError(f"--run latest: no run with saved adapters under {Path(output_dir) / 'runs'}")
        return max(runs, key=lambda p: (p / "adapters.safetensors").stat().st_mtime)
    run_dir = Path(spec)
    if not run_dir.is_dir():
        raise UserInputError(f"--run: {run_dir} is not a directory")
    if not (run_dir / "config.yaml").is_file():
        raise UserInputError(f"--run: {run_dir} has no config.yaml; is it a training run directory?")
    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (run_dir / name).is_file():
            raise UserInputError(f"--run: {run_dir} has no {name}: the run saved no adapters yet "
                                 "(they are written at each checkpoint and at the end)")
    return run_dir


def start_logging(cfg: Config, run_dir: Path, tb_dir: Path, resumed_at: int | None, rubric, model_dir, console):
    """config.yaml in the run directory, and the hub of every sink: TensorBoard, jsonl, learning.log, W&B."""
    from mlx_grpo.metrics import MetricsHub
    from mlx_grpo.metrics.files import JsonlSink, LearningLogSink
    from mlx_grpo.metrics.system import describe_backend
    from mlx_grpo.metrics.tensorboard import TensorBoardSink
    from mlx_grpo.metrics.wandb_sink import wandb_enabled
    from mlx_grpo.rewards import describe_rubric

    (run_dir / "config.yaml").write_text(yaml.safe_dump({**to_dict(cfg), "resolved_model": str(model_dir)},
                                                        sort_keys=False))
    sinks = [TensorBoardSink(tb_dir, resume_step=resumed_at), JsonlSink(run_dir / "metrics.jsonl"),
             LearningLogSink(run_dir / "learning.log"),
             JsonlSink(run_dir / "batch_metrics.jsonl", keys=("pass_at_1", "pass_at_all"))]
    if wandb_enabled(cfg):
        from mlx_grpo.metrics.wandb_sink import WandbSink
        sinks.append(WandbSink(cfg, run_dir, announce=lambda text: console.print(text, soft_wrap=True)))
    hub = MetricsHub(sinks)
    hub.last_step = resumed_at or 0
    hub.log_text(hub.last_step, "Rubric/changes", describe_rubric(rubric))
    hub.log_text(hub.last_step, "System/backend", describe_backend())
    return hub


def check_memory_fit(cfg: Config, model, tokenizer, items: list[dict], console, force: bool) -> dict:
    """Estimate the step's peak memory before training; stop (UserInputError) above 85% of the
    machine's memory unless `force`. Returns the estimate's scalars, logged with every step."""
    from mlx_grpo import memory_fit

    found = memory_fit.estimate(model, cfg, memory_fit.longest_prompt(tokenizer, items, cfg.data.system_prompt or None))
    if found is None:
        console.print("Memory estimate: not available for this model's architecture (no fit check)")
        return {}
    available, what = memory_fit.machine_memory()
    record = memory_fit.estimate_record(found)
    console.print(f"Memory estimate: {record['memory/estimated_peak_gb']:.2f} GB at the peak (rollout "
                  f"{record['memory/estimated_rollout_gb']:.2f}, update {record['memory/estimated_update_gb']:.2f}) "
                  f"of {available / 1024 ** 3:.1f} GB of {what}", soft_wrap=True)
    problem = memory_fit.refusal(found, available, what)
    if problem and not force:
        raise UserInputError(problem)
    if problem:
        console.print(f"warning: {problem.replace(', or pass --force to try anyway', '')}; going on (--force)",
                      soft_wrap=True, markup=False)
    return record


def run_training(cfg: Config, console, resume_dir: Path | None = None, force: bool = False) -> int:
    from rich.progress import Progress

    from mlx_grpo.blas import missing_blas_problem
    from mlx_grpo.distributed import init_world
    from mlx_grpo.evaluate import held_out_items
    from mlx_grpo.metrics import MetricsHub
    from mlx_grpo.models import check_model, load_model
    from mlx_grpo.rewards import RubricWatcher, TeacherUnavailable
    from mlx_grpo.trainer import Prompts, RunIO, TrainingDiverged, train

    if (problem := missing_blas_problem()) and not force:
        raise UserInputError(f"{problem}; or pass --force to train slowly")
    world = init_world()
    if world.size > 1:
        if cfg.rollout.pipeline:
            raise UserInputError("rollout.pipeline is not supported with several processes (mlx.launch); set it to false")
        if not world.is_main:  # rank 0 speaks and writes for the group
            console.quiet = True
    rubric, items = validate_inputs(cfg)
    eval_items = held_out_items(cfg)[:cfg.eval.num_prompts] if cfg.eval.every else None
    run_dir, tb_dir, checkpoint = locate_run(cfg, resume_dir, check=world.is_main)
    hub = None

    def notify(text: str) -> None:
        """A message for the user: on the console and, once logging has started, in learning.log."""
        console.print(text, soft_wrap=True, markup=False)
        if hub is not None:
            hub.log_text(hub.last_step, "Notices", text)

    scorer = start_scorer(cfg, rubric, run_dir if world.is_main else None, console, notify)
    try:
        console.print("[bold]Resolved config[/bold]")
        console.print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        with console.status(f"Loading {cfg.model.path} ({cfg.model.dtype})..."):
            model, tokenizer, model_dir = load_model(cfg.model.path, cfg.model.dtype)
        console.print(f"Model: {model_dir}", soft_wrap=True)
        check_model(model)  # an architecture that cannot train exactly stops here, in one line
        memory_record = check_memory_fit(cfg, model, tokenizer, items, console, force)
        if world.is_main:
            resumed_at = prepare_run_dir(run_dir, checkpoint, console)
            hub = start_logging(cfg, run_dir, tb_dir, resumed_at, rubric, model_dir, console)
        else:
            hub = MetricsHub([])  # the other ranks log nothing; rank 0 logs the gathered metrics
        describe_run(cfg, world, run_dir, tb_dir, console)

        with Progress(*progress_columns(), console=console) as bar:
            stop = StopRequests(console)
            previous = stop.install()
            try:
                # The trainer writes its own notices (rubric reloads, health) to the logs: console only here.
                state = train(cfg, model, tokenizer, Prompts(items, eval_items), scorer, RunIO(
                    run_dir, hub, progress=progress_display(bar, cfg, console), watcher=RubricWatcher(rubric, items[0] if items else None),
                    resume=checkpoint, should_stop=stop, logged_with_every_step=memory_record,
                    notify=lambda text: console.print(text, soft_wrap=True, markup=False)), world)
            except (TeacherUnavailable, TrainingDiverged, UserInputError) as err:
                # Adapters of the completed steps are saved by train(); say where and stop. A
                # UserInputError here is a check failing mid-run (a Python check that raised).
                what = {TeacherUnavailable: "teacher", TrainingDiverged: "training"}.get(type(err), "rubric")
                print(f"error: {what}: {err}. Adapters so far: {run_dir / 'adapters.safetensors'}; resume with: "
                      f"uv run train --resume {run_dir}", file=sys.stderr)
                return 1
            finally:
                stop.uninstall(previous)
    finally:
        scorer.close()
        if hub is not None:
            hub.close()
    final_report(state, scorer, run_dir, console)
    return 0


def locate_run(cfg: Config, resume_dir: Path | None, check: bool) -> tuple[Path, Path, Path | None]:
    """(run directory, TensorBoard directory, checkpoint to resume from or None)."""
    from mlx_grpo.checkpoint import check_resumable, latest_checkpoint

    if resume_dir is None:
        return (*make_run_dirs(cfg, check=check), None)  # only rank 0 checks (and later creates) it
    checkpoint = latest_checkpoint(resume_dir)
    check_resumable(checkpoint)  # refused now, not after the slow model load
    return resume_dir, Path(cfg.train.output_dir) / "tensorboard" / resume_dir.name, checkpoint


def prepare_run_dir(run_dir: Path, checkpoint: Path | None, console) -> int | None:
    """Create a new run directory, or cut a resumed one's logs back to its checkpoint; returns the
    step resumed from (None for a new run)."""
    from mlx_grpo.checkpoint import read_state, truncate_logs

    if checkpoint is None:
        run_dir.mkdir(parents=True)
        return None
    saved = read_state(checkpoint)
    # Lines a crash left after the checkpoint are cut, so the resumed steps are not duplicated.
    truncate_logs(run_dir, saved["log_sizes"])
    console.print(f"Resuming {run_dir} from step {saved['step']} ({checkpoint})", soft_wrap=True)
    return saved["step"]


def describe_run(cfg: Config, world, run_dir: Path, tb_dir: Path, console) -> None:
    from mlx_grpo.metrics.system import describe_backend

    console.print(describe_backend(), soft_wrap=True)
    if world.size > 1:
        console.print(f"Data parallel over {world.size} processes: {cfg.rollout.batch_size} prompts per process, "
                      f"{cfg.rollout.batch_size * world.size} per step", soft_wrap=True)
    console.print(f"Run directory: {run_dir}   TensorBoard: tensorboard --logdir {tb_dir.parent}", soft_wrap=True)


def progress_display(bar, cfg: Config, console):
    """progress(step, record): the live bar on a terminal; one plain line per step in a log file or CI."""
    task = bar.add_task("train", total=cfg.train.steps, **progress_fields({}))

    def on_step(step: int, record: dict) -> None:
        bar.update(task, completed=step, **progress_fields(record))
        if not console.is_terminal:
            fields = progress_fields(record)
            teacher = f" teacher {fields['teacher']} tok" if "Teacher/APITokensTotal" in record else ""
            console.print(f"step {step}/{cfg.train.steps} epoch {fields['epoch']} reward {fields['reward']} "
                          f"kl {fields['kl']} gen {fields['gen']} tok/s train {fields['train']} tok/s"
                          f"{teacher} {record['timing_s/step']:.1f}s", markup=False, soft_wrap=True)

    return on_step


def final_report(state, scorer, run_dir: Path, console) -> None:
    """Why the run stopped, what the teacher cost, the criteria table, and where the adapters are."""
    first, last = state.reward_ends.first, state.reward_ends.last
    k = len(first)
    if state.stop_reason:
        console.print(f"Stopped early: {state.stop_reason}. Resume with: uv run train --resume {run_dir}",
                      soft_wrap=True)
    usage = scorer.usage
    if usage.requests or usage.cache_hits:
        cost = f", ${usage.cost_usd:.4f}" if usage.cost_usd else ""
        console.print(f"Teacher: {usage.requests} requests, {usage.tokens:,} tokens{cost}, {usage.cache_hits} cache "
                      f"hits, {usage.failed} completions masked.", soft_wrap=True)
    if state.summary:
        console.print(summary_table(state.summary))
    means = f" Mean reward first {k}: {sum(first) / k:.3f}, last {k}: {sum(last) / k:.3f}." if k else ""
    console.print(f"Done: {state.step} steps.{means} Adapters: {run_dir / 'adapters.safetensors'}", soft_wrap=True)
    for line in next_commands(run_dir):
        console.print(line, soft_wrap=True, markup=False)


def next_commands(run_dir: Path) -> list[str]:
    """What to do with a finished run: try it, measure it, take it to other tools."""
    return [f"  Try it:   uv run chat --run {run_dir} --compare base",
            f"  Measure:  uv run eval --run {run_dir} --compare base",
            f"  Export:   uv run export --run {run_dir} --gguf f16   (mlx-lm folder, GGUF and Ollama Modelfile)"]


def train_main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = sys.argv[1:] if argv is None else argv
    console = Console(stderr=False)

    def run() -> int:
        args, overrides = parse_args(argv)
        if args.resume:
            output_dir = overrides.get("train.output_dir", Config().train.output_dir)
            run_dir = resume_target(args.resume, output_dir)
            # The run's own config; the command line may change e.g. train.steps to go further.
            for change in dropped_settings(run_dir):  # settings of an earlier version that this one fixes
                console.print(f"note: this run's {change}", soft_wrap=True, markup=False)
            return run_training(load_run_config(run_dir, overrides), console, resume_dir=run_dir, force=args.force)
        config_path = args.config
        if config_path == DEFAULT_CONFIG and not Path(config_path).exists():
            config_path = None  # run from outside the repo: built-in defaults are the demo
        cfg = load_config(config_path, overrides)
        return run_training(cfg, console, force=args.force)

    return with_one_line_errors(run, debug="--debug" in argv)


def progress_columns():
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return [TextColumn("step {task.completed:.0f}/{task.total:.0f} ep {task.fields[epoch]}"), BarColumn(),
            TextColumn("reward {task.fields[reward]}"), TextColumn("kl {task.fields[kl]}"),
            TextColumn("gen {task.fields[gen]} tok/s"), TextColumn("train {task.fields[train]} tok/s"),
            TextColumn("teacher {task.fields[teacher]} tok"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn()]


def progress_fields(record: dict) -> dict[str, str]:
    """The progress bar's fields from a step record ("-" until there is one)."""
    def fmt(key, spec):
        return format(record[key], spec) if key in record else "-"

    ms = record.get("timing_per_token_ms/gen")
    reward = f"{fmt('Train/AvgReward', '.3f')}±{fmt('Train/RewardStd', '.3f')}" if record else "-"
    return {"epoch": fmt("epoch", ".2f"), "reward": reward, "kl": fmt("actor/kl_loss", ".4f"),
            "gen": f"{1000 / ms:.0f}" if ms else "-", "train": fmt("Performance/Backprop_AvgTokensPerSec", ".0f"),
            "teacher": fmt("Teacher/APITokensTotal", ",.0f")}


def summary_table(rows: list[list]):
    from rich.table import Table

    table = Table(title="Scores over the run")
    for column in ("criterion", "mean", "std", "min", "max", "samples"):
        table.add_column(column, justify="left" if column == "criterion" else "right")
    for name, mean, std, lo, hi, n in rows:
        table.add_row(name, f"{mean:.3f}", f"{std:.3f}", f"{lo:.3f}", f"{hi:.3f}", str(n))
    return table


def with_one_line_errors(run, debug: bool) -> int:
    """Exit code of `run()`; bad input becomes one line on stderr and exit code 2 (no traceback)."""
    try:
        return run()
    except UserInputError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(train_main())
