"""Errors that describe a user's mistake rather than a bug in prunekit."""


class UserError(ValueError):
    """Bad input from the user (config, path, name, number).

    The message is one line that names the field and what was expected; the CLI prints it
    and exits with code 2 instead of showing a traceback.
    """
