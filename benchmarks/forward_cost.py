"""What the forward-pass statistics (attention, output logits, activation scale) cost a training
step, measured the way `benchmarks.overhead` measures gradwatch (docs/benchmarks.md, "How it
measures"): interleaved rounds, one torch thread, CPU time of the training thread.

Every method is gradwatch with one `forward` switch off (or all of them); the difference of its
mean CPU time per step to the method with everything on is what that part costs. The attention
statistics run inside the attention modules' forward (a `TorchFunctionMode`), outside any hook,
so the hook-based own time does not see them: the CPU time is the figure to read.

    python -m benchmarks.forward_cost                       # gpt and cnn, every step and the default cadence
    python -m benchmarks.forward_cost --models gpt --rounds 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.methods import METHODS, Gradwatch
from benchmarks.overhead import Settings, configure_torch, describe_machine, ratio_interval, time_model

OFF = {"attention": False, "logits": False, "scale": False}
#: (method name, description, `forward` section) at each cadence.
PARTS: tuple[tuple[str, str, dict[str, bool]], ...] = (
    ("all", "every forward statistic", {}),
    ("no-attention", "without the attention statistics", {"attention": False}),
    ("no-logits", "without the output-logit statistics", {"logits": False}),
    ("no-scale", "without the activation scale (act_rms, act_absmax, act_outlier)", {"scale": False}),
    ("none", "no forward statistic", OFF),
)
CADENCES = {"every": {"param_every": 1, "update_ratio_every": 1, "activation_every": 1}, "default": {}}


def register(cadence: str) -> list[str]:
    """Add this script's methods (gradwatch at `cadence` with parts switched off) to `METHODS`."""
    names = []
    for part, description, forward in PARTS:
        name = f"fw-{cadence}-{part}"
        config = {"measure": CADENCES[cadence], "forward": forward}
        METHODS[name] = lambda name=name, description=description, config=config: Gradwatch(name, description, config)
        names.append(name)
    return names


def report(model: str, cadence: str, result, resamples: int, seed: int) -> str:  # noqa: ANN001
    """A markdown table: mean CPU time per step and what each part adds over `none`."""
    methods = result.methods
    bare = methods["bare"].cpu_ns
    none = methods[f"fw-{cadence}-none"].cpu_ns
    full = np.mean(methods[f"fw-{cadence}-all"].cpu_ns)
    lines = [f"{model}, {cadence} cadence ({result.rounds} rounds)", "",
             "| method | mean CPU per step (ms) | ratio to bare [95% CI] | ratio to no forward statistic [95% CI] | "
             "cost of the part (ms/step) |", "|---|---:|---:|---:|---:|"]
    lines.append(f"| bare | {np.mean(bare) / 1e6:.2f} | 1 | – | – |")
    for part, _, _ in PARTS:
        cpu = methods[f"fw-{cadence}-{part}"].cpu_ns
        r_bare = ratio_interval(cpu, bare, resamples, seed, "mean")
        r_none = ratio_interval(cpu, none, resamples, seed, "mean")
        # "all": what every part together costs over none; "no-X": what switching X off saves
        cost = "–" if part == "none" else f"{(full - np.mean(none if part == 'all' else cpu)) / 1e6:+.2f}"
        lines.append(f"| {part} | {np.mean(cpu) / 1e6:.2f} | {r_bare[0]:.3f} [{r_bare[1]:.3f}, {r_bare[2]:.3f}] | "
                     f"{r_none[0]:.3f} [{r_none[1]:.3f}, {r_none[2]:.3f}] | {cost} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt,cnn", help="comma-separated: gpt, cnn, lstm, mlp")
    parser.add_argument("--cadences", default="every,default", help="comma-separated: every, default")
    parser.add_argument("--rounds", type=int, default=20, help="measured rounds per model and cadence")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = configure_torch("cpu")
    machine = describe_machine(device.type)
    print(f"- Machine: {machine['cpu']}; {machine['os']}\n- Versions: {machine['versions']}\n"
          f"- Run: {machine['date']}, 1 torch thread, {args.warmup} warm-up rounds, then {args.rounds} rounds; "
          f"load average at the start {machine['load_start']}\n")
    for cadence in args.cadences.split(","):
        methods = ("bare", *register(cadence))
        settings = Settings(models=tuple(args.models.split(",")), methods=methods, rss_methods=(),
                            rounds=args.rounds, budget_s=0.0, warmup=args.warmup, device="cpu", batch_scale=1,
                            seed=args.seed, bootstrap=2000, rss_steps=0, rss_reps=0, import_reps=0)
        with tempfile.TemporaryDirectory(prefix="gradwatch-forward-") as tmp:
            for model in settings.models:
                result = time_model(model, settings, Path(tmp))
                print(report(model, cadence, result, settings.bootstrap, settings.seed), "\n", flush=True)


if __name__ == "__main__":
    main()
