"""The corpus, its fixed split, the character vocabulary, and the batches both models see.

Tiny Shakespeare (``tinyshakespeare.txt`` beside this file, 1,115,394 characters of Shakespeare's
plays, public domain; the file char-rnn made popular) is split once: the first 90 % of the
characters train, the last 10 % validate. The vocabulary is the set of characters of the training
part, so nothing is learnt from the validation text; a validation character outside it is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CORPUS = Path(__file__).with_name("tinyshakespeare.txt")
VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class Corpus:
    """The split corpus as integer ids (uint8 is enough: the vocabulary has < 256 characters)."""

    vocab: str  # the characters, sorted; id k is vocab[k]
    train: np.ndarray
    validation: np.ndarray

    def encode(self, text: str) -> np.ndarray:
        lookup = {ch: i for i, ch in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(lookup))
        if unknown:
            raise ValueError(f"text has characters outside the vocabulary: {unknown!r} "
                             f"(the vocabulary is the {len(self.vocab)} characters of the training part)")
        return np.fromiter((lookup[ch] for ch in text), dtype=np.uint8, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def split(text: str, validation_fraction: float = VALIDATION_FRACTION) -> Corpus:
    """The first ``1 - validation_fraction`` of ``text`` trains, the rest validates."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be strictly between 0 and 1, got {validation_fraction!r}")
    boundary = int(len(text) * (1 - validation_fraction))
    if boundary < 2 or len(text) - boundary < 2:
        raise ValueError(f"text of {len(text)} characters is too short to split at "
                         f"validation_fraction={validation_fraction}")
    train_text, validation_text = text[:boundary], text[boundary:]
    vocab = "".join(sorted(set(train_text)))
    if len(vocab) > 256:
        raise ValueError(f"the training text has {len(vocab)} distinct characters; at most 256 are supported")
    corpus = Corpus(vocab, np.empty(0, np.uint8), np.empty(0, np.uint8))
    try:
        validation = corpus.encode(validation_text)
    except ValueError as error:
        raise ValueError(f"the validation part cannot be scored: {error}") from None
    return Corpus(vocab, corpus.encode(train_text), validation)


def load(path=CORPUS) -> Corpus:
    return split(Path(path).read_text(encoding="utf-8"))


def training_windows(train: np.ndarray, *, steps: int, batch_size: int, seq_len: int, seed: int):
    """For each step, ``batch_size`` random windows of ``seq_len + 1`` characters from ``train``
    (inputs are the first ``seq_len``, targets the last ``seq_len``), drawn from ``seed`` alone:
    every model trained with the same seed sees the same windows in the same order."""
    if len(train) <= seq_len + 1:
        raise ValueError(f"seq_len={seq_len} needs a training text longer than {seq_len + 1} characters, "
                         f"got {len(train)}")
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)
    for _ in range(steps):
        starts = rng.integers(0, len(train) - seq_len, size=batch_size)
        windows = train[starts[:, None] + offsets].astype(np.int64)
        yield windows[:, :-1], windows[:, 1:]


def streams(ids: np.ndarray, num_streams: int) -> np.ndarray:
    """``ids`` cut into ``num_streams`` contiguous rows of equal length (the tail that does not fill
    a row is dropped), for evaluation that carries each row's state from chunk to chunk."""
    length = len(ids) // num_streams
    if length < 2:
        raise ValueError(f"{len(ids)} characters cannot fill {num_streams} streams of at least 2")
    return ids[: num_streams * length].reshape(num_streams, length).astype(np.int64)
