"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class MnistTuneError(Exception):
    """A problem the user can fix (bad input, missing data, unreachable server).

    Raised before anything is written wherever possible; the CLI prints ``error: <message>``
    and exits with status 2. Anything else that escapes is a bug and keeps its traceback.
    """
