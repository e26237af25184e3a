"""The base of every error aift raises for bad input: the CLI prints its message alone and exits 2."""


class AiftError(Exception):
    """An error the user can act on; its message says what is wrong and what to do."""


class NotAvailableError(AiftError, RuntimeError):
    """A feature that cannot run here (missing package, no GPU, unsupported combination)."""
