"""The errors a user can fix: each message names the problem and the fix, and front ends print it as one line.

Every package raises its own subclass; `UserError` is what the command-line tools catch, so a new kind of user
error needs no change in them.
"""


class UserError(Exception):
    """A problem in what the user gave (config, data, checkpoint, request); the message says how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration the run cannot use; the message names the key and the fix."""


class DataError(UserError, ValueError):
    """A problem in data, corpus or tokenizer; the message names the file and the fix."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be saved, loaded or converted; the message names the file and the problem."""


class InferenceError(UserError, RuntimeError):
    """A model or request that generation or evaluation cannot run here; the message says why and what to do."""


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on (non-finite steps beyond the skip limit); the message says where and what to do."""
