"""One exception type for every user-facing problem, so callers (nodes, CLI, WebUI tab) can show it cleanly."""


class TwigError(ValueError):
    """A problem with user input or a weight file. The message names the file, field or value at fault."""
