"""Error types: user errors (exit 2) are kept apart from internal ones (exit 1)."""


class UserError(Exception):
    """Bad input or usage: the message names the problem and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A config.json field is missing, invalid or not implemented."""


class CheckpointError(UserError):
    """A checkpoint folder is incomplete or inconsistent with its config."""


class ArtifactError(UserError):
    """An artifact folder is missing files or fails its hash check."""


class TargetUnavailable(UserError):
    """A target's runtime or device is not present on this machine."""


class NotMeasurable(UserError):
    """An artifact that cannot be run on this machine, so nothing about it can be measured here."""


class GateFailure(Exception):
    """A validation gate failed: exit code 3."""

    exit_code = 3
