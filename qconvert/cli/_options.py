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
