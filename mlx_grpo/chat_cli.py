"""`uv run chat`: try a trained model, with the run's chat template, system prompt and adapters.

    uv run chat --run RUN_DIR|latest --prompt "What is 17 + 25?"     # one prompt, answer streamed, exit
    uv run chat --run latest                                       # interactive: multi-turn, until EOF/exit/quit
    uv run chat --run latest --compare base --prompt "..."         # the trained answer, then the base model's

The answers go to stdout as they are generated; loading messages and the per-answer statistics go
to stderr, so `uv run chat ... --prompt Q > answer.txt` keeps only the answer.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import mlx_grpo  # noqa: F401 (loads the optimised BLAS before mlx.core)
from mlx_grpo.cli import OneLineParser, trained_run, with_one_line_errors
from mlx_grpo.config import Config, load_run_config
from mlx_grpo.errors import UserInputError

QUIT_WORDS = ("exit", "quit")
# Longer than most runs' rollout.max_new_tokens (the demo's answers are a few tokens), to see what
# the model says to prompts unlike its training ones.
DEFAULT_MAX_NEW_TOKENS = 256


def build_parser():
    parser = OneLineParser(prog="chat", description="Chat with a trained run's model (its adapters, chat "
                           "template and system prompt): one --prompt, or interactively without one.")
    parser.add_argument("--run", metavar="RUN_DIR|latest", required=True,
                        help="A training run with saved adapters, or `latest`.")
    parser.add_argument("--prompt", metavar="TEXT", help="Answer this one prompt and exit (default: interactive).")
    parser.add_argument("--compare", choices=["base"], help="After each trained answer, the base model's answer "
                        "to the same conversation.")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"Answer length limit (default: {DEFAULT_MAX_NEW_TOKENS}).")
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature, 0 = greedy (default: 0).")
    parser.add_argument("--system", metavar="TEXT", help="System prompt (default: the run's data.system_prompt; "
                        "empty = none).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of sampling when --temperature > 0 (default: 0).")
    parser.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")
    return parser


def check_args(args) -> None:
    """Refuse bad values before the (slow) model load."""
    if args.prompt is not None and not args.prompt.strip():
        raise UserInputError("--prompt: the prompt is empty")
    if args.max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserInputError(f"--temperature must be a finite number >= 0, got {args.temperature}")


@dataclass
class Voice:
    """One model in the conversation: its label, how to switch it on, and its own history (with
    --compare each model answers its own earlier answers, not the other's)."""

    label: str
    model: object
    tokenizer: object
    active: Callable[[], ContextManager] = nullcontext
    history: list[dict] = field(default_factory=list)


def load_voices(cfg: Config, run_dir, compare: bool, status) -> list[Voice]:
    """The trained model and, with --compare, the base one: the same model with LoRA switched off,
    or a fresh load after a full fine-tune (whose weights replaced the base's)."""
    from mlx_grpo.adapters import adapters_disabled, has_lora
    from mlx_grpo.evaluate import load_run_adapters
    from mlx_grpo.models import load_model

    with status(f"Loading {cfg.model.path} ({cfg.model.dtype}) with the adapters of {run_dir}..."):
        model, tokenizer, _ = load_model(cfg.model.path, cfg.model.dtype)
        load_run_adapters(model, run_dir)
    voices = [Voice("trained", model, tokenizer)]
    if compare and has_lora(model):
        voices.append(Voice("base", model, tokenizer, active=lambda: adapters_disabled(model)))
    elif compare:
        with status(f"Loading the base model {cfg.model.path}..."):
            base, base_tokenizer, _ = load_model(cfg.model.path, cfg.model.dtype)
        voices.append(Voice("base", base, base_tokenizer))
    return voices


def stream_answer(voice: Voice, tokens: list[int], max_new_tokens: int, sampler) -> tuple[str, object]:
    """Generate the answer, printing each piece as it arrives; (answer text, last response)."""
    from mlx_lm import stream_generate

    pieces, last = [], None
    try:
        with voice.active():
            for last in stream_generate(voice.model, voice.tokenizer, prompt=tokens, max_tokens=max_new_tokens,
                                        sampler=sampler):
                print(last.text, end="", flush=True)
                pieces.append(last.text)
    finally:
        print(flush=True)  # ends the answer's line, also when Ctrl-C cuts it short
    return "".join(pieces), last


def answer_turn(voices: list[Voice], user_text: str, turn: int, settings: dict, err_console) -> None:
    """Every voice answers the user's message, after the conversation it has had so far."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from mlx_grpo.data import chat_prompt_tokens

    top_p = settings["top_p"]
    sampler = make_sampler(temp=settings["temperature"], top_p=top_p if top_p < 1.0 else 0.0)
    for voice in voices:
        if len(voices) > 1:
            print(f"{voice.label}:", flush=True)
        voice.history.append({"role": "user", "content": user_text})
        tokens = chat_prompt_tokens(voice.tokenizer, settings["system"], voice.history)
        # The same seed for every voice of a turn: with --compare both models draw the same random stream.
        mx.random.seed(settings["seed"] + turn)
        text, last = stream_answer(voice, tokens, settings["max_new_tokens"], sampler)
        voice.history.append({"role": "assistant", "content": text})
        err_console.print(answer_stats(last, len(tokens)), style="dim", markup=False, soft_wrap=True)


def answer_stats(last, prompt_length: int) -> str:
    """'(12 tokens, 45.1 tokens/s, prompt 30 tokens)', and whether the length limit cut the answer."""
    count = last.generation_tokens - (last.finish_reason == "stop")  # the EOS token is not in the answer
    rate = f", {last.generation_tps:.1f} tokens/s" if count else ""  # no rate for an empty answer
    cut = ", cut at --max-new-tokens" if last.finish_reason == "length" else ""
    return f"({count} tokens{rate}, prompt {prompt_length} tokens{cut})"


def read_messages():
    """The user's messages, one a line, until end of input or exit/quit; blank lines are skipped."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(flush=True)
            return
        except KeyboardInterrupt:
            print(flush=True)  # "interrupted" on a line of its own
            raise
        if line.lower() in QUIT_WORDS:
            return
        if line:
            yield line


def run_chat(args, err_console) -> int:
    check_args(args)
    run_dir = trained_run(args.run, Config().train.output_dir)
    cfg = load_run_config(run_dir)
    settings = {"max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "top_p": cfg.rollout.top_p, "seed": args.seed,
                "system": (cfg.data.system_prompt if args.system is None else args.system) or None}
    voices = load_voices(cfg, run_dir, args.compare == "base", err_console.status)
    if args.prompt is not None:
        answer_turn(voices, args.prompt, 0, settings, err_console)
        return 0
    err_console.print(f"Chatting with {run_dir} ({', '.join(v.label for v in voices)}); "
                      "type exit or quit, or press Ctrl-D, to leave.", soft_wrap=True, markup=False)
    for turn, message in enumerate(read_messages()):
        answer_turn(voices, message, turn, settings, err_console)
    return 0


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = sys.argv[1:] if argv is None else argv
    err_console = Console(stderr=True)
    return with_one_line_errors(lambda: run_chat(build_parser().parse_args(argv), err_console),
                                debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
