"""Latency and fidelity of float, ours and theirs, measured side by side in one process.

Latency: onnxruntime CPU sessions (all graph optimizations), batch 1, with one intra-op thread
and with all (0 = onnxruntime's default, one per core), thread-pool spinning off. The models
are timed round robin, one run each in turn, so drift on a noisy machine hits all of them
alike; the figure is the median of each model's runs.

Fidelity against the float model on the eval samples: accuracy when labels exist, an
agreement figure chosen by task, and the SQNR of the task's primary output.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from bench.data import Feeds
from qconvert.metrics import OutputAccumulator

DETECTION_SCORE = 0.25
SEGMENT_THRESHOLD = 0.3
VAD_THRESHOLD = 0.5  # Silero's own default speech threshold


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyPlan:
    """Round robin, one run of each model per round, so noise bursts hit all alike."""

    max_runs: int  # per model
    min_runs: int  # per model, whatever the budget
    warmup: int
    budget_s: float  # per model: rounds stop once the models used this much each on average


def session(model: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Three sessions are alive at once and timed in turn: a pool left spinning after its run
    # would steal the cores from the next session's run, so no pool spins (for all alike).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def latencies_ms(
    models: dict[str, str], feeds: Feeds, threads: int, plan: LatencyPlan
) -> dict[str, float | str]:
    """Median latency per model (ms), or why it could not run; models timed in alternation."""
    sessions: dict[str, ort.InferenceSession] = {}
    result: dict[str, float | str] = {}
    for name, path in models.items():
        try:
            sessions[name] = session(path, threads)
            for _ in range(plan.warmup):
                sessions[name].run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - a model that does not run is a result
            result[name] = "does not run: " + _one_line(exc)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    started = time.perf_counter()
    for round_index in range(plan.max_runs):
        if round_index >= plan.min_runs and (
            time.perf_counter() - started > plan.budget_s * max(1, len(sessions))
        ):
            break
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        # 0.1 us: the targets' ratios are taken from these, and the digit models run in
        # 20-60 us, where whole microseconds would move a ratio by up to 4%.
        result[name] = round(1000.0 * float(np.median(values)), 4)
    return result


@dataclass(frozen=True, slots=True, kw_only=True)
class Fidelity:
    accuracy: float | None
    agreement: float | None
    agreement_kind: str
    sqnr_db: float | None


def primary_output(task: str, names: Sequence[str]) -> int:
    if task == "embed" and "sentence_embedding" in names:
        return list(names).index("sentence_embedding")
    return 0


def run_all(model: str, samples: Sequence[Feeds]) -> list[list[np.ndarray]]:
    sess = session(model, 0)
    return [sess.run(None, feeds) for feeds in samples]


def fidelity(
    task: str,
    names: Sequence[str],
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    labels: np.ndarray | None,
) -> Fidelity:
    """Compares candidate outputs with the float model's on the same samples."""
    index = primary_output(task, names)
    accumulator = OutputAccumulator(names[index])
    for ref, cand in zip(reference, candidate, strict=True):
        accumulator.update(ref[index], cand[index])
    sqnr = accumulator.result().sqnr_db
    accuracy = None
    if labels is not None:
        hits = [
            int(np.argmax(c[index].reshape(-1)) == y)
            for c, y in zip(candidate, labels, strict=True)
        ]
        accuracy = float(np.mean(hits))
    kind, agreement = _agreement(
        task, [r[index] for r in reference], [c[index] for c in candidate]
    )
    return Fidelity(
        accuracy=accuracy,
        agreement=agreement,
        agreement_kind=kind,
        sqnr_db=None if math.isinf(sqnr) else round(sqnr, 2),
    )


def accuracy_of(
    outputs: list[list[np.ndarray]], task: str, names: Sequence[str], labels
) -> float:
    index = primary_output(task, names)
    return float(
        np.mean(
            [
                int(np.argmax(o[index].reshape(-1)) == y)
                for o, y in zip(outputs, labels, strict=True)
            ]
        )
    )


def mask_share(task: str, names: Sequence[str], outputs: list[list[np.ndarray]]) -> float:
    """The share of the float model's dense-map pixels above the mask threshold: near zero,
    the inputs hold nothing the model marks, and mask IoU measures noise."""
    index = primary_output(task, names)
    maps = [o[index] for o in outputs]
    return float(
        sum(int(np.sum(m > SEGMENT_THRESHOLD)) for m in maps) / sum(m.size for m in maps)
    )


def _agreement(
    task: str, ref: list[np.ndarray], cand: list[np.ndarray]
) -> tuple[str, float | None]:
    if task == "embed":
        cosines = [
            float(
                np.dot(r.ravel(), c.ravel()) / (np.linalg.norm(r) * np.linalg.norm(c) + 1e-12)
            )
            for r, c in zip(ref, cand, strict=True)
        ]
        return "mean cosine", float(np.mean(cosines))
    if task == "segment":
        inter = sum(
            int(np.sum((r > SEGMENT_THRESHOLD) & (c > SEGMENT_THRESHOLD)))
            for r, c in zip(ref, cand, strict=True)
        )
        union = sum(
            int(np.sum((r > SEGMENT_THRESHOLD) | (c > SEGMENT_THRESHOLD)))
            for r, c in zip(ref, cand, strict=True)
        )
        return f"mask IoU (>{SEGMENT_THRESHOLD})", inter / union if union else 1.0
    if task == "ctc":
        same = [_ctc_greedy(r) == _ctc_greedy(c) for r, c in zip(ref, cand, strict=True)]
        return "CTC exact string", float(np.mean(same))
    if task == "vad":
        agree = [
            float(np.mean((r > VAD_THRESHOLD) == (c > VAD_THRESHOLD)))
            for r, c in zip(ref, cand, strict=True)
        ]
        return f"speech decision agreement (>{VAD_THRESHOLD})", float(np.mean(agree))
    if task == "detect":
        inter = union = 0
        for r, c in zip(ref, cand, strict=True):
            a, b = _detections(r), _detections(c)
            inter += len(a & b)
            union += len(a | b)
        return f"detections IoU (score>{DETECTION_SCORE})", inter / union if union else 1.0
    rows = agree = 0
    for r, c in zip(ref, cand, strict=True):
        if r.ndim >= 2 and r.shape[-1] >= 2:
            rows += r.size // r.shape[-1]
            agree += int(np.sum(r.argmax(-1) == c.argmax(-1)))
    if rows:
        return "top-1 agreement", agree / rows
    return "none", None


def _ctc_greedy(output: np.ndarray) -> tuple[int, ...]:
    """Greedy CTC decoding of a [1, T, classes] output: best class per step, repeats
    collapsed, blanks (class 0) dropped. Its dictionary maps each class to one character,
    so equal label sequences are equal strings."""
    best = output.reshape(-1, output.shape[-1]).argmax(-1)
    keep = np.ones(len(best), bool)
    keep[1:] = best[1:] != best[:-1]
    return tuple(int(b) for b in best[keep] if b != 0)


def _detections(output: np.ndarray) -> set[tuple[int, int]]:
    """(anchor, class) pairs scoring above the threshold in a YOLOv8 [1, 4+C, N] output."""
    scores = output[0, 4:, :]
    best = scores.argmax(0)
    keep = np.nonzero(scores.max(0) > DETECTION_SCORE)[0]
    return {(int(anchor), int(best[anchor])) for anchor in keep}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"
