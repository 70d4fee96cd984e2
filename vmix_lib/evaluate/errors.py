"""The one exception type of vmix_lib.evaluate: its message is one sentence a user can act on."""


class EvaluationError(Exception):
    pass
