"""The collector (reductions inside the calibration graph) against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from qconvert import model as model_io
from qconvert import testing
from qconvert.calibration import CollectSettings, TensorObserver, collect_statistics
from qconvert.calibration.graphs import exposed_model, tensors_to_calibrate
from qconvert.dataset import Sample
from qconvert.passes import prepare
from qconvert.runtime import make_session


@pytest.mark.parametrize(
    ("batch_size", "fold_runs"),
    [(1, 64), (1, 3), (4, 64), (3, 2)],
    ids=["one-fold", "many-folds", "batched", "batched-uneven"],
)
def test_statistics_equal_a_direct_computation(tmp_path, batch_size, fold_runs):
    proto = testing.conv_bn_relu()
    model = prepare(model_io.load_model(testing.save(proto, tmp_path / "m.onnx")), min_opset=1)
    names = tensors_to_calibrate(model)
    samples = [Sample(f"s{i}", testing.random_inputs(proto, seed=i)) for i in range(10)]
    settings = CollectSettings(
        batch_size=batch_size, histogram_values=10**9, fold_runs=fold_runs
    )
    observed = collect_statistics(model, samples, names, settings=settings)

    # Optimized with every tensor read by a node other than its own readers, and one
    # thread, as the collector runs it: same kernels, so the same numbers.
    session = make_session(exposed_model(model, names), threads=1)
    expected = {name: TensorObserver() for name in names}
    for sample in samples:
        for name, array in zip(names, session.run(names, sample.feeds), strict=True):
            expected[name].update(array)
    for name in names:
        a, b = observed[name], expected[name]
        assert (a.count, a.exponent, a.first_bin) == (b.count, b.exponent, b.first_bin), name
        np.testing.assert_allclose([a.min, a.max], [b.min, b.max], rtol=1e-6, atol=1e-6)
        if batch_size == 1:  # same kernels, same numbers: identical histograms
            assert (a.min, a.max) == (b.min, b.max)
            np.testing.assert_array_equal(a.bins, b.bins)
        else:
            assert a.histogram_count == b.histogram_count


def test_large_tensors_histogram_a_strided_subset(tmp_path):
    proto = testing.conv_bn_relu()
    model = prepare(model_io.load_model(testing.save(proto, tmp_path / "m.onnx")), min_opset=1)
    samples = [Sample(f"s{i}", testing.random_inputs(proto, seed=i)) for i in range(4)]
    observed = collect_statistics(
        model, samples, ["input", "relu"], settings=CollectSettings(histogram_values=50)
    )
    # input: 3*8*8 = 192 values a sample; 50 a sample at most -> stride 5 (odd), 39 values.
    assert observed["input"].count == 4 * 192
    assert observed["input"].histogram_count == 4 * len(range(0, 192, 5))
    minmax_only = collect_statistics(
        model, samples, ["input"], settings=CollectSettings(histogram_values=0)
    )
    assert minmax_only["input"].histogram_count == 0
    assert minmax_only["input"].max == observed["input"].max


def test_outputs_whose_shape_depends_on_the_data(tmp_path):
    # NonZero's output length depends on the values, not only on the input shape.
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        data_dependent (float[N,6] x) => (float[M] output) {
            r = Relu (x)
            flat = Reshape (r, minus_one)
            positions = NonZero (flat)
            idx = Reshape (positions, minus_one)
            picked = Gather (flat, idx)
            output = Identity (picked)
        }
    """
    import onnx

    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus_one")
    )
    model = prepare(model_io.load_model(testing.save(proto, tmp_path / "m.onnx")), min_opset=1)
    rng = np.random.default_rng(0)
    samples = [
        Sample(f"s{i}", {"x": rng.standard_normal((1, 6)).astype(np.float32)})
        for i in range(6)
    ]
    observed = collect_statistics(model, samples, ["r", "picked"])
    relu = np.concatenate([np.maximum(s.feeds["x"], 0).ravel() for s in samples])
    assert observed["picked"].count == int(np.count_nonzero(relu))
    assert observed["picked"].max == float(relu.max())
    assert observed["r"].count == 36


