"""Prompts -> token states and mask, the way Sana pipelines encode them, with a cache and the null prompt for CFG.

Sana pads every prompt to `max_length` tokens (right padding, special tokens on) and takes the encoder's last
hidden states; the empty prompt "" is the unconditional (null) caption for classifier-free guidance.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class PromptTooLong(ValueError):
    """A prompt has more encoder tokens than the model's max_sequence_length."""


class TextEncoder:
    def __init__(self, tokenizer, encoder: torch.nn.Module, max_length: int, cache_size: int = 8192,
                 microbatch: int = 1):
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length
        self.cache_size = cache_size
        self.microbatch = microbatch
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def width(self) -> int:
        return self.encoder.config.hidden_size

    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes, special tokens included (what must fit into max_length)."""
        return len(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def check(self, prompt: str) -> None:
        n = self.count_tokens(prompt)
        if n > self.max_length:
            raise PromptTooLong(f"prompt is {n} encoder tokens; at most {self.max_length} are allowed")

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode in chunks of exactly `microbatch` prompts (padded with ""), so a prompt's states never depend
        on which other prompts were encoded with it (CPU kernels vary their reduction order with batch size)."""
        n, rows = len(prompts), self.microbatch
        padded = prompts + [""] * (-n % rows)
        tokens = self.tokenizer(padded, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        states = torch.cat([self.encoder(ids[i:i + rows], attention_mask=mask[i:i + rows])[0]
                            for i in range(0, len(padded), rows)])
        return states[:n].float(), mask[:n]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, L, D) float32, mask (B, L) int64); each distinct prompt is encoded once and cached."""
        with self._lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            states, mask = self._encode_uncached(missing)
            with self._lock:
                for i, prompt in enumerate(missing):
                    self._cache[prompt] = (states[i], mask[i])
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        with self._lock:
            rows = []
            for p in prompts:
                row = self._cache.get(p)
                if row is None:  # evicted between the two locks by a concurrent caller
                    row = tuple(x[0] for x in self._encode_uncached([p]))
                else:
                    self._cache.move_to_end(p)
                rows.append(row)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def null(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's states and mask, repeated `batch` times (cached after the first call)."""
        states, mask = self.encode([""])
        return states.expand(batch, -1, -1), mask.expand(batch, -1)
