"""The project's own error type: the CLI prints its message and exits non-zero, no traceback."""


class GrainlabError(Exception):
    """An error a user can act on: the message names the file or key, the value and what was expected."""
