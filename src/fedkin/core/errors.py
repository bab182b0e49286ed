"""Errors that the CLI turns into one clear line and exit code 2 (no traceback)."""


class UserError(Exception):
    """Bad input from the user (a config key, a file, a flag); the message says how to fix it."""


class ConfigError(UserError):
    """An invalid experiment configuration (unknown key, wrong type, impossible value)."""


class DataError(UserError):
    """Input data that cannot be used (missing files, empty partitions, malformed CSV)."""


class RunFailure(RuntimeError):
    """A run cannot go on (diverged, workers lost); the CLI prints it and exits 1, and the last
    checkpoint stays usable."""


class NonFiniteModelError(RunFailure):
    """The population model became NaN/Inf; the run stops and the last good checkpoint stays."""
