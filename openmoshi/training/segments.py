"""Training examples: segments of `--duration` seconds cut from the cached codes, and the order in
which they are read.

Each conversation is cut into consecutive segments from its start (as moshi-finetune does); the
last one is shorter and padded with the zero token (-1), which the loss ignores. An example is the
LM's codes [1 + Q + Qu, T]: the text stream, the model's Q codebooks, the user's Qu codebooks.

The order is a pure function of (seed, step): the segments are shuffled once per epoch with a
generator seeded by (seed, epoch), and global batch `step` takes the next `batch_size` of that
endless stream. So a resumed run reads exactly what an uninterrupted one would, and every rank
knows the whole batch and takes its own slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openmoshi.lm.config import ZERO_TOKEN
from openmoshi.training.codes_cache import Cached, CodesCache
from openmoshi.training.text_stream import FRAME_RATE, text_stream


@dataclass(frozen=True)
class Conversation:
    cached: Cached  # where its codes are
    words: list[tuple[float, list[int]]]  # (start seconds, token ids) of the model's words
    conditions: dict | None = None  # text_conditions of a conditioned model


@dataclass(frozen=True)
class Segment:
    conversation: int
    start: int  # first frame
    length: int  # frames of audio in it (the rest of the segment is padding)


def plan_segments(frames: list[int], segment_frames: int) -> list[Segment]:
    return [Segment(c, start, min(segment_frames, n - start))
            for c, n in enumerate(frames) for start in range(0, n, segment_frames)]


def batch_indices(step: int, num_segments: int, batch_size: int, seed: int) -> list[int]:
    """The segments of global batch `step` (0-based) in a stream of shuffled epochs."""
    orders: dict[int, list[int]] = {}
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(position, num_segments)
        if epoch not in orders:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(num_segments, generator=g).tolist()
        out.append(orders[epoch][i])
    return out


class SegmentData:
    """The segments of a set of conversations, as LM code tensors."""

    def __init__(self, cache: CodesCache, conversations: list[Conversation], segment_frames: int,
                 model_codebooks: int, user_codebooks: int):
        self.cache, self.conversations, self.T = cache, conversations, segment_frames
        self.model_codebooks, self.user_codebooks = model_codebooks, user_codebooks
        self.segments = plan_segments([c.cached.frames for c in conversations], segment_frames)

    def __len__(self) -> int:
        return len(self.segments)

    def example(self, i: int) -> torch.Tensor:
        """codes [1 + Q + Qu, T] of segment i."""
        seg = self.segments[i]
        conv = self.conversations[seg.conversation]
        codes = self.cache.read(conv.cached)  # [2 K, F]
        K = codes.shape[0] // 2
        audio = torch.cat([codes[:self.model_codebooks], codes[K:K + self.user_codebooks]])
        audio = audio[:, seg.start:seg.start + seg.length]
        audio = torch.nn.functional.pad(audio, (0, self.T - seg.length), value=ZERO_TOKEN)
        text = text_stream(conv.words, seg.start / FRAME_RATE, self.T, seg.length)
        return torch.cat([torch.tensor(text)[None], audio])

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, list[dict] | None]:
        """(codes [B, 1 + Q + Qu, T], the conversations' text_conditions or None)."""
        codes = torch.stack([self.example(i) for i in indices])
        conditions = [self.conversations[self.segments[i].conversation].conditions for i in indices]
        return codes, (None if all(c is None for c in conditions) else conditions)
