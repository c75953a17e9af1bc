"""The one error every checkpoint problem raises."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved, loaded or converted; the message names the file and the problem."""
