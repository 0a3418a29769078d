"""The two tasks: data (fixed train / validation / test splits), the base model, and evaluation.

- "cls": sequence classification, packaged all-MiniLM-L6-v2 on Rotten Tomatoes snippets (accuracy).
- "lm": causal language modelling, packaged SmolLM2-135M (4-bit GGUF dequantised to float32, so its weights carry
  Q4_1 rounding noise) on Hamlet: train on acts I-IV, perplexity on act V, in fixed-length token chunks.

With `tiny=True` both use tiny randomly initialised models (BERT / Llama) and random tokens: no assets, for tests.
The data split is fixed (data seed 0) for every run seed; the run seed drives the head's initialisation and the order
of the training batches, identically for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mftc_peft.training import encode_texts, evaluate, make_batches

from .profiles import TaskSettings

DATA_SEED = 0
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_TINY_VOCAB = 128


def trim_padding(batch: dict) -> dict:
    """Drop the padding columns no example of a right-padded batch uses (exact: masked keys add nothing); ~20% of
    the tokens of a Rotten Tomatoes batch padded to 64."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    length = max(int(mask.sum(dim=1).max()), 1)
    if int(mask[:, :length].sum()) != int(mask.sum()):  # left padding: leave it alone
        return batch
    width = mask.shape[1]
    return {k: v[:, :length] if v.dim() == 2 and v.shape[1] == width else v for k, v in batch.items()}


@dataclass
class Splits:
    train: dict  # tensors of the examples the methods train on (the validation split removed)
    val: dict
    test: dict


class Task:
    """What a method needs to know about a task; subclasses fill in data, model and metric."""

    name: str
    task_type: str  # PEFT task type
    metric: str  # "accuracy" (higher is better) or "perplexity" (lower is better)
    head_prefixes: tuple[str, ...]  # names of newly initialised, always-trained parameters
    targets: list[str]  # the attention + FFN linear layers every adapter method targets

    def __init__(self, settings: TaskSettings, *, tiny: bool = False):
        self.settings, self.tiny = settings, tiny

    def is_head(self, name: str) -> bool:
        return any(prefix in name for prefix in self.head_prefixes)

    def load_model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)  # the new head's initialisation: the same for every method of a seed
        return self._tiny_model() if self.tiny else self._pretrained_model()

    def splits(self) -> Splits:
        raise NotImplementedError

    def evaluate(self, model, data: dict, device) -> dict:
        batches = [{k: v.to(device) for k, v in trim_padding(b).items()}
                   for b in make_batches(data, self.settings.batch_size)]
        loss, accuracy = evaluate(model, batches)
        return self._metrics(loss, accuracy)

    def steps(self) -> int:
        s = self.settings
        if s.steps is not None:
            return s.steps
        n_fit = len(self.splits().train["input_ids"])
        return s.epochs * math.ceil(n_fit / s.batch_size)


class ClassificationTask(Task):
    name, task_type, metric, head_prefixes, targets = "cls", "SEQ_CLS", "accuracy", ("classifier",), BERT_TARGETS

    def _pretrained_model(self):
        from transformers import AutoModelForSequenceClassification

        from mftc_peft.assets import minilm_dir

        return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)

    def _tiny_model(self):
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=_TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, num_labels=2)
        return BertForSequenceClassification(config)

    def splits(self) -> Splits:
        if getattr(self, "_splits", None) is None:
            self._splits = self._tiny_splits() if self.tiny else self._real_splits()
        return self._splits

    def _real_splits(self) -> Splits:
        from transformers import AutoTokenizer

        from mftc_peft.assets import load_rotten_tomatoes, minilm_dir

        s = self.settings
        data = load_rotten_tomatoes()
        order = np.random.default_rng(DATA_SEED).permutation(len(data.texts))
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())

        def encode(index):
            return encode_texts(tokenizer, [data.texts[i] for i in index], [data.labels[i] for i in index],
                                max_length=s.max_length)

        n_fit = s.n_train - s.n_val
        return Splits(
            train=encode(order[:n_fit]), val=encode(order[n_fit : s.n_train]),
            test=encode(order[s.n_train : s.n_train + s.n_test]),
        )

    def _tiny_splits(self) -> Splits:
        s, rng = self.settings, np.random.default_rng(DATA_SEED)

        def make(n):
            ids = torch.as_tensor(rng.integers(1, _TINY_VOCAB, size=(n, s.max_length)))
            labels = (ids[:, 0] % 2).long()  # learnable from the first token
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

        return Splits(train=make(s.n_train - s.n_val), val=make(s.n_val), test=make(s.n_test))

    def _metrics(self, loss: float, accuracy: float) -> dict:
        return {"accuracy": accuracy, "loss": loss}


class LanguageModelTask(Task):
    name, task_type, metric, head_prefixes, targets = "lm", "CAUSAL_LM", "perplexity", (), LLAMA_TARGETS

    def _pretrained_model(self):
        from transformers import AutoModelForCausalLM

        from mftc_peft.assets import smollm2_dir

        return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)

    def _tiny_model(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=_TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
        return LlamaForCausalLM(config)

    def splits(self) -> Splits:
        if getattr(self, "_splits", None) is None:
            self._splits = self._make_splits(*self._token_streams())
        return self._splits

    def _token_streams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens of the training text, tokens of the test text)."""
        if self.tiny:
            rng = np.random.default_rng(DATA_SEED)
            s = self.settings
            make = lambda n: torch.as_tensor(rng.integers(1, _TINY_VOCAB, size=n * s.max_length))  # noqa: E731
            return make(s.n_train), make(s.n_test)
        from transformers import AutoTokenizer

        from mftc_peft.assets import load_hamlet_acts, smollm2_dir

        acts = load_hamlet_acts()
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
        encode = lambda text: torch.as_tensor(tokenizer(text)["input_ids"])  # noqa: E731
        return encode("\n".join(acts[:4])), encode(acts[4])

    def _make_splits(self, train_tokens: torch.Tensor, test_tokens: torch.Tensor) -> Splits:
        s = self.settings
        train, test = _chunks(train_tokens, s.max_length), _chunks(test_tokens, s.max_length)
        order = np.random.default_rng(DATA_SEED).permutation(len(train["input_ids"]))
        if s.n_train is not None:
            order = order[: s.n_train]
        n_fit = len(order) - s.n_val
        pick = lambda data, index: {k: v[torch.as_tensor(index)] for k, v in data.items()}  # noqa: E731
        if s.n_test is not None:
            test = pick(test, np.arange(min(s.n_test, len(test["input_ids"]))))
        return Splits(train=pick(train, np.sort(order[:n_fit])), val=pick(train, np.sort(order[n_fit:])), test=test)

    def _metrics(self, loss: float, accuracy: float) -> dict:
        # Every chunk has the same length, so the size-weighted mean of batch losses is the mean token loss.
        return {"perplexity": math.exp(loss), "loss": loss, "next_token_accuracy": accuracy}


def _chunks(tokens: torch.Tensor, length: int) -> dict:
    """Consecutive non-overlapping chunks of `length` tokens (the remainder dropped), labels = inputs."""
    n = len(tokens) // length
    ids = tokens[: n * length].reshape(n, length)  # (n, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


TASKS = {"cls": ClassificationTask, "lm": LanguageModelTask}


def make_task(name: str, settings: TaskSettings, *, tiny: bool = False) -> Task:
    if name not in TASKS:
        raise ValueError(f"`task` must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name](settings, tiny=tiny)
