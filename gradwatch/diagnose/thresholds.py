"""Diagnosis thresholds. docs/diagnosis.md says why each value was chosen."""

#: Window: rules that judge a steady state use the last half of the steps they are given.
WINDOW_FRACTION = 0.5

#: Vanishing: gradient flow (act_grad_norm) at the first layer below this fraction of the last.
VANISHING_RATIO = 1e-3
#: Vanishing needs at least this many measured layers to speak of depth.
VANISHING_MIN_LAYERS = 3

#: Exploding, relative: a step whose pre-clip total norm exceeds SPIKE_FACTOR x the median of
#: the preceding SPIKE_LOOKBACK steps (at least SPIKE_MIN_HISTORY of them) is a spike.
SPIKE_FACTOR = 10.0
SPIKE_LOOKBACK = 25
SPIKE_MIN_HISTORY = 3
#: A spike this many times its local median is an error rather than a warning.
SEVERE_SPIKE_FACTOR = 1000.0
#: Exploding, growth: median total norm of the last quarter over the first quarter of the steps,
#: once the growth that the learning-rate schedule explains is taken out.
GROWTH_FACTOR = 100.0
#: Growth is judged on at least this many finite norms.
GROWTH_MIN_STEPS = 8
#: Exploding, absolute: the total gradient norm above this multiple of the total parameter norm.
GRAD_PARAM_RATIO = 100.0
#: Exploding, absolute: the median pre-clip norm above this multiple of the clipping threshold.
CLIP_EXPLOSION_FACTOR = 100.0

#: Loss spike: a logged loss above the median of the preceding LOSS_LOOKBACK logged values (at
#: least LOSS_MIN_HISTORY of them) by LOSS_SPIKE_Z robust standard deviations of its noise
#: (1.4826 x the median absolute change from one logged value to the next / sqrt 2) and by
#: LOSS_SPIKE_RISE x |median| (and LOSS_SPIKE_MIN_RISE in absolute terms); all on the log scale
#: when every finite loss is positive.
LOSS_LOOKBACK = 100
LOSS_MIN_HISTORY = 8
LOSS_SPIKE_Z = 6.0
LOSS_SPIKE_RISE = 1.0
LOSS_SPIKE_MIN_RISE = 1e-6
#: A spiking loss not back under its limit on any of the (at least) this many logged steps after it began
#: did not recover.
LOSS_UNRECOVERED_STEPS = 3

#: A learning rate this many times its median over the steps given is a burst (a cause to name).
LR_BURST_FACTOR = 10.0
#: How many steps before a problem a learning-rate burst is looked for.
LR_BURST_LOOKBACK = 25

#: Saturation: median saturation_ratio of a bounded activation over the window.
SATURATION_RATIO = 0.5
SEVERE_SATURATION_RATIO = 0.9

#: Dying ReLU: median dead_ratio of a ReLU-family layer over the window.
DEAD_RATIO = 0.5
SEVERE_DEAD_RATIO = 0.9

#: Initialisation: the agent's init check calls a std outside this factor of the recommended one a
#: mismatch (gradwatch.agent.initcheck.TOLERANCE).
INIT_TOLERANCE = 1.5
#: A std within this relative distance of 1/sqrt(3 fan) is PyTorch's default init.
TORCH_DEFAULT_TOLERANCE = 0.1

#: Clipping: clipped on more than this fraction of the steps.
CLIP_RATE = 0.5

#: Suggested clipping threshold: this percentile of the pre-clip norms that are not spikes.
CLIP_PERCENTILE = 90.0

#: Optimizer health (gradwatch/diagnose/optimizer.py). Adam's second moment behind: a layer's mean
#: g²/(sqrt(v̂)+eps)² at or above this in the ADAM_LOOKBACK steps before a spike (healthy: about 1).
ADAM_LAG_RATIO = 10.0
#: eps dominated: a layer's fraction of elements with eps > sqrt(v̂) at or above this before a spike,
#: with its update RMS ADAM_RMS_JUMP times its median before, at or up to the spike.
ADAM_EPS_FRACTION = 0.5
ADAM_RMS_JUMP = 3.0
ADAM_LOOKBACK = 25
#: Update-to-weight ratio: the reference band of Adam-family training (about 1e-3 per step), and how
#: far outside it a layer's median must lie to be reported.
UPDATE_RATIO_LOW = 1e-4
UPDATE_RATIO_HIGH = 1e-2
UPDATE_RATIO_FAR = 10.0
#: Skipped spikes: a warning above this skip rate (the guard's window), information below it.
SKIP_RATE = 0.05
