"""User-facing errors. Their message is shown as is: in the UI as a visible message,
in the CLI as one line on stderr with exit code 2."""


class ExplorerError(ValueError):
    """A user-facing error: the message is shown as is."""


class DataError(ExplorerError):
    """A data set name or file that cannot be used."""


class ModelError(ExplorerError):
    """A model name, directory or architecture that cannot be used."""


class Cancelled(Exception):
    """Raised inside a long computation when the user pressed Stop."""


OOM_HINT = ("out of GPU memory: use fewer calibration samples, a smaller batch size or a shorter "
            "max length (or run on the CPU)")


def is_oom(e: BaseException) -> bool:
    """CUDA (or CPU allocator) out-of-memory, whatever the torch version calls it."""
    import torch  # local: the CLI imports this module before it parses arguments, torch only after
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
