"""Errors a user can act on. The CLI prints the message as one line on stderr and exits with the
error's `exit_status`, so a script can tell the refusals apart:

    2  bad input or usage (a folder, file, option or checkpoint that cannot be used as given)
    5  the delta or the result does not belong to this checkpoint (made for another one)
    6  a weight file changed on disk while the job ran; nothing was written
    7  the checkpoint is busy: another fastunlearn job holds its lock
    8  writing failed (disk full, I/O error); the old bytes were put back

`verify` adds 3 (the byte proof failed) and 4 (a requested threshold failed); see verify.py.
"""

EXIT_PROOF_FAILED = 3
EXIT_THRESHOLD_FAILED = 4


class UserError(Exception):
    """Bad input or a refused operation: one line, what is wrong and what to do."""

    exit_status = 2


class WrongCheckpoint(UserError):
    exit_status = 5


class CheckpointChanged(UserError):
    exit_status = 6


class CheckpointBusy(UserError):
    exit_status = 7


class WriteFailed(UserError):
    exit_status = 8
