"""Issue 13: bad input never slips through. Every row is one bad input; each must fail with a message that names the
argument (or file), states the rule and echoes the value, and leave the user's model as it was.

Sections: config fields (items 5, 8, 9, 10), checkpoints (1, 2, 12), merge (3), warm-up (4, 11, 15), command line
(6, 14, 15, 16). Item 7 (probe dropout from the seed) is tested in test_probes_finetune.py, item 13 (the import
needed for loading) in test_readme.py.
"""

import copy
import dataclasses
import json
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_same, fingerprint, token_batches
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import CASES_BY_NAME
from transformers import BertConfig, BertForSequenceClassification

import mftc_peft  # noqa: F401
from mftc_peft import MFTCConfig
from mftc_peft.cli import app
from mftc_peft.cli.data import read_rows

# ------------------------------------------------------------------------------------------------- config fields
CONFIG_CASES = [
    # item 5: booleans must be booleans ("no" is truthy)
    ({"init_weights": "no"}, r"`init_weights` must be True or False, got 'no'"),
    ({"init_weights": 0}, r"`init_weights` must be True or False, got 0"),
    ({"head_blocks": "false"}, r"`head_blocks` must be True or False, got 'false'"),
    # item 8: regexes and module-name types
    ({"target_modules": "query("}, r"`target_modules` must be a valid regular expression, got 'query\(' \(missing \)"),
    ({"target_modules": ["query", "key["]}, r"`target_modules` must be module names or valid regular expressions, "
                                           r"got 'key\['"),
    ({"exclude_modules": "(value"}, r"`exclude_modules` must be a valid regular expression, got '\(value'"),
    ({"block_selection": {"query(": [0]}}, r"`block_selection` must be keyed by module names or valid regular "
                                           r"expressions, got 'query\('"),
    ({"target_modules": 123}, r"`target_modules` must be a string or a list of strings, got 123"),
    ({"target_modules": ["query", 5]}, r"`target_modules` must be a string or a list of strings, got \['query', 5\]"),
    # item 9: fields PEFT reads itself
    ({"modules_to_save": "classifier"}, r"`modules_to_save` must be a list of module names, got the string "
                                        r"'classifier' \(write \['classifier'\]\)"),
    ({"layers_pattern": 5}, r"`layers_pattern` must be a string or a list of strings, got 5"),
    ({"layers_to_transform": "0"}, r"`layers_to_transform` must be a non-negative integer or a list of them, got '0'"),
    # item 10: accepted before, then failing deep in the warm-up
    ({"seed": -1}, r"`seed` must be a non-negative integer, got -1"),
    ({"embed_dim": 1}, r"`embed_dim` must be an integer >= 2, got 1"),
    ({"signature_window": 1}, r"`signature_window` must be an integer >= 2, got 1"),
]


@pytest.mark.parametrize("kwargs, match", CONFIG_CASES, ids=[str(k) for k, _ in CONFIG_CASES])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MFTCConfig(**kwargs)


def test_unsorted_block_ids_are_sorted_in_the_config():
    """Item 1: `[3, 1]` was accepted and reported unsorted while the layer trains blocks [1, 3]."""
    assert MFTCConfig(block_selection={"query": [3, 1]}).block_selection == {"query": [1, 3]}


# --------------------------------------------------------------------------------------------------- checkpoints
QUERY = "layer.0.attention.self.query"
QUERY_KEY = f"base_model.model.bert.encoder.{QUERY}"


def _save_bert(tmp_path, **overrides):
    case = CASES_BY_NAME["bert"]
    kwargs = {**copy.deepcopy(case.config_kwargs), "init_weights": False, **overrides}
    get_peft_model(case.model(), MFTCConfig(**kwargs)).save_pretrained(tmp_path)
    return case


def _edit_config(tmp_path, edit):
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _edit_tensors(tmp_path, edit):
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _set_query_ids(config, ids):
    config["block_selection"][QUERY] = ids


def _replace(name, value):
    return lambda tensors: tensors.__setitem__(f"{QUERY_KEY}.{name}", value)


def _no_selection(config):
    config["block_selection"] = {}


