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
