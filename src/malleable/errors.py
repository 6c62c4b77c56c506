"""Error types. Anything the user can fix is a `MalleableError`; the CLI prints it as one line and exits 2."""


class MalleableError(Exception):
    """A problem with the user's input, recipe or output path (not a bug in malleable)."""


class InputError(MalleableError):
    """An input file is missing, corrupt, or incompatible with the other inputs."""


class RecipeError(MalleableError):
    """A recipe is malformed: unknown key, bad value, impossible parameter."""


class OutputError(MalleableError):
    """The output path exists (without --force) or cannot be written."""
