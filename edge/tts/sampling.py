"""Audio-code sampling of `ConditionalChatTTS.generate`, in numpy.

Per step and codebook, in the official order: logits / temperature[q]; then (not on the audio-bos step) the
ChatTTS repetition penalty over the last 16 generated codes and the transformers TopP -> TopK warpers
(min_tokens_to_keep 3); then EOS is forbidden for the first `min_new_tokens` steps *of each generate call*; softmax;
one multinomial draw. Generation ends when any codebook draws EOS. Greedy mode takes the argmax after the same
penalty/EOS rules (temperature and the warpers never change the argmax).

The random stream is numpy's, so sampled codes differ from torch's for the same seed; greedy codes match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.errors import InvalidInputError

# Official `_generate_mel_spec*` temperatures per codebook, `generate(min_new_token=10)`, `gen_logits` settings.
DEFAULT_TEMPERATURE = (0.1, 0.3, 0.1, 0.3)
DEFAULT_MIN_NEW_TOKENS = 10
MIN_TOKENS_TO_KEEP = 3
REPETITION_WINDOW = 16


@dataclass(frozen=True)
class SamplingOptions:
    """Attributes:
    temperature: one per codebook (official [0.1, 0.3, 0.1, 0.3]).
    top_p / top_k: warpers (None = off); None here means "use the checkpoint's tts config" (0.7 / 20).
    repetition_penalty: ChatTTS penalty (1.0 = off, the checkpoint default); None = checkpoint config.
    repetition_window: how many past codes the penalty counts.
    min_tokens_to_keep: floor of both warpers.
    min_new_tokens: EOS is masked for this many steps at the start of every generate call.
    greedy: argmax instead of sampling (deterministic; what the golden fixture uses).
    seed: seed of the numpy random generator (None = fresh entropy).
    """

    temperature: tuple[float, ...] = DEFAULT_TEMPERATURE
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    repetition_window: int = REPETITION_WINDOW
    min_tokens_to_keep: int = MIN_TOKENS_TO_KEEP
    min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS
    greedy: bool = False
    seed: int | None = None


def top_p_filter(scores: np.ndarray, top_p: float, min_keep: int) -> np.ndarray:
    """transformers `TopPLogitsWarper`: drop the low tail whose cumulative probability is <= 1 - top_p."""
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as torch.sort(descending=False)
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    probs = np.exp(sorted_scores - sorted_scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    remove_sorted = np.cumsum(probs, axis=-1) <= (1 - top_p)
    remove_sorted[..., -min_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)


def top_k_filter(scores: np.ndarray, top_k: int, min_keep: int) -> np.ndarray:
    """transformers `TopKLogitsWarper`: keep scores >= the k-th largest (k = max(top_k, min_keep))."""
    k = min(max(top_k, min_keep), scores.shape[-1])
    kth = np.sort(scores, axis=-1)[..., -k][..., None]
    return np.where(scores < kth, -np.inf, scores)


def repetition_penalty(scores: np.ndarray, history: np.ndarray, penalty: float, window: int) -> np.ndarray:
    """ChatTTS `CustomRepetitionPenaltyLogitsProcessorRepeat`: scale each code's score by penalty**count over the
    last `window` codes of its codebook (multiply negatives, divide positives). history: (n, num_vq)."""
    if history.shape[0] == 0:
        return scores
    recent = history[-window:]
    freq = np.zeros_like(scores)
    for q in range(scores.shape[0]):
        np.add.at(freq[q], recent[:, q], 1.0)
    alpha = np.power(np.float32(penalty), freq).astype(scores.dtype)
    return np.where(scores < 0, scores * alpha, scores / alpha)


class CodeSampler:
    """Chooses the next frame of num_vq codes from (num_vq, num_codes) logits."""

    def __init__(self, options: SamplingOptions, *, num_vq: int, eos_id: int, config_top_p: float | None = 0.7,
                 config_top_k: int | None = 20, config_repetition_penalty: float = 1.0):
        if len(options.temperature) != num_vq or min(options.temperature) <= 0:
            raise InvalidInputError(f"temperature must be {num_vq} positive values (one per codebook); got "
                                    f"{options.temperature}.")
        self.options = options
        self.num_vq = num_vq
        self.eos_id = eos_id
        self.top_p = options.top_p if options.top_p is not None else config_top_p
        self.top_k = options.top_k if options.top_k is not None else config_top_k
        rp = options.repetition_penalty
        self.penalty = float(rp if rp is not None else config_repetition_penalty)
        if self.penalty <= 0:
            raise InvalidInputError(f"repetition_penalty must be > 0; got {self.penalty}.")
        self.rng = np.random.default_rng(options.seed)

    def __call__(self, logits: np.ndarray, history: np.ndarray, step_in_call: int, audio_bos: bool) -> np.ndarray:
        """logits (num_vq, num_codes); history (n, num_vq) codes generated so far; returns (num_vq,) int64."""
        o = self.options
        scores = np.asarray(logits, dtype=np.float32).copy()
        if not o.greedy:
            scores /= np.asarray(o.temperature, dtype=np.float32)[:, None]
        if not audio_bos:
            if self.penalty != 1.0:
                scores = repetition_penalty(scores, np.asarray(history, dtype=np.int64).reshape(-1, self.num_vq),
                                            self.penalty, o.repetition_window)
            if not o.greedy:
                if self.top_p is not None:
                    scores = top_p_filter(scores, self.top_p, o.min_tokens_to_keep)
                if self.top_k is not None:
                    scores = top_k_filter(scores, self.top_k, o.min_tokens_to_keep)
        if step_in_call < o.min_new_tokens:
            scores[:, self.eos_id] = -np.inf
        if o.greedy:
            return scores.argmax(axis=-1).astype(np.int64)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        u = self.rng.random((self.num_vq, 1))
        return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)
