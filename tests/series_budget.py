"""The series budget of docs/metrics.md: how many series one run costs at each label tier.

Computed, not estimated: a Llama-shaped model with the module tree of Llama-2 7B (32 decoder
layers, 291 parameter tensors) or 70B (80 layers, 723 tensors), as Hugging Face's
`LlamaForCausalLM` builds it but 8 wide, is trained for two steps with the agent measuring
everything at every step; its run log goes through the real ingester into a real store, and
the real collector (`families_for`) exports it at each tier. Width changes no series: which
layers and params exist, and which statistics each gets, depend only on the module tree.

Every rank of a data-parallel run records the same layers and params, so a host's ranks are
the recorded rank's values under other rank numbers. One `gradwatch serve` per host of 8
ranks (DESIGN.md), each exporting the ranks it sees: a run's series are one host's times
the number of hosts. Counted: every series with a `run` label (gradwatch_exporter_* are the
service's own). Print the docs tables with ``python -m tests.series_budget``.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from gradwatch.service.exporter import RunLatest, families_for
from gradwatch.service.tiers import Tiers, placements

MODELS = {"7B": 32, "70B": 80}  # decoder layers of Llama-2 7B and 70B
RANKS = (8, 64, 1024)
RANKS_PER_HOST = 8
TIERS: dict[str, Tiers] = {
    "default: blocks, reduced across ranks": Tiers(),
    "`per_rank`": Tiers(per_rank=True),
    "`per_layer`": Tiers(per_layer=True),
    "`per_layer` + `per_rank`": Tiers(per_layer=True, per_rank=True),
    "`per_layer` + `per_param`": Tiers(per_layer=True, per_param=True),
    "`per_layer` + `per_param` + `per_rank`": Tiers(per_layer=True, per_param=True, per_rank=True),
}


def record_llama(home: Path, layers: int) -> RunLatest:
    """Train a narrow Llama with `layers` decoder layers for two steps; the run as the exporter
    reads it from the store."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import gradwatch
    from gradwatch.ingest import Ingester
    from gradwatch.service.source import StoreSource
    from gradwatch.store import Store

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    assert len(list(model.parameters())) == 9 * layers + 3  # 291 tensors for 7B, 723 for 70B
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    every = {"flush_every": 1, "param_every": 1, "update_ratio_every": 1, "activation_every": 1}
    tokens = torch.randint(0, 32, (2, 6))
    with gradwatch.watch(model, opt, run=f"llama-{layers}", config={"home": str(home), "measure": every}) as w:
        for _ in range(2):
            opt.zero_grad()
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            w.log(loss=loss)
    with Store.open(home=home) as store:
        Ingester(store, home).poll_once()
        (run,) = StoreSource(store, grace=float("inf"))()
    return run


def on_ranks(run: RunLatest, ranks: int) -> RunLatest:
    """The run as a service sees it with `ranks` ranks (0 .. ranks-1) recording the same series."""
    values = [replace(v, rank=r) for r in range(ranks) for v in run.values]
    counts = {(r, counter): count for r in range(ranks) for (_, counter), count in run.counts.items()}
    return replace(run, world_size=ranks, values=values, counts=counts)


def series(run: RunLatest, tiers: Tiers) -> int:
    """Series of one run one service exports at `tiers`."""
    return sum(1 for family in families_for([run], tiers) for s in family.samples if "run" in s.labels)


def budget(runs: dict[str, RunLatest]) -> dict[tuple[str, str, int], int]:
    """{(tier, model, ranks): series of one run over all its hosts' services}."""
    out = {}
    for model, run in runs.items():
        host = {r: on_ranks(run, r) for r in {min(ranks, RANKS_PER_HOST) for ranks in RANKS}}
        for name, tiers in TIERS.items():
            for ranks in RANKS:
                per_host = min(ranks, RANKS_PER_HOST)
                out[(name, model, ranks)] = series(host[per_host], tiers) * (ranks // per_host)
    return out


def models_table(runs: dict[str, RunLatest]) -> str:
    """What the agent recorded of each model: its layers, blocks and params, and the run-level
    series of one rank."""
    lines = ["| model | decoder layers | parameter tensors | layers (`per_layer`) | blocks (default) | "
             "run-level series per rank |", "|---|---:|---:|---:|---:|---:|"]
    for model, run in runs.items():
        blocks = {u.unit for u in placements(run.layer_depths, [], Tiers()).values()}
        per_rank = sum(1 for family in families_for([run], Tiers()) for s in family.samples
                       if s.labels.get("rank") == "0" and "layer" not in s.labels)
        lines.append(f"| Llama-2 {model} | {MODELS[model]} | {len(run.param_layers)} | {len(run.layer_depths)} | "
                     f"{len(blocks)} | {per_rank} |")
    return "\n".join(lines)


def budget_table(counts: dict[tuple[str, str, int], int]) -> str:
    """Series of one run per tier, model and number of ranks."""
    head = [f"{model}, {ranks:,} ranks" for model in MODELS for ranks in RANKS]
    lines = ["| tier | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for name in TIERS:
        cells = [f"{counts[(name, model, ranks)]:,}" for model in MODELS for ranks in RANKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compute() -> str:
    """Record both models in a temporary home and return docs/metrics.md's two tables."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = {model: record_llama(Path(tmp) / model, layers) for model, layers in MODELS.items()}
    return models_table(runs) + "\n\n" + budget_table(budget(runs))


if __name__ == "__main__":
    print(compute())