CHECKPOINT_CASES = [
    # item 1: config and checkpoint disagree
    ("config ids edited", lambda c: _set_query_ids(c, [0, 2]), None,
     r"mftc_idx.default holds block ids \[1, 3\], but the adapter's config selects \[0, 2\] for "
     rf"{QUERY_KEY}"),
    ("checkpoint ids rewritten", None, _replace("mftc_idx", torch.tensor([0, 2], dtype=torch.int32)),
     r"holds block ids \[0, 2\], but the adapter's config selects \[1, 3\]"),
    ("checkpoint ids unsorted", _no_selection, _replace("mftc_idx", torch.tensor([3, 1], dtype=torch.int32)),
     r"mftc_idx.default block ids must be sorted ascending, got \[3, 1\]"),
    ("unlisted module has ids", lambda c: c["block_selection"].pop(QUERY), None,
     r"holds block ids \[1, 3\], but the adapter's config selects \[\] for"),
    # item 12: malformed tensors
    ("1-D delta", _no_selection, _replace("mftc_delta", torch.zeros(32)),
     r"mftc_delta.default must have shape \(32, 64\) for block ids \[1, 3\] of .*got \(32,\)"),
    ("delta rows", _no_selection, _replace("mftc_delta", torch.zeros(16, 64)),
     r"mftc_delta.default must have shape \(32, 64\) .*got \(16, 64\)"),
    ("2-D id buffer", _no_selection, _replace("mftc_idx", torch.tensor([[1], [3]], dtype=torch.int32)),
     r"mftc_idx.default must be a 1-D integer tensor of block ids, got shape \(2, 1\) of torch.int32"),
    ("float ids", _no_selection, _replace("mftc_idx", torch.tensor([1.0, 3.0])),
     r"must be a 1-D integer tensor of block ids, got shape \(2,\) of torch.float32"),
    ("geometry shape", None, _replace("mftc_geometry", torch.tensor([64, 64], dtype=torch.int32)),
     r"mftc_geometry.default must have shape \(4,\), got \(2,\): the file is damaged"),
    ("geometry", None, _replace("mftc_geometry", torch.tensor([64, 64, 8, 1], dtype=torch.int32)),
     r"saved for a 64 x 64 weight cut into blocks of 8 along 'out', but .*query is a 64 x 64 weight cut into "
     r"blocks of 16 along 'out'"),
]


@pytest.mark.parametrize("name, edit_config, edit_tensors, match", CHECKPOINT_CASES,
                         ids=[row[0] for row in CHECKPOINT_CASES])
def test_checkpoint_rejects(tmp_path, name, edit_config, edit_tensors, match):
    case = _save_bert(tmp_path)
    if edit_config:
        _edit_config(tmp_path, edit_config)
    if edit_tensors:
        _edit_tensors(tmp_path, edit_tensors)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(case.model(), tmp_path)


def _bert(intermediate_size):
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=intermediate_size, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def test_other_base_model_is_refused(tmp_path):
    """Item 2: every saved tensor fits both bases (the ids lie in range, lines have the hidden size's length)."""
    selection = {"layer.0.intermediate.dense": [1], "layer.0.output.dense": [0]}
    get_peft_model(_bert(64), MFTCConfig(task_type="SEQ_CLS", block_selection=selection)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"intermediate.dense.mftc_geometry.default was saved for a 64 x 64 weight "
                                         r"cut into blocks of 8 along 'out', but .*layer.0.intermediate.dense is a "
                                         r"96 x 64 weight .*base model whose shapes differ"):
        PeftModel.from_pretrained(_bert(96), tmp_path)


def test_checkpoint_without_geometry_still_loads(tmp_path):
    """Adapters saved before the geometry buffer existed load as before, without a missing-key warning."""
    case = _save_bert(tmp_path)
    _edit_tensors(tmp_path, lambda t: [t.pop(k) for k in list(t) if "mftc_geometry" in k])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = PeftModel.from_pretrained(case.model(), tmp_path)
    assert loaded.base_model.block_selection()[f"bert.encoder.{QUERY}"] == [1, 3]


# --------------------------------------------------------------------------------------------------------- merge
def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "mftc_" not in n}


