"""Shared by the tests of the model-state helpers and of the probes that train the model: a tiny BERT adapter with
non-trivial deltas, token batches with a learnable label, a small search space, and a fingerprint of everything
`preserved_state` must restore."""

import numpy as np
import torch
from peft import get_peft_model
from tiny_models import CASES_BY_NAME, VOCAB

from mftc_peft import MFTCConfig
from mftc_peft.measure import measure_blocks
from mftc_peft.search import build_search_space


def tiny_bert():
    case = CASES_BY_NAME["bert"]
    config = MFTCConfig(**case.config_kwargs, init_weights=False)  # non-zero deltas: a restore that zeroes them fails
    model = get_peft_model(case.model(), config)
    model.train()
    model.base_model.model.bert.encoder.layer[0].attention.self.dropout.eval()  # a mixed train/eval pattern
    return model


def token_batches(n, seed, batch=8, length=9):
    """Synthetic 3-class batches whose label is a function of the second token, so training has signal."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 1] % 3})
    return out


def tiny_space(model, max_candidates=2):
    """One library module per target module, one node per layer."""
    table = measure_blocks(model, token_batches(6, seed=5)).table
    library = [np.flatnonzero(np.array(table.module_names) == name) for name in dict.fromkeys(table.module_names)]
    return build_search_space(library, table, max_candidates=max_candidates)


def fingerprint(model):
    mftc = model.base_model
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
                   for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "selection": mftc.block_selection(),
        "config": dict(mftc.peft_config["default"].block_selection),
        "rng": torch.get_rng_state(),
    }


def assert_same(before, after):
    assert before["params"].keys() == after["params"].keys()
    for name, (p, value, flag, grad) in before["params"].items():
        q, value2, flag2, grad2 = after["params"][name]
        assert q is p, f"{name} is a new Parameter object"
        assert torch.equal(value, value2), f"{name} changed"
        assert flag == flag2, f"{name}.requires_grad changed"
        assert (grad is None and grad2 is None) or torch.equal(grad, grad2), f"{name}.grad changed"
    assert before["buffers"].keys() == after["buffers"].keys()
    assert all(torch.equal(b, after["buffers"][n]) for n, b in before["buffers"].items())
    assert before["modes"] == after["modes"]
    assert before["selection"] == after["selection"] and before["config"] == after["config"]
    assert torch.equal(before["rng"], after["rng"])
