"""The one exception type users see.

Anything raised as :class:`LatentLMError` is a problem with the user's input or environment
(bad config value, mismatched manifest, missing file). The CLI prints its message as one line
and exits non-zero; every other exception is a bug and keeps its traceback.
"""


class LatentLMError(Exception):
    """A user-facing error whose message says what is wrong and how to fix it."""


class Interrupted(LatentLMError):
    """Work stopped on request (SIGINT / SIGTERM) after saving what a resume needs.

    The CLI exits with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), the shell's
    convention for "ended by this signal", so schedulers and scripts can tell an orderly stop
    from a finished run (0) and from an error (2)."""

    def __init__(self, message: str, signum: int, resume: str = ""):
        super().__init__(f"{message}; {resume}" if resume else message)
        self.message, self.signum, self.resume = message, signum, resume
        self.exit_code = 128 + signum

    def with_resume(self, resume: str) -> "Interrupted":
        """The same stop with another way to continue (a driver that resumes by itself says its own)."""
        return Interrupted(self.message, self.signum, resume)
