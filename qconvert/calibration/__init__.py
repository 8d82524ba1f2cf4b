"""Calibration: per-tensor statistics of the float model on samples, and ranges from them.

Statistics are streamed: each chunk of runs updates per-tensor observers and is dropped, so
memory does not grow with the number of samples. They merge exactly (`observers`), are
saved as JSON (`file`), and turn into ranges by any method at quantize time (`ranges`).
"""

from qconvert.calibration.collect import CollectSettings, calibrate_tensors, collect_statistics
from qconvert.calibration.file import Calibration, merge_calibrations, read_calibration
from qconvert.calibration.graphs import checked_body_tensors, tensors_to_calibrate
from qconvert.calibration.observers import MinMaxObserver, TensorObserver, TensorRange
from qconvert.calibration.ranges import METHODS, RangeMethod, derive_ranges, tensor_range
from qconvert.calibration.trt import trt_cache_text, write_trt_cache

__all__ = [
    "METHODS",
    "Calibration",
    "CollectSettings",
    "MinMaxObserver",
    "RangeMethod",
    "TensorObserver",
    "TensorRange",
    "calibrate_tensors",
    "checked_body_tensors",
    "collect_statistics",
    "derive_ranges",
    "merge_calibrations",
    "read_calibration",
    "tensor_range",
    "tensors_to_calibrate",
    "trt_cache_text",
    "write_trt_cache",
]
