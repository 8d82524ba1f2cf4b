"""The one place that creates onnxruntime sessions, so options stay consistent."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qconvert.errors import ConfigError
from qconvert.memory import return_large_blocks

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")

# Short names users type, for the execution providers a team is likely to ship on.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


_weights_folder: Path | None = None

NCHWC_TRANSFORMER = "NchwcTransformer"
"""onnxruntime's rewrite of float Convs into its blocked channel layout (x86 CPUs).

It copies every float Conv weight into the blocked layout while the session is built, and
the session holds the copies: a float session of a 224x224 residual CNN with 46 MB of
weights peaked 61 MB over what was alive before it and kept 35 MB, against 4 MB for both
without it. Its kernels sum in another order, so the outputs differ in their last bits:
sessions whose outputs decide the written model (calibration, the weight passes' float
runs) keep it; those that only score a candidate against a reference leave it out on
both sides."""


@contextlib.contextmanager
def external_weights(folder: str | Path | None) -> Iterator[None]:
    """Within it, a session made from a model's bytes reads external weights from `folder`.

    A model past 2 GB keeps its weights in its external data files (`model.load_model`):
    serialized, it is its graph and references into those files, which onnxruntime resolves
    against this folder. The stages that hand onnxruntime a model as bytes (calibration,
    the recipe's scoring, sensitivity, AdaRound's and bias correction's float passes) then
    work on it unchanged. A model whose tensors are all in memory is unaffected.
    """
    global _weights_folder
    previous = _weights_folder
    _weights_folder = Path(folder) if folder is not None else None
    try:
        yield
    finally:
        _weights_folder = previous


def weights_folder() -> Path | None:
    """The folder `external_weights` set, for work handed to other processes."""
    return _weights_folder


def make_session(
    model: bytes | str,
    *,
    threads: int = 0,
    optimize: bool = True,
    provider: str = "CPUExecutionProvider",
    spin: bool = True,
    quiet: bool = False,
    optimized_path: Path | None = None,
    external_folder: Path | None = None,
    config: Mapping[str, str] | None = None,
    priority_order: bool = False,
    arena: bool = True,
    memory_pattern: bool = True,
    weights: Mapping[str, np.ndarray] | None = None,
    reorder_layout: bool = True,
) -> ort.InferenceSession:
    """A session for `model` (bytes or a path); 0 threads lets onnxruntime choose.

    A provider other than the CPU one gets the CPU provider behind it, for the ops it lacks.
    `spin=False` keeps idle worker threads from busy-waiting: sessions that take turns (a
    comparison runs two to four) otherwise starve each other of cores. `quiet` silences
    onnxruntime's own error log, for callers that handle every failure. `optimized_path`
    receives the graph as onnxruntime optimized it. `external_folder`: the folder the
    external data of a model given as bytes is read from. `config` holds session config
    entries (`SessionOptions.add_session_config_entry`). `priority_order` runs the nodes
    in onnxruntime's priority-based order, which keeps the graph's own order where it can:
    the calibration graph relies on it to reduce each tensor while it is fresh.
    `arena=False` allocates each tensor on its own and frees it when done: for models with
    many intermediate tensors exposed as outputs, which onnxruntime's arena would hold
    in chunks grown by doubling. `memory_pattern=False` keeps the arena but lets each run
    take its tensors one by one rather than as the one block onnxruntime plans after the
    first run on a shape (see `calibration.graphs.open_session`). `weights`: the
    initializers `handed_weights.detach` took out of `model`, by name.
    `reorder_layout=False` leaves out onnxruntime's blocked-layout rewrite of float Convs
    (`NCHWC_TRANSFORMER`), for sessions whose outputs only score (see there).
    """
    return_large_blocks()  # the session's build copies go back to the system once freed
    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3
    options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if external_folder is None and isinstance(model, bytes):
        external_folder = _weights_folder
    if external_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(external_folder)
        )
    if not arena:
        options.enable_cpu_mem_arena = False
    if not arena or not memory_pattern:
        options.enable_mem_pattern = False
    if priority_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    handed = [ort.OrtValue.ortvalue_from_numpy(array) for array in (weights or {}).values()]
    if handed:
        options.add_external_initializers(list(weights), handed)
    providers = [provider]
    if provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    # onnxruntime copies handed weights while it loads the model, and documents that the
    # caller may free them after: they are not kept.
    disabled = [] if reorder_layout else [NCHWC_TRANSFORMER]
    return ort.InferenceSession(
        model, options, providers=providers, disabled_optimizers=disabled
    )


def resolve_provider(name: str) -> str:
    """Onnxruntime's name for a provider a user named (`cpu`, `cuda`, or the full name).

    Raises:
        ConfigError: the provider is unknown or not available in this onnxruntime build.
    """
    full = PROVIDERS.get(name.lower(), name)
    available = ort.get_available_providers()
    if full not in available:
        raise ConfigError(
            f"Execution provider '{name}' is not available in this onnxruntime build.",
            hint=f"available: {', '.join(available)}.",
        )
    return full


def describe_error(error: BaseException) -> str:
    """onnxruntime's message for `error` on one line, without its status-code prefix."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    return _ORT_PREFIX.sub("", text)
