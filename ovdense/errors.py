"""The one exception type that users of ovdense see.

Every error caused by the user's input (a missing file, an unreadable image, an empty class
list, an unknown method, weights that cannot be found) is raised as :class:`OvdenseError`
with a message that says what went wrong and what to do. The CLI prints it as one line and
exits non-zero. Bugs inside the library raise ordinary exceptions.
"""


class OvdenseError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


# Sentences of torch's own load errors that advise unpickling (``weights_only=False``) or
# allow-listing globals: ovdense reads only plain tensors, so it never repeats that advice.
_UNPICKLING_ADVICE = (
    "weights_only", "safe_globals", "add_safe_globals", "arbitrary code", "trusted source",
    "file an issue", "documentation of torch.load", "http://", "https://",
)


def checkpoint_error_text(error: BaseException) -> str:
    """One line describing why ``torch.load(weights_only=True)`` or safetensors refused a file,
    without torch's advice to load it with ``weights_only=False`` (which would run any code the
    pickle holds) or to allow-list its globals.

    ``"Weights only load failed. … WeightsUnpickler error: Unsupported global: GLOBAL
    posix.system …"`` becomes ``"UnpicklingError: Unsupported global: GLOBAL posix.system"``.
    """
    text = str(error).replace("WeightsUnpickler error:", "\n")
    kept = []
    for line in text.splitlines():
        sentences = [s.strip() for s in line.replace(". ", ".\n").splitlines()]
        kept += [s for s in sentences
                 if s and s != "Weights only load failed." and not any(a in s for a in _UNPICKLING_ADVICE)]
    reason = " ".join(" ".join(kept).split())
    if len(reason) > 200:
        reason = reason[:197] + "…"
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


def strip_unpickling_advice(message: str) -> str:
    """``message`` without any sentence that advises ``weights_only=False`` or allow-listing
    globals (for messages that already embed a torch error's text)."""
    if not any(a in message for a in _UNPICKLING_ADVICE[:3]):
        return message
    sentences = [s for s in message.replace(". ", ".\n").replace("WeightsUnpickler error:", "\n").splitlines()
                 if not any(a in s for a in _UNPICKLING_ADVICE) and s.strip() != "Weights only load failed."]
    return " ".join(" ".join(sentences).split())
