"""`uv run export`: a trained run as a model to use elsewhere.

    uv run export --run latest                   # RUN_DIR/export/mlx: mlx-lm and LM Studio's MLX engine
    uv run export --run logs/runs/demo --gguf f16   # + RUN_DIR/export/demo-f16.gguf and an Ollama Modelfile
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx_grpo  # noqa: F401 (loads the optimised BLAS before mlx.core)
from mlx_grpo.cli import OneLineParser, trained_run, with_one_line_errors
from mlx_grpo.config import Config, load_run_config
from mlx_grpo.errors import UserInputError

PROBE_PROMPTS = 4  # held-out prompts on which the fused model is compared with the adapter model
FALLBACK_PROMPT = {"prompt": "Explain in one sentence why the sky is blue."}


def build_parser():
    from mlx_grpo.gguf.writer import OUTTYPES

    parser = OneLineParser(prog="export", description="Merge a run's adapters into its base model and write it "
                           "where other tools load it: an mlx-lm directory, and with --gguf a GGUF file and an "
                           "Ollama Modelfile for llama.cpp, Ollama and LM Studio.")
    parser.add_argument("--run", required=True, metavar="RUN_DIR|latest", help="The training run to export.")
    parser.add_argument("--gguf", choices=list(OUTTYPES), help="Also write a GGUF file of this type (f16 keeps the "
                        "model's answers; q8_0 is half the size).")
    parser.add_argument("--output", metavar="DIR", help="Where to write (default: RUN_DIR/export).")
    parser.add_argument("--dequantize", action="store_true", help="For a quantized base model: keep the fused "
                        "weights in float instead of quantizing them again (larger, and exactly the trained model).")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="Type of the fused float "
                        "weights (default: the run's model.dtype). float32 keeps small adapter changes that "
                        "rounding to bfloat16 would lose.")
    parser.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")
    return parser


def merge_lines(fused: int, gap: float, effect: float | None, prompts: int, requantized: bool, config: dict,
                dtype: str) -> list[str]:
    """What the merge did, measured: how far it moved the logits, against how far the adapters move them."""
    what = f"{fused} adapter layers merged" if fused else "full fine-tuned weights"
    lines = [f"Merged ({what}): the fused model's logits differ from the adapter model's by at most {gap:.1e} on "
             f"{prompts} held-out prompts" + (f"; the adapters themselves move them by up to {effect:.2f}." if effect
                                              else ".")]
    if requantized:
        bits = config.get("quantization", {}).get("bits", "?")
        lines.append(f"The base model is quantized ({bits}-bit): each adapter was added to the dequantized weight "
                     "and the sum quantized again, which costs the difference above. --dequantize keeps the fused "
                     "weights in float instead (larger, exact).")
    if effect and gap > 0.1 * effect:
        remedy = "--dequantize" if requantized else "--dtype float32"
        lines.append(f"WARNING: the merge lost part of what training changed (rounding to {dtype} or to the "
                     f"quantized grid); export again with {remedy} to keep it.")
    return lines


def probe_prompts(cfg, tokenizer) -> list[list[int]]:
    """A few of the run's held-out prompts as the model saw them in training (any prompt when the
    run's data has no held-out split)."""
    from mlx_grpo.data import build_prompt_tokens
    from mlx_grpo.evaluate import held_out_items

    try:
        items = held_out_items(cfg)[:PROBE_PROMPTS]
    except UserInputError:
        items = []
    return [build_prompt_tokens(tokenizer, item, cfg.data.system_prompt or None) for item in items or [FALLBACK_PROMPT]]


def source_model(path: str, dtype: str) -> tuple[Path, dict]:
    """The base model's local directory and its config.json, found before the slow load."""
    from mlx_lm.utils import hf_repo_to_path, load_config

    from mlx_grpo.models import is_hf_id, resolve_model_path

    resolved = resolve_model_path(path, dtype)
    directory = Path(hf_repo_to_path(resolved)) if is_hf_id(resolved) else Path(resolved)
    return directory, load_config(directory)


