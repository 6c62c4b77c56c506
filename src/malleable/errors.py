"""Error types. Anything the user can fix is a `MalleableError`; the CLI prints it as one line and exits 2."""


class MalleableError(Exception):
    """A problem with the user's input, recipe or output path (not a bug in malleable)."""


class InputError(MalleableError):
    """An input file is missing, corrupt, or incompatible with the other inputs."""


class RecipeError(MalleableError):
    """A recipe is malformed: unknown key, bad value, impossible parameter."""


class OutputError(MalleableError):
    """The output path exists (without --force) or cannot be written."""


def reason(e: BaseException, typed: bool = False) -> str:
    """What a user can act on in a library's exception: the first line of its message (libraries' messages run on
    for pages), at most 200 characters, after its type's name when `typed`; the type's name alone when empty."""
    text = str(e).strip()
    line = text.splitlines()[0][:200] if text else ""
    if not line:
        return type(e).__name__
    return f"{type(e).__name__}: {line}" if typed else line
