"""The two ways qexport refuses: bad input (exit 2) and a failed verification (exit 1)."""


class InputError(Exception):
    """Bad input or usage. The message is one line naming the file, tensor or option and the problem."""

    exit_code = 2


class VerificationFailed(Exception):
    """A verification check failed; the message names the check and by how much."""

    exit_code = 1
