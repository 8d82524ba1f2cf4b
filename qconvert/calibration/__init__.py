"""Calibration: run the float model on samples and keep, per tensor, the statistics that
quantization ranges are derived from.

Statistics are streamed: each sample updates per-tensor observers and is dropped, so memory
does not grow with the number of samples.
"""

from qconvert.calibration.collect import calibrate_tensors, tensors_to_calibrate
from qconvert.calibration.observers import MinMaxObserver, TensorRange

__all__ = ["MinMaxObserver", "TensorRange", "calibrate_tensors", "tensors_to_calibrate"]
