"""Errors a user can cause. The CLI prints these as one line and exits non-zero."""


class RwkvpyError(Exception):
    """Bad input: a file, key, shape or value that cannot be used. The message says which."""


class CheckpointError(RwkvpyError):
    """A checkpoint that cannot be read, is not RWKV-4, or does not match its own shapes."""
