"""Batches, batch metrics and the one training loop (`train_steps`): its hooks, their order, and numerics equal to a
hand-written loop."""

import math
import types

import pytest
import torch

from mftc_peft.training import TrainHooks, batch_metrics, iterate_batches, make_batches, train_steps


def test_batch_metrics_classification_and_causal_lm():
    def fake(logits):
        return lambda **batch: types.SimpleNamespace(loss=torch.tensor(0.5), logits=logits)

    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])  # predicts 1, 0, 1
    assert batch_metrics(fake(logits), {"labels": torch.tensor([1, 1, 1])}) == (0.5, pytest.approx(2 / 3))
    # Causal LM: position t predicts token t + 1; -100 is skipped.
    lm_logits = torch.zeros(1, 4, 5)
    lm_logits[0, 0, 2] = lm_logits[0, 1, 3] = lm_logits[0, 2, 0] = 1.0  # predicts 2, 3, 0 for positions 1..3
    labels = torch.tensor([[7, 2, 4, -100]])
    loss, accuracy = batch_metrics(fake(lm_logits), {"labels": labels})
    assert accuracy == pytest.approx(1 / 2)
    loss, accuracy = batch_metrics(fake(logits), {"labels": torch.tensor([1, 1, 1])},
                                   compute_loss=lambda m, b: torch.tensor(0.25))
    assert loss == 0.25 and math.isnan(accuracy)


def test_batches_are_deterministic_and_trimmed():
    data = {
        "input_ids": torch.arange(40).reshape(10, 4),
        "attention_mask": torch.tensor([[1, 1, 0, 0]] * 9 + [[1, 1, 1, 0]]),
        "labels": torch.arange(10),
    }
    batches = make_batches(data, 4, rng=3)
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat([b["labels"] for b in batches]).tolist()) == list(range(10))
    assert all(b["input_ids"].shape[1] == (3 if 9 in b["labels"] else 2) for b in batches)
    first = [b["labels"].tolist() for b in iterate_batches(data, 4, seed=1, epochs=2)]
    assert first == [b["labels"].tolist() for b in iterate_batches(data, 4, seed=1, epochs=2)]
    assert first[:3] != first[3:]  # each epoch gets a fresh order
    with pytest.raises(ValueError, match=r"`batches` ran out after 3 of 5 steps"):
        model = torch.nn.Linear(1, 1)
        train_steps(model, iter([{}] * 3), params=model.parameters(), lr=0.1, steps=5,
                    compute_loss=lambda m, b: m(torch.ones(1)).sum())


def mse(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def tiny_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model[0].bias.requires_grad_(False)  # a frozen parameter: the default `params` must leave it alone
    return model


def some_batches(n):
    generator = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(5, 4, generator=generator), "y": torch.randn(5, 1, generator=generator)}
            for _ in range(n)]


def reference_loop(model, data, *, lr, steps, hooks):
    """The loop as the benchmarks wrote it by hand: AdamW, linear decay to 0, hooks around the optimiser step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: max(0.0, 1.0 - k / steps))
    losses = []
    for step, batch in zip(range(steps), data):
        loss = mse(model, batch) + hooks.extra_loss()
        loss.backward()
        hooks.after_backward()
        optimizer.step()
        hooks.after_step(step)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def test_train_steps_matches_a_hand_written_loop_bit_for_bit():
    def hooks_for(model):
        weight = model[2].weight
        return TrainHooks(
            extra_loss=lambda: 1e-2 * weight.square().sum(),
            after_backward=lambda: weight.grad.mul_(0.5),
            after_step=lambda step: model[0].weight.data.mul_(1.0 - 1e-3 * step),
        )

    expected_model, model = tiny_model(), tiny_model()
    expected = reference_loop(expected_model, some_batches(6), lr=1e-2, steps=6, hooks=hooks_for(expected_model))
    log = train_steps(model, some_batches(6), lr=1e-2, steps=6, schedule="linear", compute_loss=mse,
                      hooks=hooks_for(model), device="cpu")
    assert log.losses == tuple(expected) and log.steps == 6
    for got, want in zip(model.parameters(), expected_model.parameters()):
        assert torch.equal(got, want)
    assert torch.equal(model[0].bias, tiny_model()[0].bias)  # frozen: not in the optimiser
    assert all(p.grad is None for p in model.parameters())


def test_hook_order_and_step_callback():
    events = []
    model = tiny_model()

    def extra_loss():
        events.append("extra_loss")
        return torch.zeros(())

    hooks = TrainHooks(extra_loss=extra_loss, after_backward=lambda: events.append("after_backward"),
                       after_step=lambda step: events.append(("after_step", step, model[2].weight.grad is None)))
    log = train_steps(model, some_batches(2), lr=0.1, steps=2, optimizer="sgd", compute_loss=mse, hooks=hooks,
                      on_step=lambda step, loss: events.append(("on_step", step, loss)))
    assert events == [
        "extra_loss", "after_backward", ("after_step", 0, False), ("on_step", 0, log.losses[0]),
        "extra_loss", "after_backward", ("after_step", 1, False), ("on_step", 1, log.losses[1]),
    ]


@pytest.mark.parametrize(
    "schedule,lr_warmup_steps,factors",
    [
        ("linear", 0, [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),
        ("linear", 2, [0, 1 / 2, 1, 3 / 4, 1 / 2, 1 / 4]),  # the ramp, then the decay over the 4 steps left
        ("constant", 2, [0, 1 / 2, 1, 1, 1, 1]),
        ("constant", 0, [1] * 6),
    ],
)
def test_learning_rate_ramps_up_over_lr_warmup_steps(schedule, lr_warmup_steps, factors):
    rates, optimizer = [], []
    hooks = TrainHooks(optimizer_ready=optimizer.append,
                       after_step=lambda step: rates.append(optimizer[0].param_groups[0]["lr"]))
    train_steps(tiny_model(), some_batches(6), lr=0.1, steps=6, schedule=schedule, lr_warmup_steps=lr_warmup_steps,
                compute_loss=mse, hooks=hooks)
    assert rates == pytest.approx([0.1 * f for f in factors])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr_warmup_steps": -1}, r"`lr_warmup_steps` must be a non-negative integer, got -1"),
        ({"lr_warmup_steps": 2}, r"`lr_warmup_steps` must be smaller than `steps` \(2\), got 2"),
        ({"schedule": "cosine"}, r"`schedule` must be one of \('constant', 'linear'\), got 'cosine'"),
        ({"schedule": "linear", "steps": None}, r"`steps` must be given with `schedule='linear'`, got None"),
        ({"optimizer": "adam"}, r"`optimizer` must be one of \('adamw', 'sgd'\), got 'adam'"),
        ({"weight_decay": -0.1}, r"`weight_decay` must be a non-negative number, got -0.1"),
        ({"steps": 0}, r"`steps` must be a positive integer, got 0"),
    ],
)
def test_train_steps_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_steps(tiny_model(), some_batches(2), **{"lr": 0.1, "steps": 2, "compute_loss": mse, **kwargs})
