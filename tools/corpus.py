"""The ONNX node-test corpus: every single-op model onnx builds in code, through every scheme.

`onnx.backend.test.case.node.collect_testcases()` returns about 1,900 models of one op
each, with their inputs and expected outputs (no download). Each is written to a folder
with its first inputs as one `.npz` sample and quantized by the command line with every
scheme (the static ones calibrate on that sample; every scheme verifies on it). Each run
ends as one of:

    ok        exit 0; the written model loads and runs, float outputs stay within the
              scheme's bound of the float model's, other outputs are equal
    refused   exit 3, one line (grouped by reason)
    usage     exit 2, one line: an option that does not go with the model
    caught    exit 4 (verification failed), one line
    wrong     exit 0, but the written model fails to load, run, or drifts past the bound
    internal  any other exit, a traceback, more than one line, or an output left behind

Run `python -m tools.corpus` (or `make corpus`) for the whole table; `--sample N` runs a
fixed, evenly spread sample; `--only SUBSTRING` runs the matching cases.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import re
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

SCHEMES = ("int8", "16x8", "int8-dynamic", "fp16", "fp16-weights")

BOUNDS = {
    "int8": 0.1,
    "16x8": 0.1,
    "int8-dynamic": 0.1,
    "fp16": 0.02,
    "fp16-weights": 0.02,
}
"""The largest error of a float output allowed, relative to the float output's largest
magnitude (a single op sees at most a few quantization steps of its inputs' ranges)."""

CASE_SECONDS = 120


@dataclasses.dataclass(frozen=True)
class Case:
    """One node test, reduced to what a worker needs (picklable)."""

    name: str
    model: bytes
    inputs: tuple


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one case ended under one scheme."""

    case: str
    scheme: str
    status: str
    reason: str = ""
    detail: str = ""
    error: float | None = None
    eligible: bool = True


def collect(only: str | None = None) -> list[Case]:
    """The node tests of the installed onnx, in a stable order."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    result = []
    for case in sorted(cases, key=lambda c: c.name):
        if only is not None and only not in case.name:
            continue
        if case.model is None or not case.data_sets:
            continue
        inputs = tuple(case.data_sets[0][0])
        result.append(Case(case.name, case.model.SerializeToString(), inputs))
    return result


def sample(cases: list[Case], count: int) -> list[Case]:
    """`count` cases spread evenly over the sorted list (the same ones on every run)."""
    if count >= len(cases):
        return cases
    step = len(cases) / count
    return [cases[int(i * step)] for i in range(count)]


def _feed_names(model: onnx.ModelProto) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in initializers]


def _float_run(model: bytes, feeds: dict) -> tuple[list | None, str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return session.run(None, feeds), ""
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        return None, str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)


