"""The one exception of megamoe.data."""


class DataError(ValueError):
    """A user error in data, corpus or tokenizer; the message names the file and the fix."""
