"""The one exception type g4c raises for bad user input.

Anything a user can get wrong (a malformed config, a missing tensor, an unknown preset, a token id out
of range) raises `G4CError` with a one-line message that names the culprit and, where possible, says
what to do next. The CLI prints that line to stderr and exits non-zero; programming errors stay normal
Python exceptions with tracebacks.
"""


class G4CError(Exception):
    """A user-facing error: the message is one line, suitable for stderr."""


class ConfigError(G4CError):
    """An invalid or inconsistent model configuration; the message names the field."""


class WeightError(G4CError):
    """A missing, unexpected, mis-shaped or unreadable weight tensor."""
