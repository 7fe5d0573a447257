"""Errors meant for the operator: the CLI prints their message without a traceback."""


class ApplianceError(Exception):
    """A problem the user can act on; its message says what went wrong and what to do."""
