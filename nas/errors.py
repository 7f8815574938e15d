"""User-facing failures.

Every error a user can cause or fix is a `NasError`; the CLI prints its message on one line
and exits 2. Anything else is a bug and keeps its traceback.
"""


class NasError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(NasError):
    """A search space, plan or option has a bad key or value."""


class BudgetError(ConfigError):
    """A budget string could not be parsed."""


class DataError(NasError):
    """A dataset is missing, incomplete or corrupt."""


class ModelError(NasError):
    """An unknown model name or a user factory that cannot be loaded."""


class CheckpointError(NasError):
    """A checkpoint is missing, corrupt or belongs to another model."""


class DeviceError(NasError):
    """The requested device is not available."""
