"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class MnistTuneError(Exception):
    """A problem the user can fix (bad input, missing data, unreachable server) or a run that
    ended badly (a diverged run: exit status 1).

    Raised before anything is written wherever possible; the CLI prints ``error: <message>``
    and exits with ``exit_code``. Anything else that escapes is a bug and keeps its traceback.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
