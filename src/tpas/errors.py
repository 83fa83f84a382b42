"""Errors that the CLI reports as one line and a non-zero exit, instead of a traceback."""

__all__ = ["DataError", "TpasError"]


class TpasError(Exception):
    """A problem with the user's input (a file, a field, an option) that they can fix."""


class DataError(TpasError):
    """Bad dataset content. The message starts with ``path:line:`` where a line is known."""

    def __init__(self, message: str, path: object | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line