def _has_float32(model: onnx.ModelProto) -> bool:
    def types(graph: onnx.GraphProto):
        for value in (*graph.input, *graph.output, *graph.value_info):
            yield value.type.tensor_type.elem_type
        for tensor in graph.initializer:
            yield tensor.data_type
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t.data_type
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from types(attribute.g)

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference of odd models fails in many ways
        inferred = model
    return onnx.TensorProto.FLOAT in set(types(inferred.graph))


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max|candidate - reference| over max|reference|, where both are finite.

    Infinity where the shapes differ or NaN/Inf land elsewhere than in the reference.
    """
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        return float("inf")
    finite = np.isfinite(reference)
    same_specials = np.array_equal(
        np.isnan(reference), np.isnan(candidate)
    ) and np.array_equal(np.where(finite, 0, reference), np.where(finite, 0, candidate))
    if not same_specials:
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(float(np.abs(reference[finite]).max()), 1e-6)
    return float(np.abs(candidate[finite] - reference[finite]).max()) / scale


class _Timeout(BaseException):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


def _reason(text: str) -> str:
    """A refusal's message with paths, names and numbers blanked, to group like with like."""
    text = text.split(" Hint: ")[0]
    text = re.sub(r"^Error: ", "", text)
    text = re.sub(r"Load model from \S+ failed:", "", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\([^()]*\)", "(…)", text)
    text = re.sub(r"\d+", "N", text)
    return text[:150]


def run_case(case: Case, scheme: str, workdir: Path) -> Outcome:
    """Quantizes `case` with `scheme` through the command line and judges the result."""
    from qconvert.cli import main

    model = onnx.load_model_from_string(case.model)
    names = _feed_names(model)
    feeds = {
        name: value
        for name, value in zip(names, case.inputs, strict=False)
        if isinstance(value, np.ndarray)
    }
    # onnxruntime takes sequences as lists; qconvert's data folders hold arrays only.
    every_feed = {
        name: value
        for name, value in zip(names, case.inputs, strict=False)
        if value is not None
    }
    reference, float_error = _float_run(case.model, every_feed)
    eligible = reference is not None and _has_float32(model)
    folder = workdir / f"{case.name}.{scheme}"
    folder.mkdir(parents=True)
    source = folder / "model.onnx"
    source.write_bytes(case.model)
    data = folder / "data"
    data.mkdir()
    np.savez(data / "sample.npz", **feeds)
    output = folder / "out.onnx"
    args = ["quantize", str(source), "-o", str(output), "--scheme", scheme]
    args += ["--data", str(data), "--workers", "1"]
    stderr = io.StringIO()
    stdout = io.StringIO()
    code: int | str
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except _Timeout:
        code = "timeout"
    except BaseException as exc:  # noqa: BLE001 - anything escaping main() is a bug
        code = f"escaped {type(exc).__name__}: {exc}"
    finally:
        signal.alarm(0)
        # main() turns SIGTERM into an exception for its own cleanup; the pool ends
        # its workers with SIGTERM, which must stay fatal here.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    text = stderr.getvalue().strip()
    lines = [line for line in text.splitlines() if not line.startswith("Warning: ")]
    first = lines[0] if lines else ""
    if code == 0:
        if not output.exists():
            return Outcome(case.name, scheme, "wrong", "no output written", eligible=eligible)
        if reference is None:
            return Outcome(case.name, scheme, "ok", "float model does not run", eligible=False)
        converted, error = _float_run(output.read_bytes(), feeds)
        if converted is None:
            return Outcome(case.name, scheme, "wrong", "written model fails", error)
        worst = 0.0
        for ref, got in zip(reference, converted, strict=True):
            if isinstance(ref, np.ndarray) and ref.dtype == np.float32:
                worst = max(worst, relative_error(ref, got))
            elif not _same_nested(ref, got, BOUNDS[scheme]):
                return Outcome(case.name, scheme, "wrong", "non-float output differs")
        if worst > BOUNDS[scheme]:
            return Outcome(case.name, scheme, "wrong", "drift past bound", error=worst)
        return Outcome(case.name, scheme, "ok", error=worst, eligible=eligible)
    if code in (2, 3, 4) and len(lines) == 1 and "Traceback" not in text:
        if output.exists():
            return Outcome(case.name, scheme, "internal", "output left behind", first)
        # 2: an option that does not go with this model (a scheme for a pre-quantized one)
        status = {2: "usage", 3: "refused", 4: "caught"}[code]
        detail = first if eligible else f"{first} [float: {float_error}]"
        return Outcome(case.name, scheme, status, _reason(first), detail, eligible=eligible)
    return Outcome(
        case.name, scheme, "internal", f"exit {code}", text[-2000:], eligible=eligible
    )


def _same_nested(ref: object, got: object, bound: float) -> bool:
    """Equal sequences and non-float tensors; float32 tensors inside within `bound`."""
    if isinstance(ref, list | tuple) and isinstance(got, list | tuple):
        return len(ref) == len(got) and all(
            _same_nested(a, b, bound) for a, b in zip(ref, got, strict=True)
        )
    if isinstance(ref, np.ndarray) and isinstance(got, np.ndarray):
        if ref.dtype != got.dtype or ref.shape != got.shape:
            return False
        if ref.dtype == np.float32:  # inside a sequence: the scheme's bound applies
            return relative_error(ref, got) <= bound
        return np.array_equal(ref, got, equal_nan=ref.dtype.kind in "fc")
    return ref is None and got is None


def _work(job: tuple[Case, str, str]) -> Outcome:
    case, scheme, workdir = job
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return run_case(case, scheme, Path(workdir))
        except Exception as exc:  # noqa: BLE001 - a harness failure is reported, not fatal
            return Outcome(case.name, scheme, "internal", "harness", repr(exc))


def run(cases: list[Case], schemes: tuple[str, ...], jobs: int = 1) -> list[Outcome]:
    """Every case through every scheme, `jobs` worker processes at a time."""
    work = [(case, scheme) for case in cases for scheme in schemes]
    with tempfile.TemporaryDirectory(prefix="qconvert-corpus-") as workdir:
        items = [(case, scheme, workdir) for case, scheme in work]
        if jobs <= 1:
            return [_work(item) for item in items]
        context = multiprocessing.get_context("fork")
        with context.Pool(jobs, maxtasksperchild=100) as pool:
            return list(pool.imap(_work, items, chunksize=4))


def table(outcomes: list[Outcome]) -> str:
    """The summary: cases, ok, refused by reason, caught, wrong, internal, per scheme."""
    lines = []
    schemes = sorted({o.scheme for o in outcomes}, key=SCHEMES.index)
    header = f"{'':34}" + "".join(f"{s:>14}" for s in schemes) + f"{'all':>8}"
    lines.append(header)

    def row(label: str, pick) -> None:
        counts = [sum(1 for o in outcomes if o.scheme == s and pick(o)) for s in schemes]
        lines.append(f"{label:34}" + "".join(f"{c:>14}" for c in counts) + f"{sum(counts):>8}")

    row("cases", lambda o: True)
    row("  eligible (ORT runs, float32)", lambda o: o.eligible)
    for status in ("ok", "refused", "usage", "caught", "wrong", "internal"):
        row(status, lambda o, s=status: o.status == s)
        row(f"  {status} (eligible)", lambda o, s=status: o.status == s and o.eligible)
    eligible = [o for o in outcomes if o.eligible]
    ok = sum(1 for o in eligible if o.status == "ok")
    share = 100.0 * ok / len(eligible) if eligible else 0.0
    lines.append(f"ok among eligible: {ok}/{len(eligible)} = {share:.1f}%")
    for status in ("refused", "usage", "caught", "wrong", "internal"):
        reasons = Counter(
            (o.reason, o.eligible) for o in outcomes if o.status == status
        ).most_common()
        if not reasons:
            continue
        lines.append(f"\n{status} by reason (count, eligible?):")
        for (reason, flag), count in reasons:
            lines.append(f"  {count:5}  {'E' if flag else '-'}  {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the corpus and prints the table; exit 1 on any wrong model or internal error."""
    parser = argparse.ArgumentParser(prog="python -m tools.corpus", description=__doc__)
    parser.add_argument("--sample", type=int, default=None, help="run N spread cases")
    parser.add_argument("--only", default=None, help="cases whose name contains this")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write every outcome here")
    args = parser.parse_args(argv)
    cases = collect(args.only)
    if args.sample is not None:
        cases = sample(cases, args.sample)
    schemes = tuple(args.schemes.split(","))
    started = time.monotonic()
    outcomes = run(cases, schemes, args.jobs)
    print(table(outcomes))
    print(f"\n{len(outcomes)} runs in {time.monotonic() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps([dataclasses.asdict(o) for o in outcomes], indent=1))
    return int(any(o.status in ("wrong", "internal") for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
