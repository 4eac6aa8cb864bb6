"""A word-level LSTM language model (Embedding -> Dropout -> LSTM -> Dropout -> Linear), as in
PyTorch's word_language_model example, and the offline corpus it trains on; the model the LSTM passes
are shown on.

    fxreduce apply examples/word_lm.py:word_language_model --pipeline decompose_lstm --input-shape N,T:long

The corpus is the text CPython ships in ``pydoc_data.topics`` (the language reference's help topics,
~114k words): tokenised into words, numbers and single punctuation marks, topics split 80/10/10 into
train / valid / test in sorted order, the most frequent words kept and the rest mapped to ``<unk>``.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

TOKEN = re.compile(r"[A-Za-z_]+|[0-9]+|[^\sA-Za-z_0-9]")
UNKNOWN = "<unk>"


class WordLanguageModel(nn.Module):
    def __init__(self, vocabulary: int = 2000, embedding: int = 200, hidden: int = 200, layers: int = 2,
                 dropout: float = 0.5):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, embedding)
        self.drop_in = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding, hidden, layers, dropout=dropout, batch_first=True)
        self.drop_out = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(self.drop_in(self.embed(tokens)))
        return self.decoder(self.drop_out(output))


def word_language_model() -> WordLanguageModel:
    torch.manual_seed(0)
    return WordLanguageModel().eval()


@dataclass
class Corpus:
    """Token ids of the train / valid / test splits and the vocabulary (id -> word)."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    words: list[str]


def load_corpus(vocabulary: int = 2000) -> Corpus:
    """The pydoc_data.topics corpus with the ``vocabulary - 1`` most frequent training words kept."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut_valid, cut_test = int(0.8 * len(names)), int(0.9 * len(names))
    splits = [names[:cut_valid], names[cut_valid:cut_test], names[cut_test:]]
    tokens = [[word for name in split for word in TOKEN.findall(topics[name])] for split in splits]
    counts = collections.Counter(tokens[0])
    words = [UNKNOWN] + [word for word, _ in counts.most_common(vocabulary - 1)]
    ids = {word: i for i, word in enumerate(words)}
    encoded = [torch.tensor([ids.get(word, 0) for word in split], dtype=torch.long) for split in tokens]
    return Corpus(*encoded, words)


def batches(data: torch.Tensor, batch_size: int, steps: int, shuffle: torch.Generator | None = None):
    """(inputs, targets) pairs of shape (batch_size, steps): the stream cut into ``steps``-long windows
    (targets shifted by one word), grouped into batches, in a shuffled order when a generator is given."""
    windows = (data.numel() - 1) // steps
    inputs = data[: windows * steps].view(windows, steps)
    targets = data[1 : windows * steps + 1].view(windows, steps)
    order = torch.randperm(windows, generator=shuffle) if shuffle is not None else torch.arange(windows)
    for start in range(0, windows - batch_size + 1, batch_size):
        rows = order[start : start + batch_size]
        yield inputs[rows], targets[rows]


def train_epoch(model: nn.Module, data: torch.Tensor, optimizer: torch.optim.Optimizer, *, batch_size: int = 20,
                steps: int = 35, clip: float = 0.25, seed: int = 0, loss_fn=None, description: str = "train") -> float:
    """One epoch of next-word training; returns the mean training loss. ``loss_fn(logits, targets, inputs)``
    replaces cross-entropy (e.g. a distillation loss)."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    windows = (data.numel() - 1) // steps // batch_size
    for inputs, targets in tqdm(batches(data, batch_size, steps, generator), total=windows, desc=description,
                                leave=False):
        logits = model(inputs)
        if loss_fn is None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        else:
            loss = loss_fn(logits, targets, inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        total, count = total + loss.item(), count + 1
    return total / max(count, 1)


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, *, batch_size: int = 20, steps: int = 35) -> float:
    """exp(mean next-word cross-entropy) over ``data`` in eval mode."""
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches(data, batch_size, steps):
        logits = model(inputs)
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return math.exp(total / count)
