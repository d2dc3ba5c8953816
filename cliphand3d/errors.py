"""The exception a config value that cannot work raises.

Scripts print its message alone (cli.friendly_errors: `error: ...`, exit code 1), without the traceback a
programming error keeps; so a module raises it only where the bad value came from the user's config or
command line, and its message names that key and the fix. A ValueError, so callers that catch ValueError
still do. Kept free of imports: every leaf module may raise it.
"""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""
