"""User-facing errors: each becomes exit code 2 and one line on stderr."""


class UserError(Exception):
    """Bad input from the user; the message is the whole story (file:line:field: reason)."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass
