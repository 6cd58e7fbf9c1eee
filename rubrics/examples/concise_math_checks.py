"""Reward checks for rubrics/examples/concise_math.yaml.

A check is fn(completion, sample, **params) -> a number in [0, 1], or None to leave the completion
out of the update. It runs in the trainer's process: it is your code, and it is trusted.
"""

import re

_EQUATION = re.compile(r"-?\d+(?:\.\d+)?\s*[-+*/x×]\s*-?\d+(?:\.\d+)?\s*=\s*-?\d+(?:\.\d+)?")


def shows_working(completion: str, sample: dict, max_lines: int = 4) -> float:
    """1.0 when the reasoning writes out at least one equation whose result is the sample's answer,
    in at most max_lines lines; 0.5 for an equation with another result; 0 otherwise.

    Unlike the answer check this rewards *how* the number was reached, so a model that copies a
    number from the prompt earns nothing here."""
    start, end = completion.find("<reasoning>"), completion.find("</reasoning>")
    if start < 0 or end < start:
        return 0.0
    reasoning = completion[start + len("<reasoning>"):end].strip()
    if not reasoning or len(reasoning.splitlines()) > max_lines:
        return 0.0
    equations = _EQUATION.findall(reasoning)
    if not equations:
        return 0.0
    answer = str(sample.get("answer", "")).strip()
    results = [eq.split("=")[-1].strip() for eq in equations]
    return 1.0 if answer in results else 0.5