def run_export(args, console) -> int:
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    from mlx_grpo.evaluate import load_run_adapters
    from mlx_grpo.export import (is_quantized, merge_adapters, modelfile_text, ollama_name,
                                 save_fused_dir, save_gguf)
    from mlx_grpo.fileio import atomic_write
    from mlx_grpo.gguf.convert import resolve_dtype
    from mlx_grpo.gguf.writer import check_exportable
    from mlx_grpo.models import load_model

    run_dir = trained_run(args.run, Config().train.output_dir)
    cfg = load_run_config(run_dir)
    out = Path(args.output) if args.output else run_dir / "export"
    dtype = args.dtype or cfg.model.dtype
    with console.status(f"Loading {cfg.model.path} ({dtype}) and the adapters of {run_dir}..."):
        source_dir, config = source_model(cfg.model.path, dtype)
        if args.gguf:
            check_exportable(config)  # refuse before the slow part
        model, tokenizer, _ = load_model(cfg.model.path, dtype)
        load_run_adapters(model, run_dir)

    with console.status("Merging the adapters into the weights..."):
        prompts = probe_prompts(cfg, tokenizer)
        quantized = is_quantized(model)
        fused, gap, effect = merge_adapters(model, prompts, args.dequantize)
        if args.dequantize:
            config.pop("quantization", None)
            config.pop("quantization_config", None)

    mlx_dir = out / "mlx"
    with console.status(f"Writing {mlx_dir}..."):
        save_fused_dir(model, tokenizer, config, source_dir, mlx_dir)
    requantized = quantized and not args.dequantize
    for line in merge_lines(fused, gap, effect, len(prompts), requantized, config, resolve_dtype(dtype)):
        console.print(line, soft_wrap=True, markup=False)

    name = ollama_name(run_dir.name)
    gguf_path = modelfile = None
    if args.gguf:
        gguf_path, modelfile = out / f"{name}-{args.gguf}.gguf", out / "Modelfile"
        console.print(f"Writing {gguf_path}...", soft_wrap=True, markup=False)
        # GGUF holds float weights: a requantized model is written as the values its mlx-lm folder holds.
        weights = dict(tree_flatten(dequantize_model(model).parameters()))
        save_gguf(weights, config, mlx_dir, gguf_path, args.gguf, name)
        text = modelfile_text(gguf_path.name, name, tokenizer, cfg.data.system_prompt)
        atomic_write(modelfile, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        console.print(f"GGUF ({args.gguf}, {gguf_path.stat().st_size / 1e6:.0f} MB): {gguf_path}", soft_wrap=True,
                      markup=False)
    for line in usage_lines(mlx_dir, gguf_path, modelfile, name):
        console.print(line, soft_wrap=True, markup=False)
    return 0


def usage_lines(mlx_dir: Path, gguf_path: Path | None, modelfile: Path | None, name: str) -> list[str]:
    """How to run what was written, in each tool."""
    lines = [f"  mlx-lm:    uv run mlx_lm.generate --model {mlx_dir} --prompt \"...\"",
             f"  LM Studio (MLX engine): copy {mlx_dir} to ~/.lmstudio/models/mlx-grpo/{name}/"]
    if gguf_path is not None:
        lines += [f"  Ollama:    ollama create {name} -f {modelfile} && ollama run {name}",
                  f"  LM Studio: lms import {gguf_path}",
                  f"  llama.cpp: llama-cli -m {gguf_path} -cnv"]
    else:
        lines.append("  For Ollama, LM Studio's GGUF engine or llama.cpp add --gguf f16 (or q8_0).")
    return lines


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = sys.argv[1:] if argv is None else argv
    console = Console()
    return with_one_line_errors(lambda: run_export(build_parser().parse_args(argv), console), debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
