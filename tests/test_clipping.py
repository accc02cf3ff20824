"""Clipping modes against torch's own clipping and independent numpy references, with no host sync."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.agent.clipping import ClipResult, make_clipper
from gradwatch.agent.config import ClipConfig

# ---------------------------------------------------------------- helpers


def _norms(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-gradient float32 norms and their total, as the watcher hands them over."""
    norms = torch.stack([torch.linalg.vector_norm(g).float() for g in grads])
    return norms, torch.linalg.vector_norm(norms)


def _norm64(arrays: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(a, dtype=np.float64) ** 2)) for a in arrays))


class _ToDouble(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), torch.randn(8, 6)


def _mlp_mixed_dtype() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), _ToDouble(), nn.Linear(16, 3).double()), torch.randn(8, 6)


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    return model, torch.randn(4, 3, 8, 8)


def _lstm() -> tuple[nn.Module, torch.Tensor]:
    return nn.LSTM(5, 7, batch_first=True), torch.randn(3, 4, 5)


def _transformer() -> tuple[nn.Module, torch.Tensor]:
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return layer, torch.randn(2, 5, 8)


MODELS = {"mlp": _mlp, "mlp-mixed-dtype": _mlp_mixed_dtype, "cnn-batchnorm": _cnn, "lstm": _lstm,
          "transformer": _transformer}


