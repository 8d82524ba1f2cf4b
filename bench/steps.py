"""Each tool's calibrate+quantize step, run in a fresh child process.

A step is a top-level function (so the spawn start method can pickle it) that does one
tool's work and returns its wall time; `run_in_child` adds the child's peak resident memory
(the high-water mark of its resident set, VmHWM, which counts the interpreter and onnxruntime
too, as a user's process would). `ru_maxrss` is not used: Linux carries it over from the parent
through fork and exec, so every child would report at least the parent's peak.
Every step reads the same sample files; the peer gets them through a CalibrationDataReader.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import multiprocessing
import resource
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    """What one tool's step cost, or why it did not run."""

    ok: bool
    seconds: float | None = None
    peak_mb: float | None = None
    error: str | None = None
    note: str | None = None
    stage_seconds: float | None = None  # qconvert's own calibrate-stage timer, where reported


class NotSupportedYet(Exception):
    """qconvert does not offer this scheme or option yet."""


def run_in_child(
    step: Callable[..., dict], timeout_s: float = 900.0, **kwargs: object
) -> StepResult:
    """Runs `step(**kwargs)` in a freshly spawned process and measures it."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        future = pool.submit(_measured, step, kwargs)
        try:
            outcome = future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            for process in list(pool._processes.values()):
                process.kill()
            return StepResult(ok=False, error=f"timed out after {timeout_s:.0f} s")
        except concurrent.futures.process.BrokenProcessPool:
            return StepResult(ok=False, error="child process died (out of memory?)")
    return StepResult(**outcome)


def _measured(step: Callable[..., dict], kwargs: dict) -> dict:
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the peer logs advice on the root logger
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the peer prints progress
            extra = step(**kwargs)
    except NotSupportedYet as exc:
        return {"ok": False, "error": f"not supported yet: {exc}"}
    except Exception as exc:  # noqa: BLE001 - every failure is a result to report
        last = traceback.extract_tb(exc.__traceback__)[-1]
        message = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {message} "
            f"({Path(last.filename).name}:{last.lineno})",
        }
    return {"ok": True, "peak_mb": round(_peak_kb() / 1024.0, 1), **extra}


def _peak_kb() -> int:
    """This process's peak plus the largest of the processes it started and waited for.

    Calibration workers that `--workers auto` spawned count: at worst they peaked together
    with this process.
    """
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) + children
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + children


def _timed(work: Callable[[], object]) -> dict:
    start = time.perf_counter()
    work()
    return {"seconds": round(time.perf_counter() - start, 4)}


def _input_ranks(model: str) -> dict[str, int]:
    import onnx

    graph = onnx.load(model, load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return {
        i.name: len(i.type.tensor_type.shape.dim)
        for i in graph.input
        if i.name not in initializers
    }


def _iter_samples(model: str, data: str, limit: int | None) -> Iterator[dict[str, np.ndarray]]:
    """The folder's samples, streamed; the model is read here, before any timing starts."""
    from itertools import islice

    from bench.data import iter_folder

    return islice(iter_folder(Path(data), _input_ranks(model)), limit)


# --- qconvert -----------------------------------------------------------------------------


def qconvert_supports(scheme: str, fmt: str) -> str | None:
    """None when qconvert offers `scheme` in `fmt`, else why not."""
    from qconvert.schemes import SCHEMES

    if scheme not in SCHEMES:
        return f"scheme '{scheme}' not supported yet"
    if fmt == "qop" and scheme not in ("int8", "int4"):
        return f"format '{fmt}' is for int8 and int4 only"
    return None


def qconvert_quantize(
    *,
    model: str,
    data: str,
    output: str,
    scheme: str,
    fmt: str,
    with_data: bool = True,
    recipe: str = "default",
    **flags: object,
) -> dict:
    """`flags` are QuantizeConfig fields (equalize, bias_correction, adaround, ...).

    `with_data=False` runs without --data (int4's round-to-nearest row); `recipe` is
    `--recipe` (default: measure and decide; fast: the single pass).
    """
    from qconvert import api
    from qconvert.config import QuantizeConfig

    reason = qconvert_supports(scheme, fmt)
    if reason is not None:
        raise NotSupportedYet(reason)
    config = QuantizeConfig(scheme=scheme, format=fmt, **flags)
    # Data-free schemes do not calibrate; the data still gives them a real smoke sample.
    # Workers as the command line's default (`--workers auto`).
    # The report beside the model carries the fusion audit against the plan (bench.audit).
    return _timed(
        lambda: api.quantize(
            model,
            output,
            data=data if with_data else None,
            config=config,
            force=True,
            workers=None,
            report=output + ".report.json",
            recipe=recipe,
        )
    )


