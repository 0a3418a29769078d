"""Two MFTC adapters on one base model: save, load, switch, merge, unmerge, delete (all PEFT's own API).

Both adapters use an explicit `block_selection`, so no warm-up is needed (`mftc_peft.warmup` would fill the same
field). They are trained for a few steps on Rotten Tomatoes and differ in the blocks they train.

    python examples/load_merge_switch.py                 # about a minute on 2 CPU cores
    python examples/load_merge_switch.py --max-steps 2 --train-size 64
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is packaged: a hub lookup would be a bug

import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import mftc_peft  # noqa: E402  (registers the `mftc` tuner type: needed before PeftModel.from_pretrained)
from mftc_peft import MFTCConfig  # noqa: E402
from mftc_peft.training import encode_texts, iterate_batches, train_steps  # noqa: E402

SELECTIONS = {
    "late": {"layer.5.attention.self.value": [0, 7], "layer.5.intermediate.dense": [3], "layer.4.output.dense": [3]},
    "early": {"layer.0.attention.self.query": [1, 2], "layer.1.intermediate.dense": [0, 5]},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=20, help="training steps per adapter")
    parser.add_argument("--train-size", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-dir", default="mftc-two-adapters")
    return parser.parse_args(argv)


def base_model(folder):
    # The head is new; fixing the seed makes every load identical (the adapters save their own trained heads anyway).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)


def train_adapter(peft_model, name, data, steps, seed, batch_size):
    peft_model.set_adapter(name)  # the active adapter is the one that trains
    peft_model.train()
    batches = iterate_batches(data, batch_size, seed=seed, epochs=None)
    train_steps(peft_model, batches, lr=2e-3, steps=steps)  # trains the parameters that require gradients


def logits(model, probe):
    model.eval()
    with torch.no_grad():
        return model(**probe).logits


def main(argv=None) -> dict:
    args = parse_args(argv)
    folder = mftc_peft.assets.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = mftc_peft.assets.load_rotten_tomatoes()
    data = encode_texts(tokenizer, corpus.texts[: args.train_size], corpus.labels[: args.train_size], max_length=64)
    probe = {k: v[:8] for k, v in data.items() if k != "labels"}

    # 1. two adapters on one model, each trained with the other inactive; one save writes both
    peft_model = get_peft_model(base_model(folder), MFTCConfig(task_type="SEQ_CLS", block_selection=SELECTIONS["late"]),
                                adapter_name="late")
    peft_model.add_adapter("early", MFTCConfig(task_type="SEQ_CLS", block_selection=SELECTIONS["early"]))
    for seed, name in enumerate(SELECTIONS):
        train_adapter(peft_model, name, data, args.max_steps, seed, args.batch_size)
    expected = {}
    for name in SELECTIONS:
        peft_model.set_adapter(name)
        expected[name] = logits(peft_model, probe)
    peft_model.save_pretrained(args.output_dir)  # one subfolder per adapter (none is 'default')
    print(f"saved adapters {list(SELECTIONS)} to {args.output_dir}")

    # 2. load both into a fresh base model and switch between them
    model = PeftModel.from_pretrained(base_model(folder), os.path.join(args.output_dir, "late"),
                                      adapter_name="late")
    model.load_adapter(os.path.join(args.output_dir, "early"), adapter_name="early")
    for name in SELECTIONS:
        model.set_adapter(name)
        torch.testing.assert_close(logits(model, probe), expected[name], rtol=1e-5, atol=1e-5)
    print("reloaded: each adapter gives the logits it gave before saving")

    # 3. merge the active adapter into the weights, then take it out again
    model.set_adapter("late")
    model.merge_adapter()
    torch.testing.assert_close(logits(model, probe), expected["late"], rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()  # bit-exact: merging kept the replaced values
    with model.disable_adapter():
        plain = logits(model, probe)
    print(f"merged and unmerged; the base model without the adapter (original head too) differs by up to "
          f"{(plain - expected['late']).abs().max():.4f} in the logits")

    # 4. delete one adapter, merge the other for deployment: a plain transformers model again
    model.delete_adapter("early")
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, probe), expected["late"], rtol=1e-4, atol=1e-4)
    print(f"deleted 'early'; merge_and_unload gives a plain {type(merged).__name__} with the same logits")
    return {"adapters": list(SELECTIONS), "merged_type": type(merged).__name__}


if __name__ == "__main__":
    main()
