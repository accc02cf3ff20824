"""Diagnosis thresholds. docs/diagnosis.md says why each value was chosen."""

#: Window: rules judge the steady part of a run, the last half of its measured steps.
WINDOW_FRACTION = 0.5

#: Vanishing: gradient flow (act_grad_norm) at the first layer below this fraction of the last.
VANISHING_RATIO = 1e-3
#: Vanishing needs at least this many measured layers to speak of depth.
VANISHING_MIN_LAYERS = 3

#: Exploding: a step whose pre-clip total norm exceeds this multiple of the median of the
#: preceding `SPIKE_LOOKBACK` steps is a spike.
SPIKE_FACTOR = 10.0
SPIKE_LOOKBACK = 25
SPIKE_MIN_HISTORY = 10
#: Exploding: median total norm of the last quarter over the first quarter of the run.
GROWTH_FACTOR = 100.0
#: A spike this many times its local median is an error rather than a warning.
SEVERE_SPIKE_FACTOR = 1000.0

#: Saturation: median saturation_ratio of a bounded activation over the window.
SATURATION_RATIO = 0.5
SEVERE_SATURATION_RATIO = 0.9

#: Dying ReLU: median dead_ratio of a ReLU-family layer over the window.
DEAD_RATIO = 0.5
SEVERE_DEAD_RATIO = 0.9

#: Clipping: clipped on more than this fraction of the steps.
CLIP_RATE = 0.5

#: Suggested clipping threshold: this percentile of the pre-clip norms that are not spikes.
CLIP_PERCENTILE = 90.0
