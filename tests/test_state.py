"""`preserved_state`: every property a measurement or probe could change comes back exactly."""

import contextlib

import pytest
import torch
from model_state import assert_same, fingerprint, tiny_bert

from mftc_peft.state import preserved_state


@pytest.mark.parametrize("raise_inside", [False, True])
def test_preserved_state_restores_every_property(raise_inside):
    model = tiny_bert()
    head = model.base_model.model.classifier.modules_to_save["default"]
    head.weight.grad = torch.ones_like(head.weight)  # a gradient on entry must come back as it was
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match="boom") if raise_inside else contextlib.nullcontext():
        with preserved_state(model):
            model.base_model.set_block_selection({"bert.encoder.layer.1.attention.self.key": [0, 2]})
            with torch.no_grad():
                head.weight.add_(1.0)
                model.base_model.model.bert.embeddings.position_ids.add_(1)  # a buffer
            head.weight.grad = None
            for p in model.parameters():
                p.requires_grad_(not p.requires_grad)
            model.eval()
            torch.rand(5)  # consumes the global RNG, as dropout does
            if raise_inside:
                raise RuntimeError("boom")
    assert_same(before, fingerprint(model))


def test_preserved_state_refuses_a_merged_adapter():
    model = tiny_bert()
    model.base_model.merge_adapter()
    with pytest.raises(ValueError, match="`peft_model` must not be merged while probing"):
        with preserved_state(model):
            pass
