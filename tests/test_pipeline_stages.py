"""The quantize pipeline is a list of stages over one state (qconvert.pipelines.state)."""

from __future__ import annotations

import time

import qconvert
from qconvert.pipelines import quantize_stages as pipeline
from qconvert.pipelines.state import QuantizeRequest, QuantizeState, Stage, run_stages


def _state() -> QuantizeState:
    return QuantizeState(request=QuantizeRequest(model="m.onnx", output="o.onnx"))


def test_run_stages_runs_in_order_times_the_timed_and_skips_by_when():
    seen = []

    def first(state):
        seen.append("first")
        return state.replace(notes=(*state.notes, "a"))

    def second(state):
        seen.append("second")
        return state.replace(notes=(*state.notes, "b"))

    def skipped(state):
        seen.append("skipped")
        return state

    stages = (
        Stage(first, "one"),
        Stage(skipped, "never", when=lambda s: False),
        Stage(second),
        Stage(first, "again", when=lambda s: s.notes == ("a", "b")),
    )
    start = _state()
    end = run_stages(stages, start)
    assert seen == ["first", "second", "first"]
    assert end.notes == ("a", "b", "a")
    assert start.notes == ()  # each stage returns a new state; the old one is unchanged
    assert list(end.timings) == ["one", "again"]


def test_stages_that_share_a_timing_key_add_their_seconds():
    # Planning and the notes added to the plan both time as `plan`: the second, taking
    # no time, must not hide the first.
    def slow(state):
        time.sleep(0.05)
        return state

    stages = (Stage(slow, "plan"), Stage(lambda state: state, "plan"))
    assert run_stages(stages, _state()).timings["plan"] >= 0.05


def test_the_tail_reruns_from_a_kept_state(tiny_cnn, tmp_path):
    # A recipe tries a step by re-running the stages after it from the state before it:
    # the same tail on the same state writes the same model.
    stages = list(pipeline.STAGES)
    names = [stage.name for stage in stages]
    assert names[:4] == ["check_options", "load", "split_samples", "equalize"]
    assert names[-4:] == ["rewrite", "verify_and_save", "evaluate", "write_report"]
    head = stages[: names.index("plan")]
    tail = stages[names.index("plan") :]
    request = QuantizeRequest(
        model=tiny_cnn, output=tmp_path / "a.onnx", data=tmp_path / "calib"
    )
    kept = run_stages(head, QuantizeState(request=request))
    first = run_stages(tail, kept)
    again = run_stages(tail, kept.replace(output=tmp_path / "b.onnx"))
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert first.report.conversion == again.report.conversion
    direct = qconvert.quantize(tiny_cnn, tmp_path / "c.onnx", data=tmp_path / "calib")
    assert (tmp_path / "c.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()
    assert direct.conversion.quantized_ops == first.report.conversion.quantized_ops