def qconvert_calibrate(*, model: str, data: str, output: str) -> dict:
    """qconvert's calibration alone, as `qconvert calibrate` runs it (`--workers auto`)."""
    from qconvert import api

    result = _timed(
        lambda: api.calibrate(model, data, output=output, force=True, workers=None)
    )
    return {
        **result,
        "note": "api.calibrate, workers auto",
        "stage_seconds": result["seconds"],
    }


def qconvert_quantize_stage(*, model: str, data: str, output: str) -> dict:
    """The calibration stage of `qconvert quantize --data`, as quantize runs it.

    The model is loaded first (quantize has it before the stage), then the stage alone is
    timed: the clone quantize hands over, preparation, the session and the runs, with
    `--workers auto`. The peak is that of this process: what quantize holds up to the end
    of its calibration.
    """
    del output
    from qconvert import model as model_io
    from qconvert.calibration import CollectSettings
    from qconvert.calibration.deferral import deferrable_tensors
    from qconvert.calibration.graphs import tensors_to_calibrate
    from qconvert.calibration.shards import DataSpec
    from qconvert.dataset import DirectorySource, input_specs
    from qconvert.pipelines.calibrate import calibration_model, collect_calibration
    from qconvert.progress import SILENT

    float_model = model_io.load_model(model)
    specs = input_specs(float_model)
    source = DirectorySource(data, specs)
    spec = DataSpec(folder=data, specs=specs)

    def stage() -> None:
        # As the stage runs for int8: prepared, without the tensors only a clamp reads.
        calibrated = calibration_model(float_model.clone())
        collect_calibration(
            model,
            calibrated,
            source,
            CollectSettings(),
            SILENT,
            data=spec,
            workers=None,
            prepared=True,
            skip=deferrable_tensors(calibrated, tensors_to_calibrate(calibrated)),
            fingerprint=False,  # as the stage: its statistics are never written
        )

    result = _timed(stage)
    return {
        **result,
        "note": "quantize --data: its calibrate stage, workers auto",
        "stage_seconds": result["seconds"],
    }


def qconvert_method(*, model: str, data: str, output: str, method: str) -> dict:
    """`qconvert quantize --data DIR --method METHOD`, timed at what the method costs.

    The seconds are the report's calibrate + ranges stages: minmax calibrates without
    histograms, the histogram methods (percentile, entropy, mse) calibrate with them and
    then derive their ranges from them. So the ratio of a histogram method to minmax is
    what choosing that method adds to a user's calibration.
    """
    from qconvert import api

    # The recipe would re-run the method's ranges among its trials: minutes of work that the
    # stages timed here never include.
    result = api.quantize(model, output, data=data, method=method, recipe="fast", force=True)
    seconds = sum(result.seconds.get(stage, 0.0) for stage in ("calibrate", "ranges"))
    return {
        "seconds": round(seconds, 4),
        "stage_seconds": round(seconds, 4),
        "note": f"quantize --method {method}: calibrate + ranges stages",
    }


# --- the peers --------------------------------------------------------------------------


def _reader(model: str, data: str, limit: int | None):
    from onnxruntime.quantization import CalibrationDataReader

    class FolderReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = _iter_samples(model, data, limit)

        def get_next(self):  # the peer's protocol: a dict of feeds, None at the end
            return next(self.samples, None)

    return FolderReader()


def ort_static(
    *,
    model: str,
    data: str,
    output: str,
    activation: str = "QUInt8",
    weight: str = "QInt8",
    fmt: str = "qdq",
    method: str = "MinMax",
    per_channel: bool = True,
) -> dict:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    reader = _reader(model, data, None)
    return _timed(
        lambda: quantize_static(
            model,
            output,
            reader,
            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
            activation_type=getattr(QuantType, activation),
            weight_type=getattr(QuantType, weight),
            per_channel=per_channel,
            calibrate_method=getattr(CalibrationMethod, method),
        )
    )


