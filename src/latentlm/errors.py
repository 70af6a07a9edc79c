"""The one exception type users see.

Anything raised as :class:`LatentLMError` is a problem with the user's input or environment
(bad config value, mismatched manifest, missing file). The CLI prints its message as one line
and exits non-zero; every other exception is a bug and keeps its traceback.
"""


class LatentLMError(Exception):
    """A user-facing error whose message says what is wrong and how to fix it."""