@pytest.mark.parametrize("way", ["reduced", "whole"])
def test_nan_found_in_a_run_names_the_tensor(tmp_path, monkeypatch, way):
    from qconvert.calibration import reducing

    monkeypatch.setattr(reducing, "WHOLE_VALUES", -1 if way == "reduced" else 10**9)
    # onnxruntime's ReduceMin/ReduceMax skip a NaN that is not first: the sum tells, and
    # the raw run of that batch names the tensor.
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        roots (float[1,64] x) => (float[1,64] y) {
            root = Sqrt (x)
            y = Add (root, x)
        }
    """
    import onnx

    from qconvert.errors import CalibrationDataError

    model = prepare(
        model_io.load_model(testing.save(onnx.parser.parse_model(text), tmp_path / "m.onnx")),
        min_opset=1,
    )
    rng = np.random.default_rng(0)
    samples = [
        Sample(f"s{i}", {"x": rng.uniform(0.0, 1.0, (1, 64)).astype(np.float32)})
        for i in range(40)
    ]
    samples[25].feeds["x"][0, 3] = -1.0  # sqrt(-1): NaN, several chunks into the data
    settings = CollectSettings(fold_runs=4, concurrent_runs=2)
    with pytest.raises(CalibrationDataError, match="Tensor 'root' took NaN values"):
        collect_statistics(model, samples, ["x", "root"], settings=settings)
    # Without the bad sample, the same settings give the one-chunk statistics.
    del samples[25]
    small = collect_statistics(model, samples, ["x", "root"], settings=settings)
    whole = collect_statistics(model, samples, ["x", "root"])
    for name in ("x", "root"):
        assert (small[name].min, small[name].max) == (whole[name].min, whole[name].max)
        np.testing.assert_array_equal(small[name].bins, whole[name].bins)


def test_one_tensor_a_pass_gives_the_statistics_of_one_pass(tmp_path):
    # Each pass runs the graph optimized once with every tensor exposed, so a tensor is
    # computed by the same kernels whichever others share its pass.
    proto = testing.conv_bn_relu()
    model = prepare(model_io.load_model(testing.save(proto, tmp_path / "m.onnx")), min_opset=1)
    names = tensors_to_calibrate(model)
    samples = [Sample(f"s{i}", testing.random_inputs(proto, seed=i)) for i in range(6)]
    whole = collect_statistics(model, samples, names)
    single = collect_statistics(
        model, samples, names, settings=CollectSettings(tensors_per_pass=1)
    )
    assert len(names) > 1
    for name in names:
        a, b = whole[name], single[name]
        assert (a.min, a.max, a.count, a.exponent) == (b.min, b.max, b.count, b.exponent)
        np.testing.assert_array_equal(a.bins, b.bins)


def test_concurrent_runs_give_the_statistics_of_one_run_at_a_time(tmp_path):
    # `--workers auto` runs a batch per core at once on the one session; each run is the
    # run it would be alone, and the observers merge exactly. Small folds make several.
    proto = testing.conv_bn_relu()
    model = prepare(model_io.load_model(testing.save(proto, tmp_path / "m.onnx")), min_opset=1)
    names = tensors_to_calibrate(model)
    samples = [Sample(f"s{i}", testing.random_inputs(proto, seed=i)) for i in range(12)]
    settings = {
        runs: CollectSettings(fold_runs=2, concurrent_runs=runs, batch_size=2)
        for runs in (1, 3)
    }
    threaded = collect_statistics(model, samples, names, settings=settings[3])
    in_line = collect_statistics(model, samples, names, settings=settings[1])
    for name in names:
        a, b = threaded[name], in_line[name]
        assert (a.min, a.max, a.count, a.exponent) == (b.min, b.max, b.count, b.exponent)
        np.testing.assert_array_equal(a.bins, b.bins)


def test_the_calibration_session_keeps_its_arena_without_a_memory_pattern(
    tmp_path, monkeypatch
):
    # A planned block per run would need an arena region of its own beside the first run's
    # tensors, and concurrent runs place their blocks as they interleave; without the
    # pattern each run takes its tensors one by one, and every value stays the same.
    import qconvert.calibration.collect as collect
    import qconvert.calibration.graphs as graphs

    proto = testing.conv_bn_relu()
    model = _prepared(proto, tmp_path)
    names = tensors_to_calibrate(model)
    samples = [Sample(f"s{i}", testing.random_inputs(proto, seed=i)) for i in range(8)]
    settings = CollectSettings(concurrent_runs=2, fold_runs=3)
    opened = []

    def recording(*args, **kwargs):
        opened.append(graphs.open_session(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(collect, "open_session", recording)
    without = collect_statistics(model, samples, names, settings=settings)
    options = opened[0].get_session_options()
    assert (options.enable_cpu_mem_arena, options.enable_mem_pattern) == (True, False)

    def with_pattern(*args, memory_pattern=True, **kwargs):
        return make_session(*args, **kwargs)

    monkeypatch.setattr(graphs, "make_session", with_pattern)
    opened.clear()
    patterned = collect_statistics(model, samples, names, settings=settings)
    assert opened[0].get_session_options().enable_mem_pattern
    for name in names:
        a, b = without[name], patterned[name]
        assert (a.min, a.max, a.count, a.exponent) == (b.min, b.max, b.count, b.exponent)
        np.testing.assert_array_equal(a.bins, b.bins)


def test_the_session_exposes_exactly_the_calibrated_tensors(tmp_path):
    proto = testing.conv_bn_relu()
    model = prepare(model_io.load_model(testing.save(proto, tmp_path / "m.onnx")), min_opset=1)
    names = tensors_to_calibrate(model)
    inputs = {value.name for value in model.graph.inputs}
    exposed = tuple(name for name in names if name not in inputs)
    session = make_session(exposed_model(model, exposed), threads=1)
    outputs = [output.name for output in session.get_outputs()]
    originals = [value.name for value in model.graph.outputs]
    assert set(outputs) == set(originals) | set(exposed)


def _prepared(proto, tmp_path):
    return prepare(model_io.load_model(testing.save(proto, tmp_path / "m.onnx")), min_opset=1)


@pytest.mark.parametrize("whole", ["none", "all"])
def test_the_calibration_graph_reads_each_tensor_right_after_its_producer(tmp_path, whole):
    # Reductions next to their tensor let onnxruntime free each activation once its
    # readers are done; only a handful of vectors leave a run, whatever the tensor count.
    import onnx
    import onnx_ir as ir

    from qconvert.calibration import reducing
    from qconvert.calibration.graphs import _dtypes

    model = _prepared(testing.conv_bn_relu(), tmp_path)
    names = tensors_to_calibrate(model)
    graph = reducing.reducing_graph(
        ir.serde.serialize_model(model),
        names,
        _dtypes(model),
        histogram=True,
        whole=names if whole == "all" else (),
    )
    assert set(graph.whole if whole == "all" else graph.reduced) == set(names)
    proto = onnx.load_from_string(graph.data)
    nodes = list(proto.graph.node)
    for tensor in names:
        producer = next(
            (i for i, node in enumerate(nodes) if tensor in node.output),
            -1,  # a graph input
        )
        assert nodes[producer + 1].op_type == "Reshape", tensor
        assert nodes[producer + 1].input[0] == tensor
    originals = [value.name for value in model.graph.outputs]
    outputs = [output.name for output in proto.graph.output]
    assert outputs[: len(originals)] == originals
    vectors = 4 if whole == "none" else 2  # mins, maxs, sizes, subsets | values, lengths
    assert len(outputs) == len(originals) + vectors + len(graph.checks)
    assert list(graph.outputs) == outputs[len(originals) :]
    assert len(graph.checks) == len(originals)
    assert ([i.name for i in proto.graph.input][-1] == graph.steps) == (whole == "none")


def _direct(model, names, samples, budget):
    """The statistics as the calibration graph defines them, from the tensors themselves:
    min, max and size of every value, the histogram of every `reducing.stride`-th."""
    from qconvert.calibration import reducing

    session = make_session(exposed_model(model, names), threads=1)
    expected = {name: TensorObserver() for name in names}
    for sample in samples:
        for name, array in zip(names, session.run(names, sample.feeds), strict=True):
            flat = array.reshape(-1)
            expected[name].update(flat, flat[:: reducing.stride(flat.size, budget)])
    return expected


@pytest.mark.parametrize("whole", ["none", "some", "all"])
@pytest.mark.parametrize(
    "build",
    [testing.conv_bn_relu, testing.matmul_layernorm_exp, testing.loop_matmul_relu],
    ids=["cnn", "matmul-layernorm", "loop-body"],
)
def test_statistics_do_not_depend_on_which_tensors_leave_whole(
    tmp_path, monkeypatch, build, whole
):
    # Reduced inside onnxruntime or passed out whole and reduced in numpy, every tensor
    # gets the statistics of its own values: the same min, max, count and histogram bins
    # (a strided subset here, 20 values a sample) as the tensors exposed and observed.
    from qconvert.calibration import reducing
    from qconvert.calibration.collect import _Runner

    # "some": the smallest tensors, 40 values a run in all.
    monkeypatch.setattr(reducing, "WHOLE_VALUES", -1 if whole == "none" else 10**9)
    monkeypatch.setattr(reducing, "WHOLE_TOTAL", 40 if whole == "some" else 10**9)
    proto = build()
    model = _prepared(proto, tmp_path)
    names = tensors_to_calibrate(model)
    samples = [
        Sample(f"s{i}", testing.random_inputs(proto, batch=1 + i % 2, seed=i))
        for i in range(9)
    ]
    settings = CollectSettings(histogram_values=20, fold_runs=3, concurrent_runs=2)
    runner = _Runner(model, names, settings)
    observed = runner.collect(samples, names, None)
    graph = runner.reader.graph
    expected_split = {"none": (False, True), "some": (True, True), "all": (True, False)}
    if build is testing.loop_matmul_relu:
        # Tensors of a Loop body are passed out stacked, in a size known at run time only.
        expected_split = dict.fromkeys(expected_split, (False, True))
    assert (bool(graph.whole), bool(graph.reduced)) == expected_split[whole]
    expected = _direct(model, names, samples, budget=20)
    for name in names:
        a, b = observed[name], expected[name]
        assert (a.min, a.max, a.count, a.exponent, a.first_bin) == (
            b.min,
            b.max,
            b.count,
            b.exponent,
            b.first_bin,
        ), name
        np.testing.assert_array_equal(a.bins, b.bins, err_msg=name)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_one_split_hands_each_reduced_tensor_its_own_stride(tmp_path, monkeypatch, opset):
    # Split's even form takes no sizes up to opset 17 and its number of outputs from 18.
    # Tensors of different sizes take different strides: each histogram is that of its own.
    import onnx
    import onnx_ir as ir

    from qconvert.calibration import reducing
    from qconvert.calibration.collect import _Runner
    from qconvert.calibration.graphs import _dtypes

    monkeypatch.setattr(reducing, "WHOLE_VALUES", -1)  # every tensor reduced in the graph
    proto = testing.conv_bn_relu()
    if opset < proto.opset_import[0].version:  # its ops read the same at these opsets
        del proto.opset_import[:]
        proto.opset_import.add(domain="", version=opset)
    model = prepare(
        model_io.load_model(testing.save(proto, tmp_path / "m.onnx")), min_opset=opset
    )
    assert model.opset_imports[""] == opset
    names = tensors_to_calibrate(model)
    samples = [Sample(f"s{i}", testing.random_inputs(proto, seed=i)) for i in range(4)]
    runner = _Runner(model, names, CollectSettings(histogram_values=20))
    observed = runner.collect(samples, names, None)
    built = reducing.reducing_graph(
        ir.serde.serialize_model(model), names, _dtypes(model), histogram=True
    )
    ops = [node.op_type for node in onnx.load_from_string(built.data).graph.node]
    assert ops.count("Split") == 1 and "Gather" not in ops
    strides = reducing.strides(runner.inferred[next(iter(runner.inferred))], 20)
    assert len(set(strides.tolist())) > 1
    expected = _direct(model, names, samples, budget=20)
    for name in names:
        a, b = observed[name], expected[name]
        assert (a.min, a.max, a.count, a.first_bin) == (b.min, b.max, b.count, b.first_bin)
        np.testing.assert_array_equal(a.bins, b.bins, err_msg=name)


def test_small_tensors_leave_whole_by_their_size_on_the_first_batch():
    # Sizes from shape inference on the first batch's shapes: a dynamic H and W (as in
    # an OCR classifier) are known once the data is.
    import onnx

    from qconvert.calibration import reducing

    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        dynamic (float[N,2,H,W] x) => (float[N,2,H,W] y, float[M] picked) {
            r = Relu (x)
            y = Sigmoid (r)
            flat = Reshape (r, minus_one)
            positions = NonZero (flat)
            idx = Reshape (positions, minus_one)
            picked = Gather (flat, idx)
        }
    """
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus_one")
    )
    names = ("x", "r", "y", "picked")
    sizes = reducing.run_sizes(proto, names, {"x": (1, 2, 8, 16)})
    assert sizes == {"x": 256, "r": 256, "y": 256}  # picked: as many as the data says
    assert reducing.whole_tensors(sizes, most=256, total=512) == ("r", "x")
    assert reducing.whole_tensors(sizes, most=255) == ()
    assert reducing.run_sizes(proto, names, {"x": (1, 2, 64, 64)})["y"] == 8192


