"""The one exception type of vmix_lib.prepare: its message is one sentence a user can act on."""


class PrepareError(Exception):
    pass
