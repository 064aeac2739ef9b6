"""The fine-tuning loss: cross-entropy on the text stream and on the model's audio codebooks,
each a weighted mean over the positions that have a target, summed.

Weights (as moshi-finetune's recipe): the first (semantic) codebook counts
`first_codebook_weight` times an acoustic one; text positions whose target is padding or end of
padding count `text_padding_weight`; masked positions (lost to the delays, zero tokens) count
nothing. Sums and weights are kept apart (`LossSums`) so that ranks can add theirs before dividing:
the loss of a batch split over ranks is the loss of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openmoshi.lm.config import TEXT_END_PADDING_ID, TEXT_PADDING_ID
from openmoshi.lm.model import LMOutput


@dataclass
class LossSums:
    text: torch.Tensor  # sum of weighted cross-entropies (float32, 0-dim)
    text_weight: torch.Tensor  # sum of their weights
    audio: torch.Tensor
    audio_weight: torch.Tensor

    def means(self, text_weight: torch.Tensor | None = None, audio_weight: torch.Tensor | None = None):
        """(text, audio) weighted means, dividing by the given weights (e.g. summed over ranks)."""
        tw = self.text_weight if text_weight is None else text_weight
        aw = self.audio_weight if audio_weight is None else audio_weight
        return self.text / tw.clamp(min=1e-8), self.audio / aw.clamp(min=1e-8)


def _weighted_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    keep = weight > 0  # logits are NaN where there is no prediction: select before computing
    ce = F.cross_entropy(logits[keep].float(), target[keep], reduction="none")
    return (ce * weight[keep]).sum()


def loss_sums(out: LMOutput, codes: torch.Tensor, first_codebook_weight: float = 100.0,
              text_padding_weight: float = 0.5) -> LossSums:
    """out: the LM's training forward on `codes` [B, K, T] (text stream first)."""
    Q = out.logits.shape[1]
    audio_target = codes[:, 1:1 + Q]  # [B, Q, T]
    audio_w = out.mask.float()
    audio_w[:, 0] *= first_codebook_weight
    text_target = codes[:, :1]  # [B, 1, T]
    text_w = out.text_mask.float()
    padding = (text_target == TEXT_PADDING_ID) | (text_target == TEXT_END_PADDING_ID)
    text_w = torch.where(padding, text_w * text_padding_weight, text_w)
    return LossSums(text=_weighted_ce(out.text_logits, text_target, text_w), text_weight=text_w.sum(),
                    audio=_weighted_ce(out.logits, audio_target, audio_w), audio_weight=audio_w.sum())