@pytest.mark.parametrize("merge", [
    lambda m: m.merge_adapter(safe_merge=True),
    lambda m: m.merge_and_unload(safe_merge=True),
    lambda m: m.base_model.merge_adapter(["default"], safe_merge=True),
], ids=["merge_adapter", "merge_and_unload", "tuner.merge_adapter"])
def test_safe_merge_refuses_before_writing_anything(merge):
    """Item 3: the last target's merged weight is not finite; no earlier layer may be merged meanwhile."""
    case = CASES_BY_NAME["bert"]
    model = get_peft_model(case.model(), MFTCConfig(**copy.deepcopy(case.config_kwargs), init_weights=False))
    last = [layer for _, layer in model.base_model.mftc_layers() if layer.mftc_delta["default"].numel()][-1]
    with torch.no_grad():
        last.mftc_delta["default"][0, 0] = float("inf")
    before = _base_weights(model)
    with pytest.raises(ValueError, match=r"adapter default seems to be broken: merging it into "
                                         r"bert.encoder.layer.1.output.dense gives non-finite weights"):
        merge(model)
    after = _base_weights(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged for _, layer in model.base_model.mftc_layers())


# ------------------------------------------------------------------------------------------------------- warm-up
WARM = dict(task_type="SEQ_CLS", warmup_steps=4, dsca_every=4, n_clusters=4, embed_dim=6, budget=0.1)


def _warm_bert():
    return get_peft_model(CASES_BY_NAME["bert"].model(), MFTCConfig(**WARM))


def _one_class_loss(model, batch):
    """Cross-entropy over a single class: 0 whatever the weights, as with single-class training data."""
    batch = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**batch).logits[:, :1], torch.zeros(len(batch["input_ids"]), dtype=torch.long))


WARMUP_CASES = [
    # item 11: warm-up input
    ("generator too short", lambda b: (x for x in b[:2]), None,
     r"`train_dataloader` must yield 4 batches or be re-iterable .*got 2 batches and then none on the next pass"),
    ("tuple batches", lambda b: [(x["input_ids"], x["labels"]) for x in b], None,
     r"`train_dataloader` must yield dicts of model inputs .*got a tuple as batch 0"),
    ("per-sample loss", list, lambda m, b: F.cross_entropy(m(**b).logits, b["labels"], reduction="none"),
     r"`compute_loss` must return the batch's loss as a scalar tensor .*got a tensor of shape \(8,\)"),
    ("float loss", list, lambda m, b: 0.5, r"`compute_loss` must return the batch's loss as a scalar tensor .*got 0.5"),
    # item 15: all block gradients zero (API)
    ("one class", list, _one_class_loss,
     r"every block gradient was zero over the 4 warm-up micro-batches: .*single class"),
]


@pytest.mark.parametrize("name, loader, loss, match", WARMUP_CASES, ids=[row[0] for row in WARMUP_CASES])
def test_warmup_rejects_and_leaves_the_model_as_it_was(name, loader, loss, match):
    model = _warm_bert()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=match):
        mftc_peft.warmup(model, loader(token_batches(4, seed=0)), compute_loss=loss, progress=False)
    assert_same(before, fingerprint(model))


def test_non_finite_last_micro_batch_keeps_the_last_dsca_update(caplog):
    """Item 4: 3 of 4 micro-batches are finite; the update due after the 4th must still run."""
    calls = []

    def loss(model, batch):
        calls.append(1)
        value = model(**batch).loss
        return value * float("nan") if len(calls) == 4 else value

    model = _warm_bert()
    with caplog.at_level(logging.WARNING, logger="mftc_peft"):
        report = mftc_peft.warmup(model, token_batches(4, seed=0), compute_loss=loss, progress=False)
    assert "skipping micro-batch 3 with a non-finite loss" in caplog.text
    assert report.trainable_elements > 0


# -------------------------------------------------------------------------------------------------- command line
def _cli_error(capsys, *argv) -> str:
    """The one line on stderr of a command that must fail with exit status 2."""
    code = app.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


CLI_ARG_CASES = [
    # item 6: a learning rate that trains to NaN
    (["--lr", "inf"], "argument --lr: must be a positive finite number, got 'inf'"),
    (["--lr", "nan"], "argument --lr: must be a positive finite number, got 'nan'"),
    (["--lr", "0"], "argument --lr: must be a positive finite number, got '0'"),
    (["--lr=-1e-3"], "argument --lr: must be a positive finite number, got '-1e-3'"),
]


