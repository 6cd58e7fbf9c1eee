"""`${VAR}` / `${VAR:-default}` environment interpolation in the string values of parsed YAML.

Done after parsing, on string values only, so an environment value can never change the YAML
structure and comments are never touched. Values stay strings (no re-parsing as numbers).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def interpolate(value, env: Mapping[str, str] | None = None):
    """`value` with every `${VAR}` in its strings replaced; dicts and lists are walked.

    `${VAR:-default}` uses `default` when VAR is unset or empty, `${VAR-default}` only when it is
    unset, so VAR= can choose an empty value (both as in the shell). Raises
    ValueError (a one-line message for the caller to prefix with file and field) when a `${VAR}`
    without default is unset, or when a `${` does not form a valid reference.
    """
    env = os.environ if env is None else env
    if isinstance(value, str):
        return _interpolate_str(value, env)
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    return value


def _interpolate_str(text: str, env: Mapping[str, str]) -> str:
    if "${" not in text:
        return text
    if "${" in _REF.sub("", text):
        raise ValueError(f"malformed ${{...}} reference in {text!r}; write ${{NAME}} or ${{NAME:-default}}")

    def replace(match: re.Match) -> str:
        name, dash, default = match.group(1), match.group(2), match.group(3)
        found = env.get(name)
        if found or (found is not None and dash == "-"):  # ${VAR-default}: set-but-empty is kept
            return found
        if default is not None:
            return default
        if found is not None:  # set but empty, and no default: an empty string is what was asked
            return found
        raise ValueError(f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)")

    return _REF.sub(replace, text)
