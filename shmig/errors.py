"""The one exception every layer may raise for bad input, kept apart so that any module can raise
it without importing the configuration (which imports the policies)."""


class ConfigError(ValueError):
    """Bad input: one line that says what to change."""
