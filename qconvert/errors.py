"""The errors qconvert shows to users.

Every error a user can cause (a bad model, bad data, a bad option) is a `QconvertError`
carrying its exit code and an optional hint. Anything else that escapes is a bug. The
command line prints a `QconvertError` as one line and exits with its code; it prints a
traceback and asks for a report for everything else.

Exit codes (the command-line contract):

    0  success
    1  a compare gate failed
    2  usage error (bad or incompatible options)
    3  bad input: model, data or calibration file
    4  the produced model failed verification
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_VERIFICATION = 4


class QconvertError(Exception):
    """Base of every error meant for the user: a message, a hint and an exit code."""

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} Hint: {self.hint}" if self.hint else self.message


class ConfigError(QconvertError):
    """Options that are invalid, alone or together."""

    exit_code = EXIT_USAGE


class ModelLoadError(QconvertError):
    """The model file is missing, unreadable, not ONNX, or fails the ONNX checker."""


class UnsupportedModelError(QconvertError):
    """The model is valid ONNX, but qconvert cannot convert it (opset, types, quantized)."""


class CalibrationDataError(QconvertError):
    """A data folder or sample does not fit the model."""


class CalibrationFileError(QconvertError):
    """A calibration file is missing, corrupt, of a future version, or for another model."""


class CalibrationWorkerError(QconvertError):
    """A calibration worker (a local process or a Ray task) died and its shard is lost."""


class OutputError(QconvertError):
    """The output cannot be written (exists without --force, folder missing, disk full)."""


class VerificationError(QconvertError):
    """The produced model failed the checker or did not load and run in onnxruntime."""

    exit_code = EXIT_VERIFICATION


class OverrideFileError(QconvertError):
    """An override file is unreadable, or names a node, tensor or scheme that is not there."""


class ModelMismatchError(QconvertError):
    """Two models that should take the same inputs and give the same outputs do not."""


class GatesFileError(QconvertError):
    """A gates file is missing, is not TOML, or names an unknown gate or a bad threshold."""


class AccuracyGateError(QconvertError):
    """A compare gate failed, or a model's outputs hold NaN or Inf under --check-finite."""

    exit_code = EXIT_GATE_FAILED
