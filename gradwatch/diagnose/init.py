"""The rule about initialisation on its own: information, not a warning. A mismatch matters when
the run shows a consequence, and then the rule that sees it (vanishing, saturation, dying units,
exploding) names the mismatched weights as its cause, with their numbers."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.causes import SCHEME_NAMES, bad_init, init_label, init_line, torch_default
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.rundata import RunData
from gradwatch.diagnose.text import plural

#: Weights shown one per summary line; the rest are counted.
SHOWN = 4

_INIT_CALLS = {
    "glorot": "nn.init.xavier_normal_(w)  # std = sqrt(2 / (fan_in + fan_out)), for sigmoid/tanh",
    "he": "nn.init.kaiming_normal_(w, nonlinearity='relu')  # std = sqrt(2 / fan_in), for the ReLU family",
    "lecun": "nn.init.normal_(w, 0, fan_in ** -0.5)  # LeCun, std = 1 / sqrt(fan_in), for SELU and linear layers",
}


def initialisation(data: RunData) -> list[Finding]:
    """Weights whose initial std differs from what their activation calls for (the agent's init
    check), as information: PyTorch's default inits are legitimate choices."""
    bad = bad_init(data)
    if not bad:
        return []
    defaults = sum(torch_default(data, c) for c in bad)
    head = (f"{plural(len(bad), 'weight')} with an initial std outside x{th.INIT_TOLERANCE:g} of the one "
            "recommended for the activation that follows")
    if defaults == len(bad):
        head += " (PyTorch's default init)" if len(bad) == 1 else " (all on PyTorch's default init)"
    elif defaults:
        head += f" ({defaults} of them on PyTorch's default init)"
    lines = [head] + [init_line(data, c) for c in bad[:SHOWN]]
    if len(bad) > SHOWN:
        lines.append(f"and {plural(len(bad) - SHOWN, 'more weight')}")
    schemes = sorted({str(c.get("recommended")) for c in bad if c.get("recommended") in _INIT_CALLS})
    remedies = tuple(f"if a consequence shows, {SCHEME_NAMES[s]}: {_INIT_CALLS[s]}" for s in schemes) or (
        "if a consequence shows, initialise each layer for the activation that follows it (Glorot, He or LeCun)",)
    causes = ("information only: on its own a scale that differs from Glorot/He/LeCun is no problem. PyTorch's default "
              "init (std = 1/sqrt(3 fan_in)) is a legitimate choice, and normalisation, residual connections and "
              "adaptive optimisers make the init scale matter little",
              "when the run shows a consequence (vanishing flow, saturation, dead units, an early explosion), the "
              "finding that shows it names these weights as its cause")
    ratios = [float(c["ratio"]) for c in bad if isinstance(c.get("ratio"), (int, float)) and c["ratio"] > 0]
    values = {"weights": float(len(bad)), "torch_default": float(defaults)}
    if ratios:  # the std ratio furthest from 1, against the tolerance on its side
        worst = max(ratios, key=lambda r: abs(np.log(r)))
        values.update(value=worst, threshold=th.INIT_TOLERANCE if worst > 1 else 1 / th.INIT_TOLERANCE,
                      worst_ratio=worst)
    else:  # no usable ratio (a non-finite std): the number of weights
        values["value"] = float(len(bad))
    evidence = Evidence(tuple(lines), values, layers=tuple(dict.fromkeys(init_label(data, c) for c in bad)))
    return [Finding("initialisation", "info", "Initialisation differs from the recommended scale", evidence,
                    causes, remedies)]
