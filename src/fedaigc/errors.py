"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (a path, a config value, a file): say what and where, no traceback."""


class RunFailed(Exception):
    """A run that could not go on (e.g. no client answered a round): one line, exit code 1."""
