"""Does the mLSTM learn better than an LSTM? A character-level language model on Tiny Shakespeare.

``python -m examples.char_lm`` (see :mod:`.train` and ``docs/example-char-lm.md``).
"""
