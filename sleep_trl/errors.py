"""The errors a user can cause: each says what is wrong and how to fix it, and the command line prints it as one
message (exit status 2) instead of a traceback. Tracebacks are for bugs."""


class SleepTrlError(ValueError):
    """An expected user error (bad recipe, bad data, a run directory in use, a diverged phase, ...)."""
