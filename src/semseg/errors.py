"""The one exception family that entry points report as a single clear line (no traceback)."""


def error_line(message: str) -> str:
    """How an entry point prints a :class:`UserError`: ``error: <message>``."""
    return f"error: {message}"


class UserError(RuntimeError):
    """A failure the user can act on (a bad path, config key or file; a diverged run).

    Entry points print its message as one line, without a traceback; the message says what to do.
    """


class ConfigError(UserError, KeyError):
    """A config key is missing or has a value that cannot work."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, refused or does not fit the model, or cannot be written."""
