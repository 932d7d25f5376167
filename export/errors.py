"""The one error type of the export stage: bad input, reported as one line with exit code 2."""


class ExportError(ValueError):
    """A refused export: the message names the file and the reason; nothing was written."""
