"""User-facing errors: the CLI turns each into one ``Error: ...`` line and exit code 1."""


class DdpmctlError(Exception):
    """A problem the user can fix (bad input, missing data, no checkpoint); never a bug."""


class ConfigError(DdpmctlError):
    """The configuration (YAML file or command-line options) is invalid."""


class DataError(DdpmctlError):
    """The training data is missing, empty or unusable."""


class CheckpointError(DdpmctlError):
    """A checkpoint is missing, incomplete, damaged or unsafe to load."""


class TrainingStopped(DdpmctlError):
    """Training stopped early on purpose (interrupted, or too many non-finite steps)."""

    def __init__(self, message: str, checkpoint: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.checkpoint = checkpoint  # the checkpoint saved on the way out, if any
        self.exit_code = exit_code


class DdpmctlWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI shows it as one ``warning:`` line)."""


class EvaluationError(DdpmctlError):
    """FID/KID cannot be computed (missing extractor weights or packages, too few images)."""