def _model_grads(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Params and gradients of one backward pass through a small model."""
    torch.manual_seed(0)
    model, x = MODELS[name]()
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    params = [p for p in model.parameters() if p.grad is not None]
    return params, [p.grad for p in params]


def _torch_reference(grads: list[torch.Tensor], clip: Callable[[list[nn.Parameter]], object]) -> list[torch.Tensor]:
    """Clip copies of `grads` with a torch.nn.utils function."""
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    clip(params)
    return [p.grad for p in params]


def _check_result(res: ClipResult, grads: list[torch.Tensor], total: torch.Tensor) -> None:
    """total_after is the norm of the clipped grads; coef is total_after / total; both 0-d float32."""
    for t in (res.total_after, res.coef):
        assert t.dim() == 0 and t.dtype == torch.float32 and t.device == total.device
    recomputed = _norm64([g.detach().numpy() for g in grads])
    assert float(res.total_after) == pytest.approx(recomputed, rel=1e-5)
    assert float(res.coef) == pytest.approx(recomputed / float(total), rel=1e-5)


# ---------------------------------------------------------------- norm and value vs torch


@pytest.mark.parametrize("factor", [0.3, 3.0], ids=["clips", "no-clip"])
@pytest.mark.parametrize("model", list(MODELS))
def test_norm_matches_clip_grad_norm(model: str, factor: float) -> None:
    params, grads = _model_grads(model)
    norms, total = _norms(grads)
    max_norm = factor * float(total)
    expected = _torch_reference(grads, lambda ps: nn.utils.clip_grad_norm_(ps, max_norm))
    res = make_clipper(ClipConfig(mode="norm", max_norm=max_norm)).clip_(params, grads, norms, total)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)
    _check_result(res, grads, total)
    assert float(res.threshold) == pytest.approx(max_norm)
    if factor > 1:
        assert float(res.coef) == 1.0
    else:
        assert float(res.coef) == pytest.approx(max_norm / float(total), rel=1e-5)


@pytest.mark.parametrize("factor", [0.3, 3.0], ids=["clips", "no-clip"])
@pytest.mark.parametrize("model", list(MODELS))
def test_value_matches_clip_grad_value(model: str, factor: float) -> None:
    params, grads = _model_grads(model)
    norms, total = _norms(grads)
    max_value = factor * max(float(g.abs().max()) for g in grads)
    expected = _torch_reference(grads, lambda ps: nn.utils.clip_grad_value_(ps, max_value))
    res = make_clipper(ClipConfig(mode="value", max_value=max_value)).clip_(params, grads, norms, total)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    _check_result(res, grads, total)
    assert res.threshold is None
    if factor > 1:
        assert float(res.coef) == pytest.approx(1.0, abs=1e-6)
    else:
        assert float(res.coef) < 0.99


# ---------------------------------------------------------------- adaptive modes vs numpy references

STEPS = 60
SPIKES = {12: 40.0, 33: 30.0, 34: 25.0, 47: 60.0}


def _weights() -> list[torch.Tensor]:
    """Parameters of several shapes; two rows of the last are tiny, so AGC's eps matters."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(6, 4), (6,), (3, 2, 3, 3), (), (5, 4)]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    weights[-1][1:3] *= 1e-5
    return weights


def _grad_steps(scale: float, bad: dict[int, float] | None = None) -> list[list[torch.Tensor]]:
    """Random float32 grads of log-normally varying scale with spikes; `bad[step]` poisons one element."""
    gen = torch.Generator().manual_seed(2)
    steps = []
    for step in range(STEPS):
        s = scale * math.exp(0.5 * float(torch.randn((), generator=gen))) * SPIKES.get(step, 1.0)
        grads = [torch.randn(w.shape, generator=gen) * s for w in _weights()]
        if bad and step in bad:
            grads[0].view(-1)[3] = bad[step]
        steps.append(grads)
    return steps


class _RefParamNorm:
    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def step(self, grads: list[np.ndarray]) -> tuple[list[np.ndarray], float | None]:
        out = [g * min(self.max_norm / (np.linalg.norm(g) + 1e-6), 1.0) for g in grads]
        return out, self.max_norm

    def threshold(self) -> float | None:
        return self.max_norm


class _RefAgc:
    def __init__(self, weights: list[np.ndarray], excluded: set[int], factor: float = 0.01, eps: float = 1e-3) -> None:
        self.weights, self.excluded, self.factor, self.eps = weights, excluded, factor, eps

    def step(self, grads: list[np.ndarray]) -> tuple[list[np.ndarray], float | None]:
        out = []
        for i, (w, g) in enumerate(zip(self.weights, grads)):
            if i in self.excluded:
                out.append(g.copy())
                continue
            rows = 1 if g.ndim <= 1 else g.shape[0]
            w2, g2 = w.reshape(rows, -1), g.reshape(rows, -1).copy()
            for r in range(rows):
                limit = self.factor * max(float(np.linalg.norm(w2[r])), self.eps)
                norm = float(np.linalg.norm(g2[r]))
                if norm > limit:
                    g2[r] *= limit / norm
            out.append(g2.reshape(g.shape))
        return out, None

    def threshold(self) -> float | None:
        return None


class _RefAutoClip:
    """AutoClip's reference: record the norm, clip_grad_norm_ to the percentile of the history."""

    def __init__(self, percentile: float = 10.0, history: int = 1000) -> None:
        self.percentile = percentile
        self.history: collections.deque[float] = collections.deque(maxlen=history)

    def step(self, grads: list[np.ndarray]) -> tuple[list[np.ndarray], float | None]:
        total = _norm64(grads)
        self.history.append(total)
        threshold = float(np.percentile(list(self.history), self.percentile))
        coef = min(threshold / (total + 1e-6), 1.0)
        return [g * coef for g in grads], threshold

    def threshold(self) -> float | None:
        """The threshold from the history alone, for a step whose norm is not recorded."""
        return float(np.percentile(list(self.history), self.percentile)) if self.history else math.inf


class _RefZClip:
    """ZClip: warm-up buffer, then EMA mean/variance updated with the clipped norm, mean first."""

    def __init__(self, alpha: float = 0.97, z: float = 2.5, warmup: int = 25) -> None:
        self.alpha, self.z, self.warmup = alpha, z, warmup
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def step(self, grads: list[np.ndarray]) -> tuple[list[np.ndarray], float | None]:
        total = _norm64(grads)
        if self.mean is None:
            self.buffer.append(total)
            if len(self.buffer) == self.warmup:
                self.mean = sum(self.buffer) / self.warmup
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / self.warmup
            return [g.copy() for g in grads], math.inf
        threshold = self.threshold()
        clipped = total
        coef = 1.0
        if total > threshold:
            coef = threshold / (total + 1e-6)
            clipped = threshold
        self.mean = self.alpha * self.mean + (1 - self.alpha) * clipped
        self.var = self.alpha * self.var + (1 - self.alpha) * (clipped - self.mean) ** 2
        return [g * coef for g in grads], threshold

    def threshold(self) -> float | None:
        return math.inf if self.mean is None else self.mean + self.z * math.sqrt(self.var)


def _check_threshold(res: ClipResult, expected: float | None, step: int) -> None:
    if expected is None:
        assert res.threshold is None
    else:
        assert float(res.threshold) == pytest.approx(expected, rel=2e-5), f"step {step}"


ADAPTIVE = {
    "param_norm": (dict(mode="param_norm", max_norm=4.0), 1.0, lambda: _RefParamNorm(4.0)),
    "agc": (dict(mode="agc"), 0.01, lambda: _RefAgc([w.numpy() for w in _weights()], {0})),
    "auto_percentile": (dict(mode="auto_percentile"), 1.0, lambda: _RefAutoClip()),
    "auto_percentile-p50-ring16": (dict(mode="auto_percentile", percentile=50, history=16), 1.0,
                                   lambda: _RefAutoClip(50, 16)),
    "zscore": (dict(mode="zscore"), 1.0, lambda: _RefZClip()),
    "zscore-warmup5-z1.5": (dict(mode="zscore", warmup=5, z_threshold=1.5, alpha=0.9), 1.0,
                            lambda: _RefZClip(0.9, 1.5, 5)),
}


def _compare_sequence(case: str, bad: dict[int, float] | None = None) -> set[bool]:
    """Run a clipper over the grad sequence and its reference over the finite steps.

    Returns whether the reference changed each gradient (but the first, excluded from AGC) at each step.
    """
    cfg, scale, make_ref = ADAPTIVE[case]
    weights = _weights()
    clipper = make_clipper(ClipConfig(**cfg), exclude=[weights[0]])
    ref = make_ref()
    changed = set()
    for step, grads in enumerate(_grad_steps(scale, bad)):
        originals = [g.numpy().copy() for g in grads]
        norms, total = _norms(grads)
        res = clipper.clip_(weights, grads, norms, total)
        if bad and step in bad:  # the threshold comes from the state alone, the norm is not recorded
            _check_threshold(res, ref.threshold(), step)
            continue
        expected, threshold = ref.step(originals)
        for g, e in zip(grads, expected):
            np.testing.assert_allclose(g.numpy(), e, rtol=2e-5, atol=1e-9, err_msg=f"step {step}")
        _check_result(res, grads, total)
        _check_threshold(res, threshold, step)
        changed.update(not np.array_equal(e, o) for e, o in zip(expected[1:], originals[1:]))
    return changed


@pytest.mark.parametrize("case", list(ADAPTIVE))
def test_adaptive_mode_matches_reference(case: str) -> None:
    # The sequence must exercise both sides of the rule, or the comparison proves little.
    assert _compare_sequence(case) == {True, False}


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("case", list(ADAPTIVE))
def test_nonfinite_step_does_not_poison_state(case: str, value: float) -> None:
    # Step 0 meets an empty history, step 3 falls in every warm-up, step 40 after it.
    _compare_sequence(case, bad={0: value, 3: value, 40: value})


def test_agc_leaves_excluded_params_alone() -> None:
    weights = _weights()
    grads = [torch.randn(w.shape) for w in weights]
    before = [g.clone() for g in grads]
    norms, total = _norms(grads)
    make_clipper(ClipConfig(mode="agc"), exclude=[weights[0], weights[2]]).clip_(weights, grads, norms, total)
    assert torch.equal(grads[0], before[0]) and torch.equal(grads[2], before[2])
    assert not torch.equal(grads[1], before[1]) and not torch.equal(grads[4], before[4])


# ---------------------------------------------------------------- every mode: dtypes, factory, no host sync

ALL_MODES = {
    "norm": dict(mode="norm", max_norm=2.0),
    "value": dict(mode="value", max_value=0.5),
    "param_norm": dict(mode="param_norm", max_norm=1.0),
    "agc": dict(mode="agc", clip_factor=0.05),
    "auto_percentile": dict(mode="auto_percentile", history=4),
    "zscore": dict(mode="zscore", warmup=3, z_threshold=0.5),
}


def _run_steps(cfg: dict, device: str, dtypes: tuple[torch.dtype, ...], patch: Callable[[], object] | None = None,
               unpatch: Callable[[], object] | None = None) -> list[list[torch.Tensor]]:
    """Run a clipper for 8 steps (one of them non-finite), patching only around `clip_`."""
    weights = [w.to(device, dtypes[i % len(dtypes)]) for i, w in enumerate(_weights())]
    clipper = make_clipper(ClipConfig(**cfg), exclude=[weights[-1]])
    results = []
    for step, grads in enumerate(_grad_steps(0.3, bad={5: math.nan})[:8]):
        grads = [g.to(device, w.dtype) for g, w in zip(grads, weights)]
        norms, total = _norms(grads)
        if patch:
            patch()
        try:
            res = clipper.clip_(weights, grads, norms, total)
        finally:
            if unpatch:
                unpatch()
        results.append([g.float().cpu() for g in grads] + [res.total_after.cpu(), res.coef.cpu()])
    return results


@pytest.mark.parametrize("mode", list(ALL_MODES))
def test_mixed_dtypes_match_float32(mode: str) -> None:
    single = _run_steps(ALL_MODES[mode], "cpu", (torch.float32,))
    mixed = _run_steps(ALL_MODES[mode], "cpu", (torch.float32, torch.float64))
    for step, (a, b) in enumerate(zip(single, mixed)):
        if step != 5:
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", list(ALL_MODES))
def test_no_host_sync(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def raiser(*args: object, **kwargs: object) -> None:
        raise AssertionError("host synchronisation in clip_")

    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]

    def patch() -> None:
        for name in names:
            monkeypatch.setattr(torch.Tensor, name, raiser)

    patched = _run_steps(ALL_MODES[mode], "cpu", (torch.float32,), patch, monkeypatch.undo)
    plain = _run_steps(ALL_MODES[mode], "cpu", (torch.float32,))
    for a, b in zip(patched, plain):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", list(ALL_MODES))
def test_no_cuda_sync(mode: str) -> None:
    previous = torch.cuda.get_sync_debug_mode()
    on_gpu = _run_steps(ALL_MODES[mode], "cuda", (torch.float32, torch.bfloat16),
                        lambda: torch.cuda.set_sync_debug_mode("error"),
                        lambda: torch.cuda.set_sync_debug_mode(previous))
    on_cpu = _run_steps(ALL_MODES[mode], "cpu", (torch.float32, torch.bfloat16))
    for step, (a, b) in enumerate(zip(on_gpu, on_cpu)):
        if step != 5:
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("mode", list(ALL_MODES))
def test_make_clipper_returns_working_clipper(mode: str) -> None:
    clipper = make_clipper(ClipConfig(**ALL_MODES[mode]))
    params = [torch.ones(3, 4), torch.ones(5)]
    for scale in (0.1, 0.1, 0.1, 0.1, 10.0):  # the adaptive modes learn the small norms, then clip the spike
        grads = [torch.full((3, 4), scale), torch.full((5,), -scale)]
        norms, total = _norms(grads)
        res = clipper.clip_(params, grads, norms, total)
        assert isinstance(res, ClipResult)
        _check_result(res, grads, total)
        assert (res.threshold is None) == (mode in ("value", "agc"))
    assert float(res.total_after) < 0.5 * float(total)


def test_make_clipper_none_mode() -> None:
    assert make_clipper(ClipConfig()) is None
    assert make_clipper(ClipConfig(mode="none", max_norm=1.0)) is None
