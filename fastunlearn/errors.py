class UserError(Exception):
    """Bad input or a refused operation: the CLI prints the message as one line and exits 2."""
