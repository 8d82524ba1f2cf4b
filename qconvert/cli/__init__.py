"""The `qconvert` command line: a thin layer over `qconvert.api`.

Errors a user can cause print one line and exit with their code (see `qconvert.errors`);
anything else is a bug and prints a traceback with a request to report it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

import click

from qconvert import __version__
from qconvert.cli import _console
from qconvert.cli.analyze import analyze_command
from qconvert.cli.calibrate import calibrate_command
from qconvert.cli.compare import compare_command
from qconvert.cli.inspect import inspect_command
from qconvert.cli.quantize import quantize_command
from qconvert.errors import EXIT_USAGE, QconvertError

EXIT_BUG = 70
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (temporary files) runs.

    A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it.
    """


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _signal_behind(error: BaseException) -> type | None:
    """KeyboardInterrupt or Terminated when `error` was raised while handling one.

    A signal can land inside a library that turns it into an error of its own (inside a
    file read, say); the run was still interrupted, not broken.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, KeyboardInterrupt | Terminated):
            return type(cause) if isinstance(cause, Terminated) else KeyboardInterrupt
        cause = cause.__cause__ or cause.__context__
    return None


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, "--version", prog_name="qconvert")
@click.option("--debug", is_flag=True, help="Show a traceback for every error.")
def cli(debug: bool) -> None:
    """Post-training quantization of ONNX models.

    \b
      qconvert quantize model.onnx --data calib/ -o model.int8.onnx
      qconvert calibrate model.onnx --data calib/ -o model.calib.json
      qconvert compare  model.onnx model.int8.onnx --data eval/ --max-top1-drop 1
      qconvert inspect  model.onnx

    Exit codes: 0 success, 1 a compare gate failed, 2 usage error, 3 bad input
    (model, data, calibration file), 4 the produced model failed verification.
    """


cli.add_command(quantize_command)
cli.add_command(calibrate_command)
cli.add_command(inspect_command)
cli.add_command(compare_command)
cli.add_command(analyze_command)


def _configure_logging(debug: bool) -> None:
    """qconvert's warnings as one line each on stderr; libraries' chatter only with --debug."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("Warning: %(message)s"))
    logger = logging.getLogger("qconvert")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    logger.propagate = False
    # onnx_ir logs failed shape inference with a traceback; planning copes without it.
    logging.getLogger("onnx_ir").setLevel(logging.DEBUG if debug else logging.CRITICAL)


def main(argv: list[str] | None = None) -> None:
    """Runs the command line and exits with the documented code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("QCONVERT_DEBUG") == "1"
    _configure_logging(debug)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = cli.main(args=args, prog_name="qconvert", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code if exc.exit_code else EXIT_USAGE
    except QconvertError as exc:
        if debug:
            traceback.print_exc()
        _console.error(str(exc))
        code = exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        _console.error("interrupted; no output was written.")
        code = EXIT_INTERRUPTED
    except Terminated:
        _console.error("terminated; no output was written.")
        code = EXIT_TERMINATED
    except Exception as exc:  # noqa: BLE001 - a bug, unless a signal is behind it
        signal_behind = _signal_behind(exc)
        if signal_behind is KeyboardInterrupt:
            _console.error("interrupted; no output was written.")
            code = EXIT_INTERRUPTED
        elif signal_behind is Terminated:
            _console.error("terminated; no output was written.")
            code = EXIT_TERMINATED
        else:
            traceback.print_exc()
            _console.error(
                "qconvert hit an internal error. Please report it with the traceback above."
            )
            code = EXIT_BUG
    sys.exit(code or 0)