def ort_int4(
    *,
    model: str,
    data: str,
    output: str,
    block_size: int = 32,
    symmetric: bool = True,
    embeddings: bool = True,
    accuracy_level: int = 4,
) -> dict:
    """onnxruntime's matmul_nbits_quantizer, RTN (DefaultWeightOnlyQuantConfig), QOperator.

    Its GPTQ and HQQ configs import torch, which the bench's environment does not install:
    they run in the Quark environment (`ort_int4_torch`).
    """
    del data  # round-to-nearest reads no samples
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    ops = ("MatMul", "Gather") if embeddings else ("MatMul",)

    def work() -> None:
        config = DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=ops,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
        quantizer = MatMulNBitsQuantizer(onnx.load(model), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(output, use_external_data_format=False)

    return _timed(work)


def ort_dynamic(*, model: str, data: str, output: str) -> dict:
    del data  # dynamic quantization needs no samples
    from onnxruntime.quantization import QuantType, quantize_dynamic

    return _timed(lambda: quantize_dynamic(model, output, weight_type=QuantType.QInt8))


def occ_float16(*, model: str, data: str, output: str) -> dict:
    del data
    import onnx
    from onnxconverter_common import float16

    def work() -> None:
        converted = float16.convert_float_to_float16(onnx.load(model), keep_io_types=True)
        onnx.save(converted, output)

    return _timed(work)


def float_pass(*, model: str, data: str, output: str) -> dict:
    """One plain float inference over the samples: the floor for any calibration.

    Timed like a calibrator's pass: creating the session and running each sample once.
    """
    del output
    import onnxruntime as ort

    samples = _iter_samples(model, data, None)

    def work() -> None:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        for feeds in samples:
            session.run(None, feeds)

    return _timed(work)


# AMD Quark lives in its own virtual environment (it pins onnx below qconvert's and imports
# torch); `make bench` makes it. QCONVERT_BENCH_QUARK_PYTHON points elsewhere if needed.
QUARK_PYTHON = Path(__file__).resolve().parents[1] / ".venv-quark" / "bin" / "python"


def quark_python() -> Path:
    import os

    return Path(os.environ.get("QCONVERT_BENCH_QUARK_PYTHON", QUARK_PYTHON))


# Under the runner's 900 s step limit: that limit kills the step's process, not the Quark
# interpreter it started, so the step stops Quark itself first.
QUARK_TIMEOUT_S = 870.0


def quark_quantize(
    *, model: str, data: str, output: str, recipe: str, timeout_s: float = QUARK_TIMEOUT_S
) -> dict:
    """AMD Quark's ModelQuantizer (bench/quark_step.py) in its own interpreter: the time is
    the child's wall time, interpreter start and Quark's imports included, as a user's run."""
    arguments = ["--model", model, "--data", data, "--output", output, "--recipe", recipe]
    return _in_quark_env("bench.quark_step", arguments, "AMD Quark", timeout_s)


def ort_int4_torch(
    *,
    model: str,
    data: str,
    output: str,
    algo: str,
    block_size: int = 32,
    timeout_s: float = QUARK_TIMEOUT_S,
) -> dict:
    """onnxruntime's GPTQ or HQQ int4 (bench/int4_peer_step.py): both import torch, so they
    run in the Quark environment's interpreter, which has it; timed as `quark_quantize`."""
    arguments = ["--algo", algo, "--model", model, "--output", output]
    arguments += ["--data", data, "--block-size", str(block_size)]
    return _in_quark_env("bench.int4_peer_step", arguments, "torch", timeout_s)


def _in_quark_env(module: str, arguments: list[str], what: str, timeout_s: float) -> dict:
    """Runs `python -m module arguments` in the Quark environment, in a scratch folder."""
    import os
    import subprocess
    import tempfile

    from bench.quark_step import adaround_progress

    python = quark_python()
    if not python.exists():
        raise NotSupportedYet(f"{what} is not installed ({python}); `make bench` installs it")
    root = str(Path(__file__).resolve().parents[1])
    command = [str(python), "-m", module, *arguments]

    def work() -> None:
        # Quark writes quantized_info.csv into its working folder: a scratch one.
        with tempfile.TemporaryDirectory() as scratch:
            try:
                done = _run(scratch)
            except subprocess.TimeoutExpired as exc:
                log = exc.stderr or b""
                log = log.decode(errors="replace") if isinstance(log, bytes) else log
                raise RuntimeError(
                    f"did not finish in {timeout_s:.0f} s; {adaround_progress(log)}"
                ) from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise RuntimeError(lines[-1][:200] if lines else f"exit {done.returncode}")
        notes.extend(
            line.removeprefix("quark note: ")
            for line in done.stdout.splitlines()
            if line.startswith("quark note: ")
        )

    def _run(scratch: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            command,
            cwd=scratch,
            env={**os.environ, "PYTHONPATH": root},
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,  # kills the child, then raises TimeoutExpired
        )

    notes: list[str] = []
    result = _timed(work)
    return {**result, "note": "; ".join(notes)} if notes else result
