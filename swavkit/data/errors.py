"""The error every data problem raises (the CLI prints it as one line and exits with 2)."""


class DataError(ValueError):
    """A data problem, described in one line naming the file or folder."""
