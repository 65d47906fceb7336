"""The project's own error type: the CLI prints its message and exits non-zero, no traceback."""


class GrainlabError(Exception):
    """An error a user can act on: the message names the file or key, the value and what was expected."""


MAX_VALUE_CHARS = 80  # a value quoted in an error message is cut to this many characters


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """`text` on one line, cut to `limit` characters with '...' at the end."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value, limit: int = MAX_VALUE_CHARS) -> str:
    """repr(value) for an error message: at most `limit` characters, huge values never rendered whole."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 6, 6
    r.maxstring, r.maxlong, r.maxother = limit, 40, limit
    try:
        text = r.repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        text = f"<{type(value).__name__} of {value.bit_length()} bits>" if isinstance(value, int) else "<?>"
    return clip(text, limit)


def load_error_reason(exc: BaseException) -> str:
    """Why torch.load failed, on one line, without torch's advice to retry with weights_only=False
    (running a foreign pickle's code is never the fix here)."""
    advice = ("weights_only", "weights only", "please file an issue", "check the documentation of torch.load")
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not any(a in line.lower() for a in advice)]
    reason = " ".join(kept) or ("the file ends early" if isinstance(exc, EOFError) else "")
    return clip(f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__, 200)
