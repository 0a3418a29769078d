"""Gradient (activation) checkpointing with `enable_input_require_grads`, as PEFT users train: the warm-up and training
checkpoint the layers (their backward recomputes them) and give what they give without checkpointing."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from test_trainer import examples
from test_warmup import WARMUP, token_batches
from tiny_models import CASES_BY_NAME, VOCAB
from transformers import TrainingArguments
from transformers.modeling_layers import GradientCheckpointingLayer

import mftc_peft
from mftc_peft import MFTCConfig
from mftc_peft.probes_finetune import measure_selection

# A submodule inside each checkpointed layer: its forward runs again when the backward recomputes the layer.
INNER = {"llama_gqa": "mlp", "bert": "intermediate"}


@pytest.fixture
def inner_calls(monkeypatch):
    """Counts, per case, the forward calls of the INNER submodule class (module hooks do not see recomputation)."""
    calls = []

    def count(case_name):
        layer = next(m for m in CASES_BY_NAME[case_name].model().modules() if isinstance(m, GradientCheckpointingLayer))
        cls = type(getattr(layer, INNER[case_name]))
        forward = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
        return calls

    return count


def build(case_name, checkpointing):
    case = CASES_BY_NAME[case_name]
    base = case.model()
    if checkpointing is not None:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        base.enable_input_require_grads()
    config = MFTCConfig(task_type=case.config_kwargs["task_type"], **{**WARMUP, "budget": 0.1})
    return get_peft_model(base, config)


def warm_up(model, causal):
    return mftc_peft.warmup(model, token_batches(6, causal=causal), progress=False).selection


def training_step(model, causal):
    """One SGD step; returns the deltas' gradients."""
    model.train()
    torch.manual_seed(0)  # the same dropout masks in both runs (checkpointing replays the RNG state)
    model(**token_batches(1, causal=causal, seed=5)[0]).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "mftc_delta" in n and p.requires_grad}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    return grads


@pytest.mark.parametrize("case_name", ["llama_gqa", "bert"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_warmup_and_training_step_under_gradient_checkpointing(case_name, reentrant, inner_calls):
    calls = inner_calls(case_name)
    causal = case_name != "bert"
    plain, checkpointed = build(case_name, None), build(case_name, {"use_reentrant": reentrant})
    selection = warm_up(plain, causal)
    plain_calls = len(calls)
    grads = training_step(plain, causal)
    calls.clear()
    assert warm_up(checkpointed, causal) == selection and selection
    # Every forward of a layer is recomputed in the backward: the warm-up holds no more activations than training.
    assert len(calls) == 2 * plain_calls
    calls.clear()
    checkpointed_grads = training_step(checkpointed, causal)
    assert len(calls) == 2 * 2  # 2 layers x (forward + recompute)
    assert grads.keys() == checkpointed_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_training_probe_without_dropout_still_checkpoints(inner_calls):
    calls = inner_calls("llama_gqa")
    selection = dict(CASES_BY_NAME["llama_gqa"].config_kwargs["block_selection"])
    measured = {}
    for checkpointing in (None, {"use_reentrant": False}):
        model = build("llama_gqa", checkpointing)
        full = {name: selection[key] for key in selection for name, _ in model.base_model.mftc_layers()
                if name.endswith(key)}
        calls.clear()
        result = measure_selection(model, full, token_batches(2, causal=True), token_batches(1, causal=True, seed=1),
                                   steps=2, lr=1e-2, dropout=False)
        measured[checkpointing is not None] = (result.loss, len(calls))
    (loss, plain_calls), (checkpointed_loss, checkpointed_calls) = measured[False], measured[True]
    assert checkpointed_calls == plain_calls + 2 * 2  # 2 training steps x 2 layers recomputed; eval has no backward
    assert checkpointed_loss == pytest.approx(loss, rel=1e-5)


def causal_examples(n, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 9), generator=generator)
    return [{"input_ids": ids[i], "labels": ids[i].clone()} for i in range(n)]


def train_with_trainer(tmp_path, case_name, checkpointing):
    case = CASES_BY_NAME[case_name]
    model = get_peft_model(
        case.model(), MFTCConfig(task_type=case.config_kwargs["task_type"], **{**WARMUP, "budget": 0.1})
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no",
        gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    data = examples(64, 0) if case_name == "bert" else causal_examples(64, 0)
    trainer = mftc_peft.MFTCTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


@pytest.mark.parametrize("case_name", ["bert", "llama_gqa"])
def test_mftc_trainer_with_gradient_checkpointing(tmp_path, case_name, inner_calls):
    calls = inner_calls(case_name)
    plain, plain_losses = train_with_trainer(tmp_path / "plain", case_name, False)
    plain_calls = len(calls)
    calls.clear()
    checkpointed, losses = train_with_trainer(tmp_path / "checkpointed", case_name, True)
    assert checkpointed.model.base_model.model.is_gradient_checkpointing
    assert len(calls) > plain_calls  # the warm-up and the steps recomputed layers
    assert checkpointed.warmup_report.selection == plain.warmup_report.selection
    assert checkpointed.warmup_report.selection
    assert len(losses) == len(plain_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-5)


def test_deterministic_mode_keeps_a_layers_own_dropout_off_while_it_checkpoints():
    """BART-style layers apply dropout with their own `training` flag (`F.dropout(..., training=self.training)`), the
    flag transformers also reads to checkpoint: the measurement must neither drop out nor stop checkpointing."""
    from transformers import BartConfig, BartForSequenceClassification

    from mftc_peft.training import deterministic_mode

    torch.manual_seed(0)
    config = BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                        dropout=0.5, num_labels=2)
    model = BartForSequenceClassification(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(3, VOCAB, (2, 7))
    ids[:, -1] = config.eos_token_id
    layer = model.model.encoder.layers[0]
    fc1_calls = []
    layer.fc1.register_forward_hook(lambda *_: fc1_calls.append(1))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    model.train()
    with deterministic_mode(model):
        first = model(input_ids=ids).logits
        second = model(input_ids=ids).logits
        fc1_calls.clear()
        first.sum().backward()
    assert torch.equal(first, second) and torch.allclose(first, expected, atol=1e-6)  # no dropout
    assert len(fc1_calls) == 1  # the backward recomputed the layer: it was checkpointed
    assert model.training and layer.training and "forward" not in vars(layer)  # all put back
