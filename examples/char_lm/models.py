"""Character language models: embedding -> recurrent layer -> linear, with the mLSTM or torch's LSTM,
and the LSTM hidden size that gives both the same number of parameters."""

from __future__ import annotations

import torch
from torch import nn

from backends.torch import MLSTM

KINDS = ("mlstm", "lstm")
PARAMETER_TOLERANCE = 0.02  # the "equal parameter counts (within 2 %)"


class CharLM(nn.Module):
    """``logits, state = model(ids, state)``: ids ``(B, T)`` int64, logits ``(B, T, V)``."""

    def __init__(self, kind: str, vocab_size: int, embed_size: int, hidden_size: int):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, value in (("vocab_size", vocab_size), ("embed_size", embed_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.kind = kind
        self.embed = nn.Embedding(vocab_size, embed_size)
        # Each recurrent layer starts as its own library initialises it (Glorot-uniform for the mLSTM,
        # U(-1/sqrt(H), 1/sqrt(H)) for nn.LSTM; biases zero / uniform): the comparison is out of the box.
        self.rnn = (MLSTM(embed_size, hidden_size, batch_first=True) if kind == "mlstm"
                    else nn.LSTM(embed_size, hidden_size, batch_first=True))
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids: torch.Tensor, state=None):
        hs, state = self.rnn(self.embed(ids), state)
        return self.head(hs), state


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lstm_parameter_count(vocab_size: int, embed_size: int, hidden_size: int) -> int:
    """What ``parameter_count(CharLM("lstm", ...))`` is, without building it (torch's LSTM has
    ``weight_ih (4H, E)``, ``weight_hh (4H, H)`` and two biases ``(4H,)``)."""
    lstm = 4 * hidden_size * (embed_size + hidden_size) + 8 * hidden_size
    return vocab_size * embed_size + lstm + hidden_size * vocab_size + vocab_size


def matched_lstm_hidden_size(target: int, vocab_size: int, embed_size: int) -> int:
    """The LSTM hidden size whose CharLM has the parameter count nearest ``target``."""
    if target < lstm_parameter_count(vocab_size, embed_size, 1):
        raise ValueError(f"no LSTM CharLM has as few as {target} parameters")
    size = 1
    while lstm_parameter_count(vocab_size, embed_size, size + 1) <= target:
        size += 1
    above = size + 1
    below_gap = target - lstm_parameter_count(vocab_size, embed_size, size)
    above_gap = lstm_parameter_count(vocab_size, embed_size, above) - target
    return size if below_gap <= above_gap else above


def build_pair(vocab_size: int, embed_size: int, mlstm_hidden_size: int, *, seed: int):
    """The mLSTM model and the LSTM model of (within 2 %) the same parameter count, each initialised
    from its own seed derived from ``seed``. Raises if the counts differ by more than 2 %."""
    torch.manual_seed(seed)
    mlstm = CharLM("mlstm", vocab_size, embed_size, mlstm_hidden_size)
    lstm_hidden_size = matched_lstm_hidden_size(parameter_count(mlstm), vocab_size, embed_size)
    torch.manual_seed(seed + 1)
    lstm = CharLM("lstm", vocab_size, embed_size, lstm_hidden_size)
    counts = parameter_count(mlstm), parameter_count(lstm)
    if abs(counts[1] - counts[0]) > PARAMETER_TOLERANCE * counts[0]:
        raise ValueError(f"the LSTM ({counts[1]} parameters, hidden {lstm_hidden_size}) is not within "
                         f"{PARAMETER_TOLERANCE:.0%} of the mLSTM ({counts[0]}, hidden {mlstm_hidden_size})")
    return mlstm, lstm