@pytest.mark.parametrize("argv, expected", CLI_ARG_CASES, ids=[" ".join(a) for a, _ in CLI_ARG_CASES])
def test_cli_rejects_argument(tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in _cli_error(capsys, "finetune", *argv)
    assert not (tmp_path / "runs").exists()


LONG_FIELD = "x" * 131_073
CLI_FILE_CASES = [
    # item 14: encodings and csv limits, one line with file and line
    ("latin1.csv", "text,label\ngood,pos\ncaf\xe9,neg\n".encode("latin-1"),
     "file {path}, line 3: must be UTF-8 text, got byte 0xe9"),
    ("latin1.jsonl", '{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 1}\n'.encode("latin-1"),
     "file {path}, line 2: must be UTF-8 text, got byte 0xe9"),
    ("long.csv", f"text,label\nok,pos\n{LONG_FIELD},neg\n".encode(),
     "file {path}, line 3: not valid CSV (field larger than field limit (131072))"),
    # item 15: one class (the warm-up would see no gradient)
    ("oneclass.csv", b"text,label\ngood,pos\nfine,pos\nnice,pos\n",
     "file {path}: every label in column 'label' is 'pos' (one class); a classifier needs at least 2 classes"),
    ("oneclass.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "label": 0}\n',
     "file {path}: every label in column 'label' is 0 (one class)"),
]


@pytest.mark.parametrize("name, content, expected", CLI_FILE_CASES, ids=[row[0] for row in CLI_FILE_CASES])
def test_cli_rejects_data_file(tmp_path, monkeypatch, capsys, name, content, expected):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_bytes(content)
    line = _cli_error(capsys, "finetune", "--train-file", path)
    assert line.startswith("mftc-peft finetune: error: ") and expected.format(path=path) in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, content", [
    ("bom.csv", "\ufefftext,label\ngood,pos\nbad,neg\n"),
    ("bom.jsonl", '\ufeff{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'),
])
def test_utf8_files_with_a_byte_order_mark_are_read(tmp_path, name, content):
    """Item 14: spreadsheet programs save "CSV UTF-8" with a byte-order mark; the first column is still `text`."""
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    rows = read_rows(path, "text", "label")
    assert [(r.text, r.label) for r in rows] == [("good", "pos"), ("bad", "neg")]


def test_diverging_training_fails_and_writes_nothing(tmp_path, capsys):
    """Item 6: a finite but huge learning rate trains to a NaN loss; the run must not 'succeed'."""
    out = tmp_path / "run"
    code = app.main(["finetune", "--method", "lora", "--lr", "1e30", "--max-train-samples", "16",
                     "--max-eval-samples", "8", "--batch-size", "8", "--max-length", "16", "--epochs", "4",
                     "--no-progress", "--output-dir", str(out)])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # transformers may print a loading bar first
    assert code == 2 and "training diverged: the loss was nan at step" in line and "of 8 with" in line
    assert "lower --lr" in line and not out.exists()
    assert "epoch 4: validation" not in err  # it stopped at the first non-finite loss, not after all 8 steps


def test_help_defaults_are_the_configs():
    """Item 16: `--warmup-steps` said 16 while MFTCConfig's default is 12."""
    finetune = next(a for a in app.build_parser()._actions if a.dest == "command").choices["finetune"]
    text = " ".join(finetune.format_help().split())
    defaults = {f.name: f.default for f in dataclasses.fields(MFTCConfig)}
    assert f"warm-up micro-batches (default: {defaults['warmup_steps']})" in text
    assert f"trainable elements (default: {defaults['budget']})" in text


def test_cli_rejects_a_training_part_of_one_class(tmp_path, monkeypatch, capsys):
    """Two classes in the file, one left to train on after the held-out rows and --max-train-samples."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "two.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n" for i in range(10)))
    line = _cli_error(capsys, "finetune", "--train-file", path, "--max-train-samples", "1")
    assert line.startswith("mftc-peft finetune: error: ") and "training rows left after holding out" in line
    assert "are all of class" in line and "--max-train-samples" in line
