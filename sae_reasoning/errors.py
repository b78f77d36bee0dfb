"""User-facing errors: each carries one line naming what is wrong and how to fix it.

Entry points catch `UserError` and print just that line (no traceback) with a non-zero exit code.
"""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, unreachable hub id, malformed data)."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration value."""


class DataError(UserError):
    """Malformed input data; the message names file:line and the field."""


class ModelLoadError(UserError):
    """A model that cannot be loaded (missing folder, hub unreachable, wrong architecture)."""
