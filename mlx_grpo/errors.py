"""The one exception type for bad user input.

Anything the user can get wrong (config, CLI flags, rubric, dataset, model path) raises
`UserInputError` with a single-line message naming the file and field. The CLI prints it and
exits 2, without a traceback.
"""


class UserInputError(ValueError):
    """A problem with user-provided input. `str(err)` is one human-readable line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def first_line(err: BaseException) -> str:
    """'ErrorType: the first line of its message', to quote a library's error inside one line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}{' ...' if len(lines) > 1 else ''}"
