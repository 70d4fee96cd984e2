"""The one exception the trainer shows a user: its message is a sentence, never a traceback."""


class TrainError(Exception):
    """Bad input to the trainer (config, dataset, checkpoint, resume state); the CLI prints the message."""
