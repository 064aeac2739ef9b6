"""Residual vector quantization of Mimi's latents (SoundStream, Zeghidour et al. 2021, Algorithm 1;
split into semantic + acoustic quantizers as in the Moshi paper, section 3.3).

Glossary: B batch, T frames, K codebooks in use, D latent dim (512), d codebook dim (256),
V entries per codebook (2048).

    latent [B, D, T] --input_proj (1x1 conv)--> [B, d, T] --codebook 1..K on the residual--> codes
    codes [B, K, T] --sum of codebook vectors--> [B, d, T] --output_proj (1x1 conv)--> [B, D, T]

The split quantizer runs two such RVQs on the same latent, each with its own projections:
`rvq_first` (the semantic codebook) and `rvq_rest` (the acoustic ones); their decodings add up.

A codebook stores EMA statistics, as trained: `embedding_sum` [V, d] and `cluster_usage` [V];
the centroids are embedding_sum / max(cluster_usage, 1e-5) (the official epsilon). Module paths
(`vq.layers.<i>._codebook.embedding_sum`, ...) match the released state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openmoshi.mimi.config import QuantizerConfig

EPSILON = 1e-5  # lower bound of cluster_usage when turning the EMA sums into centroids


class EuclideanCodebook(nn.Module):
    def __init__(self, dim: int, bins: int):
        super().__init__()
        self.register_buffer("_initialized", torch.zeros(1))  # kept for checkpoint compatibility
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))
        self._cache: tuple | None = None

    def _centroids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroids [V, d] and their augmented form [V, d + 2] for distances, cached.

        Recomputed whenever a buffer is replaced or modified in place (a load, `.to()`, a test
        filling random values): `_version` counts in-place writes, so no staleness and no sync."""
        key = (id(self.embedding_sum), self.embedding_sum._version,
               id(self.cluster_usage), self.cluster_usage._version)
        if self._cache is None or self._cache[0] != key:
            emb = self.embedding_sum / self.cluster_usage.clamp(min=EPSILON)[:, None]
            norm = emb.pow(2).sum(-1, keepdim=True)
            augmented = torch.cat([emb, torch.ones_like(norm), norm], dim=-1)
            self._cache = (key, emb, augmented)
        return self._cache[1], self._cache[2]

    @property
    def embedding(self) -> torch.Tensor:
        return self._centroids()[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d] -> index of the nearest centroid [N] (int64).

        Distances are computed as `torch.cdist` does (one matmul of augmented vectors
        [-2x, |x|^2, 1] . [e, 1, |e|^2], clamp, sqrt), bit for bit, so near-ties resolve like the
        official code; the centroid side is cached instead of being rebuilt at every call."""
        _, augmented = self._centroids()
        norm = x.pow(2).sum(-1, keepdim=True)
        x_aug = torch.cat([x.mul(-2), norm, torch.ones_like(norm)], dim=-1)  # [N, d + 2]
        dists = x_aug[None].matmul(augmented[None].mT)[0]  # [N, V] squared distances
        return dists.clamp_min_(1e-30).sqrt_().argmin(dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [...] -> centroids [..., d]."""
        return F.embedding(codes, self.embedding)


class VectorQuantizer(nn.Module):
    """One level of the RVQ; only wraps the codebook so parameter paths match the checkpoint."""

    def __init__(self, dim: int, bins: int):
        super().__init__()
        self._codebook = EuclideanCodebook(dim, bins)


class _Levels(nn.Module):
    """Holds the levels under `vq.layers` (the checkpoint's path)."""

    def __init__(self, n_q: int, dim: int, bins: int):
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantizer(dim, bins) for _ in range(n_q)])


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, n_q: int, dim: int, bins: int, input_dim: int, output_dim: int):
        super().__init__()
        self.n_q = n_q
        self.input_proj = nn.Conv1d(input_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, output_dim, 1, bias=False)
        self.vq = _Levels(n_q, dim, bins)

    def codebooks(self, n: int) -> list[EuclideanCodebook]:
        return [level._codebook for level in self.vq.layers[:n]]

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x [B, D, T] -> codes [B, n, T] from the first n levels."""
        B, _, T = x.shape
        residual = self.input_proj(x).transpose(1, 2).reshape(B * T, -1)  # [B*T, d]
        codes = []
        for codebook in self.codebooks(n):
            c = codebook.encode(residual)  # [B*T]
            residual = residual - codebook.decode(c)
            codes.append(c)
        return torch.stack(codes, dim=1).view(B, T, n).transpose(1, 2).contiguous()  # [B, n, T]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n, T] -> [B, D_out, T]."""
        quantized = None
        for i, codebook in enumerate(self.codebooks(codes.shape[1])):
            q = codebook.decode(codes[:, i])  # [B, T, d]
            quantized = q if quantized is None else quantized + q
        return self.output_proj(quantized.transpose(1, 2))  # [B, D_out, T]


def check_codes(codes: torch.Tensor, max_codebooks: int, bins: int, values: bool = True) -> None:
    """Raise ValueError unless codes is an integer [B, K, T] tensor with 1 <= K <= max_codebooks
    and (when `values`) every entry in [0, bins). The value check reads the tensor on the host."""
    if codes.dim() != 3:
        raise ValueError(f"codes must be [B, K, T], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    K = codes.shape[1]
    if not 1 <= K <= max_codebooks:
        raise ValueError(f"got {K} codebooks, this quantizer has 1 to {max_codebooks}")
    if values and codes.numel():
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= bins:
            raise ValueError(f"codes must be in [0, {bins}), got values in [{low}, {high}]")


class SplitResidualVectorQuantizer(nn.Module):
    """Semantic RVQ (`rvq_first`) + acoustic RVQ (`rvq_rest`), `num_codebooks` levels in use."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        args = (cfg.dimension, cfg.bins, cfg.input_dimension, cfg.output_dimension)
        self.rvq_first = ResidualVectorQuantizer(cfg.n_q_semantic, *args)
        self.rvq_rest = ResidualVectorQuantizer(cfg.n_q - cfg.n_q_semantic, *args)
        self.num_codebooks = cfg.n_q

    def set_num_codebooks(self, k: int) -> None:
        if not isinstance(k, int) or not self.cfg.n_q_semantic <= k <= self.cfg.n_q:
            raise ValueError(f"num_codebooks must be an int in [{self.cfg.n_q_semantic}, "
                             f"{self.cfg.n_q}], got {k!r}")
        self.num_codebooks = k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D, T] -> codes [B, K, T] int64, K = num_codebooks."""
        S = self.cfg.n_q_semantic
        codes = self.rvq_first.encode(x, S)  # [B, S, T]
        if self.num_codebooks > S:
            rest = self.rvq_rest.encode(x, self.num_codebooks - S)  # [B, K - S, T]
            codes = torch.cat([codes, rest], dim=1)
        return codes

    def decode(self, codes: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        """codes [B, K, T] (any 1 <= K <= n_q) -> [B, D, T]."""
        check_codes(codes, self.cfg.n_q, self.cfg.bins, values=check_values)
        S = self.cfg.n_q_semantic
        codes = codes.long()
        out = self.rvq_first.decode(codes[:, :S])
        if codes.shape[1] > S:
            out = out + self.rvq_rest.decode(codes[:, S:])
        return out
