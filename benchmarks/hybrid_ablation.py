"""What each half of a trained hybrid adapter (blocks, low-rank part) does: remove one after training and re-score.

Each run trains a method-lab variant (`selection_study.VARIANTS`) at one rate and seed exactly as the lab does
(`selection_study.run_spec`, `harness.runner.train`), then scores the validation split three times: with the whole
adapter, with every block's delta set to 0, and with the low-rank part's B set to 0 (each restored after). It also
records how far each half moved the weights: per weight, the blocks' applied delta against the lines they cover and
the part's B @ A against the whole weight (relative Frobenius norms, medians over weights), and the cosine between
the blocks' delta and the part's update on the same lines (negative: the two halves pull against each other). NOTES
107 asked these questions.
Writes `results/hybrid_ablation.jsonl` and `.md`; validation only.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/hybrid_ablation.py --task lm \
        --runs hybrid_warmup_4@0.005,random_hybrid@0.005 --seeds 1
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from harness.methods import lora_budget
from harness.profiles import PROFILES
from harness.runner import train
from harness.tasks import make_task
from harness.profiles import rank_for
from selection_study import METRIC, VARIANTS, run_spec

from mftc_peft import MFTCLayer
from mftc_peft.low_rank import low_rank_weight

RESULTS = Path(__file__).parent / "results"
ADAPTER = "default"


def parse_runs(text: str) -> list[tuple[str, float]]:
    runs = []
    for item in text.split(","):
        name, _, lr = item.partition("@")
        if name not in VARIANTS or not lr:
            raise ValueError(f"`--runs` must be variant@lr items with variants of selection_study, got {item!r}")
        runs.append((name, float(lr)))
    return runs


def mftc_layers(model) -> list[tuple[str, MFTCLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MFTCLayer) and ADAPTER in m.mftc_delta]


def as_lines(layer: MFTCLayer, tensor: torch.Tensor) -> torch.Tensor:
    """The lines of a weight-shaped tensor that the adapter's blocks cover, (covered lines, other length)."""
    grid = layer.mftc_grid[ADAPTER]
    return grid.lines(tensor, fan_in_fan_out=layer.fan_in_fan_out)[grid.feature_index(layer.block_ids(ADAPTER))]


def halves(layer: MFTCLayer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the blocks' dense update, the part's dense update) in the base weight's layout; None for a missing half."""
    part = None
    if ADAPTER in layer.mftc_lora_A:
        a, b = layer.mftc_lora_A[ADAPTER], layer.mftc_lora_B[ADAPTER]
        part = low_rank_weight(a, b, layer.mftc_low_rank_scaling[ADAPTER], fan_in_fan_out=layer.fan_in_fan_out)
    blocks = None
    if layer.mftc_delta[ADAPTER].shape[0]:
        dense = layer.get_delta_weight(ADAPTER)  # blocks + part
        blocks = dense - part if part is not None else dense
    return blocks, part


def movement(model) -> dict:
    """Medians over adapted weights of how far each half moved its weights, and how the halves align."""
    blocks_rel, part_rel, cosines = [], [], []
    with torch.no_grad():
        for _, layer in mftc_layers(model):
            weight = layer.get_base_layer().weight.float()
            blocks, part = halves(layer)
            if part is not None:
                part_rel.append((part.norm() / weight.norm()).item())
            if blocks is None:
                continue
            lines = as_lines(layer, blocks).flatten()
            blocks_rel.append((lines.norm() / as_lines(layer, weight).norm()).item())
            if part is not None and lines.norm() > 0 and as_lines(layer, part).norm() > 0:
                on_lines = as_lines(layer, part).flatten()
                cosines.append(torch.nn.functional.cosine_similarity(lines, on_lines, dim=0).item())
    median = lambda values: float(np.median(values)) if values else None  # noqa: E731
    return {"blocks_rel_median": median(blocks_rel), "part_rel_median": median(part_rel),
            "cos_blocks_part_median": median(cosines), "weights_with_blocks": len(blocks_rel)}


@contextmanager
def zeroed(model, names: tuple[str, ...]):
    """Set the adapter's parameters of the named ParameterDicts to 0 for the block, then restore them exactly."""
    saved = []
    with torch.no_grad():
        for _, layer in mftc_layers(model):
            for name in names:
                container = getattr(layer, name)
                if ADAPTER in container:
                    saved.append((container[ADAPTER], container[ADAPTER].detach().clone()))
                    container[ADAPTER].zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, value in saved:
                parameter.copy_(value)


def ablate(spec: dict, task, device: torch.device) -> dict:
    trained = train(spec, task, device)
    model, val = trained.built.model, trained.splits.val
    scores = {"full": task.evaluate(model, val, device)}
    with zeroed(model, ("mftc_delta",)):
        scores["no_blocks"] = task.evaluate(model, val, device)
    with zeroed(model, ("mftc_lora_B",)):
        scores["no_part"] = task.evaluate(model, val, device)
    return {"variant": spec["variant"], "seed": spec["seed"], "lr": spec["lr"], "task": spec["task"],
            "profile": spec["profile"], "budget_multiple": spec["budget_multiple"], "steps": trained.steps,
            "mftc_config": spec["mftc_config"],
            **{f"{k}_{m}": v for k, s in scores.items() for m, v in s.items()}, **movement(model),
            "losses": [round(x, 5) for x in trained.result.losses]}


def table(records: list[dict]) -> str:
    lines = ["Each half of a trained hybrid removed after training (generated by hybrid_ablation.py; validation split)",
             "", "| profile | task | budget | variant | lr | seed | whole | no blocks | no part | blocks' lines moved "
             "| part moved W | cos(blocks, part) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    order = lambda r: (r["profile"], r["task"], r["budget_multiple"], r["variant"], r["lr"], r["seed"])  # noqa: E731
    for r in sorted(records, key=order):
        metric = METRIC[r["task"]][0].removeprefix("val_")
        lines.append(f"| {r['profile']} | {r['task']} | {r['budget_multiple']:g}x | {r['variant']} | {r['lr']:g} | "
                     f"{r['seed']} | {r[f'full_{metric}']:.4f} | "
                     f"{r[f'no_blocks_{metric}']:.4f} | {r[f'no_part_{metric}']:.4f} | {fmt(r['blocks_rel_median'])} "
                     f"| {fmt(r['part_rel_median'])} | {fmt(r['cos_blocks_part_median'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("cls", "lm"), default="lm")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--runs", required=True, help="comma-separated variant@lr, e.g. hybrid_warmup_4@0.005")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1")
    parser.add_argument("--budget-multiple", type=float, default=1.0, help="as selection_study.py's")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        runs = parse_runs(args.runs)
    except ValueError as error:
        parser.error(str(error))
    profile = PROFILES[args.profile]
    task = make_task(args.task, profile.settings[args.task], tiny=profile.tiny_models)
    budget = lora_budget(task, rank=rank_for(args.budget_multiple))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "hybrid_ablation.jsonl"
    for seed in range(args.seeds):
        for name, lr in runs:
            record = ablate(run_spec(args, name, lr, seed, budget), task, torch.device("cpu"))
            with path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    (args.out / "hybrid_ablation.md").write_text(table(records))
    print(table(records))


if __name__ == "__main__":
    main()
