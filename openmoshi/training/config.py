"""The options of a fine-tuning run (`openmoshi finetune`), with moshi-finetune's recipe as defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from openmoshi.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    manifest: str
    run_dir: str
    # The model (as every openmoshi command takes it).
    hf_repo: str | None = "kyutai/moshiko-pytorch-bf16"
    moshi_weight: str | None = None
    mimi_weight: str | None = None
    tokenizer: str | None = None
    config_path: str | None = None
    lora_weight: str | None = None  # an adapter merged into the base model before training
    device: str | None = None  # default: cuda if present
    dtype: str | None = None  # compute dtype; default bfloat16 on cuda, float32 on cpu
    # What trains.
    full: bool = False  # every weight instead of LoRA adapters
    quantize: str | None = None  # "int8"/"int4": adapters over quantized frozen weights (QLoRA)
    lora_rank: int = 128
    lora_scaling: float = 2.0
    # Optimisation (AdamW, betas 0.9 / 0.95; linear warm-up then cosine decay to 0).
    steps: int = 2000
    batch_size: int = 16  # segments per step, over all ranks together
    duration: float = 100.0  # seconds per segment
    lr: float = 2e-6
    weight_decay: float = 0.1
    warmup_steps: int | None = None  # default: warmup * steps
    warmup: float = 0.05
    max_norm: float = 1.0  # gradient clipping on the global norm
    first_codebook_weight: float = 100.0
    text_padding_weight: float = 0.5
    grad_checkpointing: bool = False
    # Evaluation, checkpoints, data.
    eval_data: str | None = None
    eval_every: int = 100
    save_every: int = 100  # 0: only at the end
    resume: bool = False
    seed: int = 0
    codes_cache: str | None = None  # default: .openmoshi-codes beside each manifest
    skip_memory_check: bool = False

    def __post_init__(self):
        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.duration > 0, f"--duration must be > 0 seconds, got {self.duration}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup < 1, f"--warmup must be a fraction in [0, 1), got {self.warmup}"),
            (self.warmup_steps is None or 0 <= self.warmup_steps <= self.steps,
             f"--warmup-steps must be between 0 and --steps, got {self.warmup_steps}"),
            (self.max_norm > 0, f"--max-norm must be > 0, got {self.max_norm}"),
            (self.lora_rank >= 1, f"--lora-rank must be >= 1, got {self.lora_rank}"),
            (self.first_codebook_weight > 0 and self.text_padding_weight >= 0,
             "--first-codebook-weight must be > 0 and --text-padding-weight >= 0"),
            (self.eval_every >= 1 and self.save_every >= 0, "--eval-every must be >= 1 and --save-every >= 0"),
            (not (self.full and self.quantize), "--quantize trains adapters over quantized weights (QLoRA): "
                                                "it cannot go with --full"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def warmup_count(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup * self.steps)

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): linear warm-up, then cosine decay."""
        import math

        w = self.warmup_count
        if step < w:
            return self.lr * (step + 1) / w
        progress = (step - w) / max(1, self.steps - w)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]
