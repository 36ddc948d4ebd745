"""The error type for mistakes a user can fix: shown as one paragraph, without a traceback."""


class UserError(Exception):
    """A bad value, file or combination the user can correct; the message says what, which, and what to do."""
