"""Option bundles shared by commands: the data-reading options, declared once."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

# The range methods of qconvert.calibration.ranges.METHODS (a test keeps them equal),
# spelled out so that --help does not import the calibration engine and onnxruntime.
METHODS = ("auto", "minmax", "percentile", "entropy", "mse")


def _floats(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"'{value}' is not a comma-separated list of numbers."
        ) from None


def _size(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    parts = value.lower().replace("x", ",").split(",")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not SIZE or HEIGHT,WIDTH.") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise click.BadParameter(f"'{value}' is not SIZE or HEIGHT,WIDTH.")
    return sizes


class WorkerCount(click.ParamType):
    """A number of workers, at least 1, or `auto` (None)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or value == "auto":
            return None
        try:
            count = int(value)
        except (TypeError, ValueError):
            self.fail(f"'{value}' is neither a number nor 'auto'.", param, ctx)
        if count < 1:
            self.fail(f"{count} is not at least 1.", param, ctx)
        return count


def workers_option(help_text: str) -> Callable[..., Any]:
    """--workers N|auto (default auto), with the command's own help."""
    return click.option(
        "--workers", type=WorkerCount(), default="auto", show_default=True, help=help_text
    )


def image_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--image-size, --resize/--crop, --scale, --mean, --std, --layout, --color."""
    options = [
        click.option(
            "--image-size",
            callback=_size,
            metavar="H,W",
            help="Image folders: the input's height,width (or one size). "
            "[default: the model input's static dims]",
        ),
        click.option(
            "--resize/--crop",
            "resize",
            default=True,
            show_default=True,
            help="Image folders: stretch to the size, or scale the shorter side to it and "
            "centre-crop.",
        ),
        click.option(
            "--scale",
            type=float,
            default=1 / 255,
            show_default="1/255",
            help="Image folders: pixels are multiplied by this first.",
        ),
        click.option(
            "--mean",
            callback=_floats,
            metavar="M[,M,M]",
            help="Image folders: subtracted per channel after --scale. [default: 0]",
        ),
        click.option(
            "--std",
            callback=_floats,
            metavar="S[,S,S]",
            help="Image folders: divides per channel after --mean. [default: 1]",
        ),
        click.option(
            "--layout",
            type=click.Choice(["NCHW", "NHWC"]),
            default=None,
            help="Image folders: the input's layout. [default: from the model input]",
        ),
        click.option(
            "--color",
            type=click.Choice(["RGB", "BGR"]),
            default="RGB",
            show_default=True,
            help="Image folders: channel order.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def image_preprocessing(options: dict[str, Any]):
    """The `ImagePreprocessing` the image options describe (popped from `options`)."""
    from qconvert.dataset import ImagePreprocessing

    return ImagePreprocessing(
        size=options.pop("image_size"),
        crop=not options.pop("resize"),
        scale=options.pop("scale"),
        mean=options.pop("mean") or (0.0,),
        std=options.pop("std") or (1.0,),
        layout=options.pop("layout"),
        color=options.pop("color"),
    )


method_option = click.option(
    "--method",
    type=click.Choice(METHODS),
    default="auto",
    show_default=True,
    help="How ranges are derived from the calibration statistics: observed min/max, a "
    "percentile of |x|, TensorRT's entropy (KL divergence), least squared error, or auto: "
    "per tensor, whichever of those has the least expected quantization error, kept only "
    "where the whole model scores better with it than with minmax on a few samples.",
)

percentile_option = click.option(
    "--percentile",
    type=click.FloatRange(0, 100, min_open=True),
    default=99.99,
    show_default=True,
    help="The share of |x| the percentile method keeps, in percent.",
)


def limit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The bounds an untrusted model or data set must respect (see qconvert/limits.py).

    The three flags reach the command as one `limits: LoadLimits` argument.
    """

    @functools.wraps(command)
    def with_limits(
        *args: Any,
        max_tensor_bytes: int,
        max_sample_bytes: int,
        max_image_pixels: int,
        **kw: Any,
    ) -> Any:
        from qconvert.limits import LoadLimits

        limits = LoadLimits(
            max_tensor_bytes=max_tensor_bytes,
            max_sample_bytes=max_sample_bytes,
            max_image_pixels=max_image_pixels,
        )
        return command(*args, limits=limits, **kw)

    options = (
        (
            "--max-tensor-bytes",
            16 * 2**30,
            "Refuse a model declaring a tensor larger than this.",
        ),
        ("--max-sample-bytes", 2 * 2**30, "Refuse a sample file unpacking to more than this."),
        ("--max-image-pixels", 100_000_000, "Refuse an image with more pixels than this."),
    )
    for flag, default, text in reversed(options):
        with_limits = click.option(
            flag, type=click.IntRange(min=1), default=default, show_default=True, help=text
        )(with_limits)
    return with_limits


def mlflow_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--mlflow, --mlflow-experiment, --mlflow-run-name, --mlflow-log-model.

    They reach the command as one `mlflow` argument: `MlflowSettings`, or None without
    --mlflow. MLflow's presence is checked here, before any work (a usage error).
    """

    @functools.wraps(command)
    def with_mlflow(
        *args: Any,
        mlflow: bool,
        mlflow_experiment: str | None,
        mlflow_run_name: str | None,
        mlflow_log_model: bool,
        **kw: Any,
    ) -> Any:
        from qconvert.tracking import MlflowSettings, require_mlflow

        settings = None
        if mlflow:
            require_mlflow()
            settings = MlflowSettings(
                experiment=mlflow_experiment,
                run_name=mlflow_run_name,
                log_model=mlflow_log_model,
            )
        else:
            given = [
                flag
                for flag, value in (
                    ("--mlflow-experiment", mlflow_experiment),
                    ("--mlflow-run-name", mlflow_run_name),
                    ("--mlflow-log-model", mlflow_log_model or None),
                )
                if value is not None
            ]
            if given:
                raise click.UsageError(f"{given[0]} needs --mlflow.")
        return command(*args, mlflow=settings, **kw)

    options = [
        click.option(
            "--mlflow",
            is_flag=True,
            help="Log this run to MLflow (the tracking server or store MLFLOW_TRACKING_URI "
            "names): options, fingerprints, every figure of the report, versions, and the "
            "JSON and HTML reports. Needs pip install 'qconvert[mlflow]'. An unreachable "
            "server costs a warning, not the run.",
        ),
        click.option(
            "--mlflow-experiment",
            metavar="NAME",
            default=None,
            help="MLflow experiment to log to. [default: MLFLOW_EXPERIMENT_NAME or "
            "MLflow's default]",
        ),
        click.option(
            "--mlflow-run-name", metavar="NAME", default=None, help="Name of the MLflow run."
        ),
        click.option(
            "--mlflow-log-model",
            is_flag=True,
            help="Also log the model (quantize: the written one; compare: the candidate) "
            "as an MLflow artifact.",
        ),
    ]
    for option in reversed(options):
        with_mlflow = option(with_mlflow)
    return with_mlflow


def given_options(ctx: click.Context, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parameters given on the command line (not left at their defaults), by name.

    The MLflow options themselves are left out, as is anything in `skip`.
    """
    from click.core import ParameterSource

    given = {}
    for param in ctx.command.params:
        name = param.name or ""
        if name.startswith("mlflow") or name in skip or name not in ctx.params:
            continue
        source = ctx.get_parameter_source(name)
        if source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None):
            value = ctx.params[name]
            given[name] = [str(v) for v in value] if isinstance(value, tuple) else value
    return given
