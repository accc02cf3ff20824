"""The Hugging Face callback on a real `transformers.Trainer` (CPU), with tiny randomly
initialised GPT-2 and BERT models built from their configs and datasets of random token ids
(no downloads): the norm before clipping is the `grad_norm` the Trainer logs, the clip it
takes over is the Trainer's own, and the loss and learning rate match its log per step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gradwatch.agent import runlog

transformers = pytest.importorskip("transformers")
from gradwatch.integrations.hf import GradwatchCallback  # noqa: E402

VOCAB, LENGTH = 64, 12


class RandomIds(torch.utils.data.Dataset):
    """Random token ids, with language-model or classification labels."""

    def __init__(self, n: int, classify: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g) if classify else self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16,
                                                                n_layer=2, n_head=2, bos_token_id=0,
                                                                eos_token_id=0))


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=LENGTH, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def train(tmp_path: Path, model: torch.nn.Module, dataset: torch.utils.data.Dataset,
          callback: GradwatchCallback | None, **overrides) -> transformers.Trainer:
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                    learning_rate=5e-3, lr_scheduler_type="linear", report_to=[], use_cpu=True, save_strategy="no",
                    disable_tqdm=True, seed=0, data_seed=0)
    args = transformers.TrainingArguments(**{**settings, **overrides})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   callbacks=[callback] if callback is not None else None)
    trainer.train()
    return trainer


def series(path: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    blocks = [b for r in runlog.read_log(path) if isinstance(r, runlog.Frame) for b in r.blocks
              if b.metric.name == metric]
    assert blocks, f"{metric} not in {path}"
    return np.concatenate([b.steps for b in blocks]), np.concatenate([b.values[:, 0] for b in blocks])


def logged(trainer: transformers.Trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def test_gpt2_norm_before_clipping_is_the_trainers_grad_norm_and_the_clip_is_the_trainers(tmp_path):
    callback = GradwatchCallback(run="gpt2-tiny", config={"measure": {"flush_every": 3}})
    trainer = train(tmp_path, gpt2(), RandomIds(32), callback, gradient_accumulation_steps=2, max_grad_norm=0.1)
    path = callback.watcher.path
    steps, norms = series(path, "grad_norm_total")
    assert steps.tolist() == [0, 1, 2, 3]  # 2 micro-batches each: one measurement per optimizer step
    np.testing.assert_allclose(norms, logged(trainer, "grad_norm"), rtol=1e-5)
    assert (norms > 0.1).all()
    np.testing.assert_allclose(series(path, "grad_norm_total_clipped")[1], 0.1, rtol=1e-4)
    np.testing.assert_allclose(series(path, "loss")[1], logged(trainer, "loss"), rtol=1e-5)
    np.testing.assert_allclose(series(path, "lr")[1], logged(trainer, "learning_rate"), rtol=1e-6)  # the schedule
    assert trainer.args.max_grad_norm == 0.1  # handed back at train end

    reference = train(tmp_path, gpt2(), RandomIds(32), None, gradient_accumulation_steps=2, max_grad_norm=0.1)
    np.testing.assert_allclose(logged(reference, "grad_norm"), norms, rtol=1e-5)
    for p, q in zip(trainer.model.parameters(), reference.model.parameters()):  # the same clip, the same update
        torch.testing.assert_close(p, q)

    info = runlog.read_log(path)[0].info
    assert info["name"] == "gpt2-tiny" and info["optimizer"] == {"class": "AdamW", "wrappers": ["AcceleratedOptimizer"]}
    conv1d = [layer["name"] for layer in info["layers"] if layer["type"] == "Conv1D"]
    assert conv1d[:2] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"] and len(conv1d) == 8
    check = {entry["layer"]: entry for entry in info["init_check"]}
    assert (check["transformer.h.0.attn.c_attn"]["fan_in"], check["transformer.h.0.attn.c_attn"]["fan_out"]) == (16, 48)


def test_bert_classifier_loss_and_norms_match_the_trainers_log(tmp_path):
    callback = GradwatchCallback()
    trainer = train(tmp_path, bert(), RandomIds(16, classify=True), callback, max_grad_norm=0.0)
    path = callback.watcher.path
    np.testing.assert_allclose(series(path, "grad_norm_total")[1], logged(trainer, "grad_norm"), rtol=1e-5)
    np.testing.assert_allclose(series(path, "loss")[1], logged(trainer, "loss"), rtol=1e-5)
    info = runlog.read_log(path)[0].info
    assert info["name"] == "BertForSequenceClassification" and info["config"]["clip"]["mode"] == "none"
    assert "bert.encoder.layer.0.attention.self.query" in {layer["name"] for layer in info["layers"]}
    assert isinstance(runlog.read_log(path)[-1], runlog.Close)


def test_clipping_in_both_places_is_refused_and_nothing_is_left_changed(tmp_path):
    callback = GradwatchCallback(config={"clip": {"mode": "value", "max_value": 1.0}})
    with pytest.raises(ValueError, match=r"clip.mode 'value' and TrainingArguments\(max_grad_norm=1.0\) would clip "
                                         "twice"):
        train(tmp_path, gpt2(), RandomIds(8), callback, max_grad_norm=1.0)
    assert callback.watcher is None
