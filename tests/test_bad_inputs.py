"""The bad-input corpus in tests/data/bad/: every malformed input fails before the model loads.

One case per file, `NN_name.<kind>`, whose first line is `# expect: <fragment of the message>`:

    *.config.yaml   train --config FILE
    *.rubric.yaml   train --rubric FILE
    *.jsonl         train --data FILE
    *.args          train ARG ARG ... (one argument per line)

and `--train.output_dir OUT` is appended. The header line is fed as a blank line, so line numbers
in the messages are those of the file on disk. Every case must exit 2 with exactly one line
`error: ...` on stderr, no traceback, and no run directory.
"""

import json
import re
import struct
from pathlib import Path

import pytest

import mlx_grpo.cli as cli
import mlx_grpo.models as models
from mlx_grpo.cli import train_main
from mlx_grpo.errors import UserInputError
from mlx_grpo.models import model_context_length, validate_generation_length

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).parent / "data" / "bad"
FLAGS = {".config.yaml": "--config", ".rubric.yaml": "--rubric", ".jsonl": "--data", ".args": None}
SECRET = "sk-corpus-0123456789abcdef"  # the api_key literal of the api_key case: never echoed
UNSET = "MLX_GRPO_BAD_INPUTS_UNSET"  # the ${VAR} of the interpolation case

def split_case(path: Path) -> tuple[str, bytes]:
    """(expected fragment, what is fed: the file with its header line blanked)."""
    header, _, payload = path.read_bytes().partition(b"\n")
    match = re.fullmatch(r"# expect: (.+)", header.decode("utf-8").strip())
    assert match, f"{path.name}: the first line must be '# expect: <fragment>'"
    return match.group(1), b"\n" + payload


def argv_for(path: Path, payload: bytes, tmp_path: Path) -> list[str]:
    flag = next(FLAGS[ext] for ext in FLAGS if path.name.endswith(ext))
    if flag is None:
        return [line.strip() for line in payload.decode("utf-8").splitlines() if line.strip()]
    fed = tmp_path / path.name  # same name, so messages name the corpus file
    fed.write_bytes(payload)
    return [flag, str(fed)]


def test_corpus_is_well_formed():
    names = sorted(p.name for p in CORPUS.iterdir())
    assert len(names) >= 30
    assert all(re.fullmatch(r"\d\d_\w+(\.config\.yaml|\.rubric\.yaml|\.jsonl|\.args)", n) for n in names), names
    assert len({n[:2] for n in names}) == len(names), "case numbers must be unique"
    fragments = [split_case(CORPUS / n)[0] for n in names]
    assert len(set(fragments)) == len(fragments), "each case needs its own fragment"
    assert sum(SECRET.encode() in (CORPUS / n).read_bytes() for n in names) == 1


@pytest.mark.parametrize("case", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_bad_input_is_one_line_error(case, tmp_path, capsys, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError(f"{case.name}: passed validation; the run would start and load the model")

    monkeypatch.chdir(REPO)  # the default config and rubric are repo-relative
    monkeypatch.delenv(UNSET, raising=False)
    monkeypatch.setattr(cli, "start_scorer", started)
    monkeypatch.setattr(models, "load_model", started)
    expect, payload = split_case(case)
    out = tmp_path / "logs"

    code = train_main(argv_for(case, payload, tmp_path) + ["--train.output_dir", str(out)])

    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert expect in captured.err, captured.err
    assert "Traceback" not in captured.out + captured.err
    assert SECRET not in captured.out + captured.err
    assert not (out / "runs").exists()


# ---------------------------------------------------------------------------------------------
# The context window, read without loading weights


def gguf_with_context(path: Path, arch: str, context: int) -> Path:
    def text(s):
        return struct.pack("<Q", len(s)) + s.encode()

    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 3)
    data += text("general.architecture") + struct.pack("<I", 8) + text(arch)
    data += text("tokenizer.ggml.merges") + struct.pack("<IIQ", 9, 8, 1) + text("a b")  # an array: skipped
    data += text(f"{arch}.context_length") + struct.pack("<II", 4, context)
    path.write_bytes(data)
    return path


def test_model_context_length_without_loading(tmp_path):
    assert model_context_length("smollm2-135m-instruct") == 8192
    assert model_context_length(str(gguf_with_context(tmp_path / "m.gguf", "qwen2", 4096))) == 4096
    for config, expected in (({"max_position_embeddings": 2048}, 2048), ({"n_ctx": 1024}, 1024), ({}, None)):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert model_context_length(str(tmp_path)) == expected
    assert model_context_length("no-such-org/no-such-model-mlx-grpo") is None  # not downloaded: unknown


def test_validate_generation_length(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    validate_generation_length(str(tmp_path), 512)
    validate_generation_length("no-such-org/no-such-model-mlx-grpo", 10**6)  # unknown context: no check
    with pytest.raises(UserInputError, match=r"^config: rollout.max_new_tokens 513 exceeds the model's context "
                                             r"window of 512 tokens$"):
        validate_generation_length(str(tmp_path), 513)
