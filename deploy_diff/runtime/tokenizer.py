"""Prompt tokenization for text-to-image bundles: the bundle's ``tokenizer.json`` run by the ``tokenizers`` library.

:class:`PromptTokenizer` turns prompts into the ``input_ids`` int64[B, model_max_length] a text encoder takes, the
ids transformers' ``CLIPTokenizer`` gives diffusers for the same folder (``padding="max_length"``,
``truncation=True``): the tokenizer's own normalisation (CLIP: NFC, whitespace runs to one space, lower case),
its pre-tokenization and BPE, the start and end tokens around every prompt, truncation to ``model_max_length``
(the end token kept) and padding with the pad token after it. The padding and truncation come from the arguments
(the bundle's manifest), not from whatever the file has enabled.

``tokenizers`` (a Rust library, no torch, no transformers) is imported when a tokenizer is built; it comes with
``pip install 'deploy-diff[cpu]'``. One :class:`PromptTokenizer` may be used from several threads at once: it is
configured once, and encoding only reads that configuration.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import import_backend_module
from .bundle import BundleError

__all__ = ["PromptTokenizer", "check_prompts"]

_INSTALL_HINT = "text-to-image bundles need the tokenizers library: pip install 'deploy-diff[cpu]'"


def check_prompts(prompt: Any, what: str = "prompt") -> list[str]:
    """``prompt``: one str or a non-empty list / tuple of str -> the list of prompts. ``TypeError`` otherwise,
    naming ``what`` (the argument) and the type given."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise TypeError(f"{what} must be a str or a non-empty list of str; got an empty {type(prompt).__name__}")
    if isinstance(prompt, (list, tuple)):
        bad = next(p for p in prompt if not isinstance(p, str))
        raise TypeError(f"{what} must be a str or a list of str; the list holds a {type(bad).__name__}: {bad!r:.80}")
    raise TypeError(f"{what} must be a str or a list of str; got {type(prompt).__name__}: {prompt!r:.80}")


class PromptTokenizer:
    """A bundle's tokenizer: prompts -> ``input_ids`` int64[B, model_max_length] (see the module docstring).

    Args:
        path: the ``tokenizer.json`` file (``tokenizers``' serialisation).
        model_max_length: the text encoder's sequence length (77 for CLIP): every prompt is truncated and
            padded to it.
        pad_token: the padding token (``"<|endoftext|>"`` for SD 1.x, ``"!"`` for SD 2.x); must be in the
            vocabulary.
        pad_token_id: its id, when the manifest records one: checked against the vocabulary.

    Raises ``FileNotFoundError`` without the file, :class:`~.bundle.BundleError` for a file ``tokenizers`` cannot
    read or a pad token that does not match it, :class:`~.backends.BackendUnavailableError` without
    ``tokenizers``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        model_max_length: int,
        pad_token: str,
        pad_token_id: int | None = None,
    ):
        tokenizers = import_backend_module("tokenizers", _INSTALL_HINT)
        self.path = Path(path)
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
            raise ValueError(f"model_max_length must be an int >= 2 (start and end tokens); got {model_max_length!r}")
        if not self.path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {self.path}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises Exception subclasses of its own for unreadable files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"tokenizers cannot read {self.path}: {first}") from None
        found = tok.token_to_id(pad_token)
        if found is None:
            raise BundleError(f"{self.path.name} has no pad token {pad_token!r} in its vocabulary")
        if pad_token_id is not None and found != pad_token_id:
            raise BundleError(
                f"{self.path.name} gives the pad token {pad_token!r} id {found}, but the manifest says {pad_token_id}"
            )
        tok.enable_truncation(max_length=model_max_length)
        tok.enable_padding(direction="right", pad_id=found, pad_token=pad_token, length=model_max_length)
        self._tokenizer = tok
        self.model_max_length = model_max_length
        self.pad_token = pad_token
        self.pad_token_id = found

    @classmethod
    def from_bundle(cls, bundle: Any) -> PromptTokenizer:
        """The tokenizer of a text-to-image :class:`~.bundle.Bundle` (its ``tokenizer.json`` and manifest facts)."""
        m = bundle.model
        return cls(bundle.tokenizer_path, m.model_max_length, m.pad_token, m.pad_token_id)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """``input_ids`` int64[len(prompts), model_max_length] (one str: one row)."""
        return self.encode(prompts)[0]

    def encode(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """``(input_ids, truncated)``: the ids, and per prompt the text that truncation dropped (empty when it
        fitted), as diffusers reports it in its warning."""
        texts = check_prompts(prompts)
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        return ids, [_dropped_text(text, e) for text, e in zip(texts, encodings)]

    def __repr__(self) -> str:
        return f"PromptTokenizer({self.path.name}, model_max_length={self.model_max_length}, pad={self.pad_token!r})"


def _dropped_text(text: str, encoding: Any) -> str:
    """The part of ``text`` that truncation dropped: from the first ordinary token of the first overflow on (token
    offsets point into the original text)."""
    for overflow in encoding.overflowing[:1]:
        for (start, _), special in zip(overflow.offsets, overflow.special_tokens_mask):
            if not special:
                return text[start:].strip()
    return ""
