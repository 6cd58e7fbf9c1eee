"""Programmatic reward checks: pure functions that score one completion against one sample.

Every check is `check(completion, sample, *, <params>) -> float` in [0, 1]. A rubric criterion's
`params:` mapping is passed as keyword arguments, so a check's keyword-only arguments (and their
defaults) are exactly the params a rubric may set; the rubric loader reads them from the signature.
Numeric params are non-negative amounts (credits, penalties, tolerances).

Checks never raise on odd completion text (empty, unicode, huge): the policy writes anything.
A sample they cannot score against (no answer, a non-numeric answer for `number_check`) is a
problem with the user's dataset or rubric and raises `UserInputError`.

The expected completion format is `<reasoning>...</reasoning><answer>...</answer>`.
"""

from __future__ import annotations

import functools
import math
import re

from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards.code_checks import python_tests

_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
_OPEN, _CLOSE = "<answer>", "</answer>"

# A number: optional sign, digits with optional thousands commas, optional decimals. The lookbehind
# stops "3-5" reading as "-5" and "1.5" yielding a second number "5"; the lookahead stops partial digits.
_NUMBER = r"[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?"
_NUMBER_RE = re.compile(rf"(?<![0-9.]){_NUMBER}(?![0-9])")
_FULL_NUMBER_RE = re.compile(rf"\s*{_NUMBER}\s*")
_UNICODE_MINUS = str.maketrans({"\u2212": "-"})


