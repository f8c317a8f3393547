"""The one exception type whose message is shown to the user as is (one line, exit code 2)."""


class UserError(Exception):
    """Bad input: a config key, a path, a resolution, a reward spec. The message says what to do."""
