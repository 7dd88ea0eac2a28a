"""Errors that mean "the user asked for something that cannot be done": the CLI prints their message
(which names the key, file or line and the fix) without a traceback."""


class UserError(Exception):
    """Base of every error whose message is meant for the user."""


class ConfigError(UserError, ValueError):
    """A user mistake in the configuration. The message says which key and how to fix it."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))