@pytest.mark.parametrize("way", ["reduced", "whole"])
def test_infinite_values_count_as_no_range(tmp_path, monkeypatch, way):
    from qconvert.calibration import reducing

    monkeypatch.setattr(reducing, "WHOLE_VALUES", -1 if way == "reduced" else 10**9)
    # Log(0) = -inf: the min shows it, the batch runs again raw, and the statistics are
    # those of the finite values, as the observers define them.
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        logs (float[1,16] x) => (float[1,16] y) {
            r = Relu (x)
            l = Log (r)
            y = Mul (l, x)
        }
    """
    import onnx

    model = _prepared(onnx.parser.parse_model(text), tmp_path)
    rng = np.random.default_rng(1)
    samples = [
        Sample(f"s{i}", {"x": rng.uniform(-1.0, 2.0, (1, 16)).astype(np.float32)})
        for i in range(8)
    ]
    samples[3].feeds["x"][0, :4] = 0.5  # one sample with no zero: nothing infinite there
    observed = collect_statistics(model, samples, ["r", "l"], settings=CollectSettings())
    with np.errstate(divide="ignore"):
        logs = [np.log(np.maximum(s.feeds["x"], 0)).ravel() for s in samples]
    finite = np.concatenate([v[np.isfinite(v)] for v in logs])
    expected = TensorObserver()
    expected.update(finite)
    assert observed["l"].count == finite.size
    assert (observed["l"].min, observed["l"].max) == (expected.min, expected.max)
    assert observed["r"].count == 8 * 16


def test_models_below_opset_10_are_calibrated_raw(tmp_path):
    # Slice takes its step as an input from opset 10 on: older models expose the tensors.
    text = """
        <ir_version: 4, opset_import: ["" : 9]>
        old (float[1,8] x) => (float[1,8] y) {
            r = Relu (x)
            y = Sigmoid (r)
        }
    """
    import onnx

    model = _prepared(onnx.parser.parse_model(text), tmp_path)
    rng = np.random.default_rng(2)
    samples = [
        Sample(f"s{i}", {"x": rng.standard_normal((1, 8)).astype(np.float32)})
        for i in range(5)
    ]
    from qconvert.calibration.collect import _Runner

    runner = _Runner(model, ("r",), CollectSettings())
    runner.collect(samples[:1], ("r",), None)
    assert runner.session is None
    observed = collect_statistics(model, samples, ["x", "r"])
    relu = np.concatenate([np.maximum(s.feeds["x"], 0).ravel() for s in samples])
    assert observed["r"].count == relu.size
    assert observed["r"].max == float(relu.max())
    assert observed["x"].min == float(min(s.feeds["x"].min() for s in samples))


def test_sizes_of_a_model_that_lists_its_weights_as_inputs():
    # IR 3 models list every initializer as a graph input too.
    from onnx import helper

    from qconvert.calibration import reducing

    proto = testing.conv_bn_relu()
    for tensor in proto.graph.initializer:
        proto.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        )
    sizes = reducing.run_sizes(proto, ("input", "relu", "logits"), {"input": (2, 3, 8, 8)})
    assert sizes == {"input": 384, "relu": 1024, "logits": 20}


def test_whole_tensors_are_reduced_per_tensor_whatever_their_lengths():
    # The whole tensors leave a run as one vector; the reader reduces each one's segment,
    # empty ones (a data-dependent size) included, and a NaN stays in its own tensor.
    from qconvert.calibration import folding, reducing

    rng = np.random.default_rng(0)
    parts = {
        "a": rng.standard_normal(5).astype(np.float32),
        "b": np.zeros(0, np.float32),
        "c": rng.standard_normal(3).astype(np.float32),
        "d": np.array([1.0, np.nan, -2.0], np.float32),
        "e": rng.standard_normal(7).astype(np.float32),
        "f": np.zeros(0, np.float32),
    }
    graph = reducing.ReducingGraph(
        data=b"",
        reduced=(),
        whole=tuple(parts),
        mins=None,
        maxs=None,
        sizes=None,
        somes=None,
        values="values",
        lengths="lengths",
        steps=None,
        checks=(),
    )
    reader = folding.RunReader(graph, tuple(parts))
    values = np.concatenate(list(parts.values()))
    lengths = np.array([p.size for p in parts.values()], np.int64)
    run = reader.read([values, lengths], None, 1024)

    for index, part in enumerate(parts.values()):
        if part.size:
            np.testing.assert_array_equal(run.mins[index], part.min())
            np.testing.assert_array_equal(run.maxs[index], part.max())
        else:
            assert (run.mins[index], run.maxs[index]) == (np.inf, -np.inf)
    assert np.isnan(run.mins[3]) and np.isfinite(run.mins[[0, 2, 4]]).all()
    assert run.sizes.tolist() == lengths.tolist()
