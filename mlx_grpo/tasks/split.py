"""The train / held-out split of the built-in tasks."""

from __future__ import annotations

import hashlib


def split_of(text: str, test_every: int = 10) -> str:
    """Stable split from the text itself: the same text always lands in the same split.

    About one text in `test_every` is "test".
    """
    return "test" if int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % test_every == 0 else "train"