def extract_answer(completion: str) -> str | None:
    """The stripped text inside the last `<answer>...</answer>`, or None if there is none.

    Uses rfind rather than a regex so a huge completion full of stray tags stays linear.
    """
    end = completion.rfind(_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(_OPEN, 0, end)
    if start < 0:
        return None
    return completion[start + len(_OPEN) : end].strip()


def format_exact(completion: str, sample: dict) -> float:
    """1.0 iff the stripped completion is exactly `<reasoning>…</reasoning>` then `<answer>…</answer>`.

    Each tag must appear exactly once, only whitespace may separate `</reasoning>` from `<answer>`,
    and nothing may precede `<reasoning>` or follow `</answer>`. The contents may be anything
    (even empty): correctness is other criteria's job. Otherwise 0.0.
    """
    text = completion.strip()
    if any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    if not (text.startswith("<reasoning>") and text.endswith("</answer>")):
        return 0.0
    close_reasoning = text.index("</reasoning>")
    open_answer = text.index("<answer>")
    if close_reasoning > open_answer:
        return 0.0
    between = text[close_reasoning + len("</reasoning>") : open_answer]
    return 1.0 if not between.strip() else 0.0


def _in_block_position(text: str, tag: str) -> bool:
    """Closing tags always; an opening tag only at a line start or right after a closing tag."""
    if tag.startswith("</"):
        return True
    before = text[: text.find(tag)].rstrip(" \t")
    return before == "" or before.endswith(("\n", "</reasoning>", "</answer>"))


def format_approx(completion: str, sample: dict, *, trailing_penalty: float = 0.001) -> float:
    """Partial format credit, so a small model is rewarded for each step towards the format.

    score = 0.25 × (how many of <reasoning>, </reasoning>, <answer>, </answer> appear exactly once)
            − trailing_penalty × len(text after the last </answer>, stripped)
    clamped to [0, 1]. With the default 0.001, 250 characters of rambling after the answer cost
    as much as one missing tag. Tag order is not checked here (format_exact does that).
    An opening tag counts only where it opens a block: at the start of a line or right after a
    closing tag. Otherwise a model earns the credit by echoing the instruction's prose
    ("think inside <reasoning>. Then ... inside <answer>."), which it learns within 20 steps.
    """
    score = 0.25 * sum(completion.count(tag) == 1 and _in_block_position(completion, tag) for tag in _TAGS)
    end = completion.rfind(_CLOSE)
    if end >= 0:
        trailing = completion[end + len(_CLOSE) :].strip()
        score -= trailing_penalty * len(trailing)
    return min(1.0, max(0.0, score))


def normalize(text: str) -> str:
    """Strip, collapse whitespace, casefold, and drop trailing periods ("The Cat. " -> "the cat")."""
    return " ".join(text.split()).casefold().rstrip(".").strip()


def _expected_text(sample: dict, check: str) -> str:
    answer = sample.get("answer")
    if answer is None or isinstance(answer, bool):
        raise UserInputError(f"{check}: a sample has no 'answer' field to compare with")
    return str(answer)


def _contains_word(haystack: str, needle: str) -> bool:
    # Whole word: not glued to letters/digits, and "12" must not match inside "12.5" or "-12".
    pattern = rf"(?<![\w-])(?<!\w[.,]){re.escape(needle)}(?!\w)(?![.,]\w)"
    return re.search(pattern, haystack) is not None


def answer_check(
    completion: str,
    sample: dict,
    *,
    contained_credit: float = 0.5,
    untagged_credit: float = 0.25,
) -> float:
    """Text answer against `sample["answer"]`, both normalised (see `normalize`).

    1.0               the last <answer> tag equals the expected answer;
    contained_credit  the tag holds the expected answer as a whole word plus other text ("12 apples");
    untagged_credit   there is no <answer> tag, but the expected answer appears as a whole word
                      anywhere in the completion;
    0.0               otherwise, including a tag with a wrong answer even if the right one is
                      mentioned elsewhere (that would reward a wrong final answer).
    """
    expected = normalize(_expected_text(sample, "answer_check"))
    if not expected:
        raise UserInputError("answer_check: a sample's 'answer' is empty")
    tagged = extract_answer(completion)
    if tagged is None:
        return untagged_credit if _contains_word(normalize(completion), expected) else 0.0
    got = normalize(tagged)
    if got == expected:
        return 1.0
    return contained_credit if _contains_word(got, expected) else 0.0


def last_number(text: str) -> float | None:
    """The last number in `text` ("-1,234.5" -> -1234.5), or None. Very long digit runs give inf."""
    match = None
    for match in _NUMBER_RE.finditer(text.translate(_UNICODE_MINUS)):
        pass
    return None if match is None else float(match.group().replace(",", ""))


def numbers_in(text: str) -> list[float]:
    """Every number in `text`, in order, read as `last_number` reads one."""
    return [float(m.group().replace(",", "")) for m in _NUMBER_RE.finditer(text.translate(_UNICODE_MINUS))]


@functools.lru_cache(maxsize=4096)
def _parse_expected(answer: str) -> float:
    text = answer.translate(_UNICODE_MINUS)
    if _FULL_NUMBER_RE.fullmatch(text) is None:
        shown = answer if len(answer) <= 40 else answer[:40] + "..."
        raise UserInputError(
            f"number_check: a sample's answer {shown!r} is not a number; "
            "use answer_check for text answers"
        )
    return float(text.strip().replace(",", ""))


def number_check(
    completion: str,
    sample: dict,
    *,
    abs_tol: float = 0.0,
    rel_tol: float = 0.0,
    fallback_last_number: bool = True,
    untagged_credit: float = 0.5,
    closeness: float = 0.0,
    first_number: bool = False,
) -> float:
    """Numeric answer against `sample["answer"]` (which must be a number, e.g. "12" or "1,200.5").

    got = the last number inside the last <answer> tag ("12 apples" -> 12, "3+4=7" -> 7); a tag
    without a number scores 0. With no tag and fallback_last_number, got = the last number in
    the whole completion, and the score below is multiplied by untagged_credit.

    1.0  if |got − expected| <= max(rel_tol × max(|got|, |expected|), abs_tol) (math.isclose);
         the defaults (0, 0) mean exact equality of the parsed values, so "12.0" matches "12";
    else closeness × max(0, 1 − |got − expected| / max(|expected|, 1)): optional credit for being
         near (off by 100% or more earns nothing); off by default, so the default is all-or-nothing.
    first_number reads the first number instead of the last, for answers that state the number and
    then explain it ("98 is larger than 37 and 5").
    """
    expected = _parse_expected(_expected_text(sample, "number_check"))
    tagged = extract_answer(completion)
    pick = (lambda text: next(iter(numbers_in(text)), None)) if first_number else last_number
    if tagged is not None:
        got, credit = pick(tagged), 1.0
    elif fallback_last_number:
        got, credit = pick(completion), untagged_credit
    else:
        return 0.0
    if got is None:
        return 0.0
    if math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol):
        return credit
    if closeness <= 0 or math.isinf(got) or math.isinf(expected):
        return 0.0
    nearness = max(0.0, 1.0 - abs(got - expected) / max(abs(expected), 1.0))
    return credit * closeness * nearness


def short_answer(completion: str, sample: dict, *, max_words: int = 4, max_numbers: int = 1) -> float:
    """Rewards stopping once the answer is given: 1.0 for at most `max_words` words (whitespace-
    separated), falling linearly to 0.0 at three times that; 0.0 when the completion holds more
    than `max_numbers` numbers ("78, 78, 78, 78" repeats its answer; "62 is larger than 43" is
    not "just the number")."""
    if len(numbers_in(completion)) > max_numbers:
        return 0.0
    words = len(completion.split())
    if words <= max_words:
        return 1.0
    return max(0.0, 1.0 - (words - max_words) / (2 * max(max_words, 1)))


# The names a rubric's `check:` may use.
CHECKS = {
    "format_exact": format_exact,
    "format_approx": format_approx,
    "answer_check": answer_check,
    "number_check": number_check,
    "python_tests": python_tests,
    "short_answer": short_answer,
}
