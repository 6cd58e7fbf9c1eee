"""The GGUF header: its metadata read straight from the file, without loading any tensor."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import mlx.core as mx

from mlx_grpo.errors import UserInputError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")

# GGUF scalar value types -> struct format (the spec's type ids).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def check_arch(arch: str, where: str | Path) -> None:
    if arch not in SUPPORTED_ARCHS:
        raise UserInputError(
            f"GGUF {where}: architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )


def scalar(metadata: dict, key: str, default=None):
    """A metadata value as a Python scalar (MLX's reader gives 0-d arrays)."""
    value = metadata.get(key, default)
    return value.item() if isinstance(value, mx.array) else value


def gguf_architecture(path: Path) -> str:
    """Read `general.architecture` from a GGUF header, without loading any tensor."""
    arch = gguf_header(path, until=lambda found: "general.architecture" in found).get("general.architecture")
    if not isinstance(arch, str):
        raise UserInputError(f"GGUF {path}: metadata has no general.architecture")
    return arch


def gguf_header(path: Path, until=None) -> dict:
    """The scalar and string metadata of a GGUF header (arrays are skipped), without loading any
    tensor; reading stops early once `until(found)` is true."""

    def read(f, fmt):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack(fmt, data)[0]

    def read_str(f):
        n = read(f, "<Q")
        data = f.read(n)
        if len(data) != n:
            raise EOFError
        return data.decode("utf-8", errors="replace")

    def skip(f, vtype):
        if vtype == _GGUF_STRING:
            f.seek(read(f, "<Q"), os.SEEK_CUR)
        elif vtype == _GGUF_ARRAY:
            item_type, count = read(f, "<I"), read(f, "<Q")
            if item_type in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[item_type]), os.SEEK_CUR)
            else:
                for _ in range(count):
                    skip(f, item_type)
        elif vtype in _GGUF_SCALARS:
            f.seek(struct.calcsize(_GGUF_SCALARS[vtype]), os.SEEK_CUR)
        else:
            raise ValueError(f"unknown value type {vtype}")

    found: dict = {}
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserInputError(f"GGUF {path}: not a GGUF file (bad magic bytes)")
            version = read(f, "<I")
            if version < 2:
                raise UserInputError(f"GGUF {path}: GGUF version {version} is too old; re-convert it with llama.cpp")
            read(f, "<Q")  # tensor count
            for _ in range(read(f, "<Q")):
                key, vtype = read_str(f), read(f, "<I")
                if vtype == _GGUF_STRING:
                    found[key] = read_str(f)
                elif vtype in _GGUF_SCALARS:
                    found[key] = read(f, _GGUF_SCALARS[vtype])
                else:
                    skip(f, vtype)
                if until is not None and until(found):
                    break
    except (EOFError, ValueError, struct.error) as err:
        raise UserInputError(f"GGUF {path}: truncated or corrupt header ({err or 'unexpected end of file'})") from None
    except OSError as err:
        raise UserInputError(f"GGUF {path}: cannot read ({err.strerror})") from None
    return found
