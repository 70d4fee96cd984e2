"""The one exception type of vmix_lib.scoring: its message is one sentence a user can act on."""


class ScoringError(Exception):
    pass
