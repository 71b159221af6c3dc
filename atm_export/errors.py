"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in the user's input or environment, with the way out in its message."""

    exit_code = 2


class ParityError(Exception):
    """A backend's outputs disagree with eager PyTorch beyond the tolerance."""

    exit_code = 3


class ArtifactMismatchError(Exception):
    """An artifact does not match what its report says it is (tampered with, or mixed up)."""

    exit_code = 3


class NonFiniteInputError(ValueError):
    """The patched model was given NaN or infinite pixels (see ATMVisionTransformer.check_finite)."""


class SettingsError(ValueError):
    """Merge settings that cannot work (a bad threshold, a preset that does not exist, options
    that contradict each other). The message is one line that names the fix; the CLI prints
    it like a :class:`UserError` and exits 2."""

    exit_code = 2
