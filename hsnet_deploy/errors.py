"""The one user-error type: the CLI turns it into `Error: <message>` and exit status 2."""


class UserError(ValueError):
    """Bad input or bad usage that the user can fix; the message names the file or value and what is wrong.

    Subclasses ValueError so library callers who never heard of hsnet-deploy can still catch it.
    """


class GateFailure(RuntimeError):
    """A precision variant failed its accuracy gate: nothing is written, the CLI exits 1."""
