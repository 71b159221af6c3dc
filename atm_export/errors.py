"""The exceptions atm-export's library code raises. Each message is one line that says what
is wrong and the way out; ``atm_export.cli`` alone turns them into exit statuses."""


class UserError(Exception):
    """A mistake in the user's input or environment (a file, an option, a missing tool)."""


class SettingsError(ValueError):
    """Merge settings that cannot work (a bad threshold, a preset that does not exist, options
    that contradict each other)."""


class NonFiniteInputError(ValueError):
    """The patched model was given NaN or infinite pixels (see ATMVisionTransformer.check_finite)."""


class ParityError(Exception):
    """A backend's outputs disagree with eager PyTorch beyond the tolerance."""


class ArtifactMismatchError(Exception):
    """An artifact does not match what its report says it is (tampered with, or mixed up)."""


class AccuracyGateError(Exception):
    """Merging costs more accuracy than the user's limits allow (``check --min-agreement``,
    ``--max-top1-drop``), or ``tune`` found no setting that meets its target."""


#: What atm-export raises for an outcome it expects; anything else is an unexpected failure.
EXPECTED = (UserError, SettingsError, NonFiniteInputError, ParityError, ArtifactMismatchError, AccuracyGateError)


def unexpected(exc: BaseException) -> bool:
    """Whether ``exc`` is an unexpected failure (a bug, a runtime's crash, a full disk), not a
    user mistake, a check's verdict or an interruption."""
    return isinstance(exc, Exception) and not isinstance(exc, EXPECTED)


def failure_log_text(exc: BaseException) -> str:
    """The full traceback of ``exc``, with the step it failed in, for a failure log."""
    import traceback

    step = getattr(exc, "atm_step", None)
    head = f"atm-export failed{f' while {step}' if step else ''}\n\n"
    return head + "".join(traceback.format_exception(exc))
