"""The fine-tuning run: data, model, the training loop, evaluation and checkpoints.

    train(TrainConfig(manifest="data.jsonl", run_dir="run", hf_repo="kyutai/moshiko-pytorch-bf16"))

One step: every rank takes its slice of global batch `step` (`segments.batch_indices`), runs the
LM's training forward, and adds its loss sums and weights to the other ranks' before dividing,
so that the step is the same whatever the number of ranks; gradients are clipped on their global
norm; the learning rate is a function of the step. Single process: the plain model; under
torchrun: FSDP2 (see `distributed`).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from openmoshi.accel.quantize import QuantizedLinear, quantize_lm, set_compute_dtype
from openmoshi.errors import UserError
from openmoshi.lm.model import LMModel
from openmoshi.loading import budget
from openmoshi.loading.files import read_header
from openmoshi.loading.lm import checkpoint_format, load_lm
from openmoshi.loading.mimi import load_mimi
from openmoshi.loading.resolve import ModelFiles, resolve_dtype, resolve_files
from openmoshi.loading.tokenizer import load_text_tokenizer
from openmoshi.training import checkpoints
from openmoshi.training.codes_cache import CodesCache, fingerprint
from openmoshi.training.config import TrainConfig
from openmoshi.training.distributed import Dist, broadcast_weights, checkpoint_layers, setup, shard, teardown
from openmoshi.training.lora import add_lora
from openmoshi.training.loss import loss_sums
from openmoshi.training.manifest import DataError, read_alignments, read_manifest
from openmoshi.training.metrics import MetricsLog, peak_memory_gb
from openmoshi.training.segments import Conversation, SegmentData, batch_indices
from openmoshi.training.text_stream import FRAME_RATE

RUN_FILE = "run.json"
# Options a resumed run may change; every other one must be what the run started with.
RESUMABLE_CHANGES = ("run_dir", "steps", "eval_data", "eval_every", "save_every", "resume", "device", "codes_cache")
log = logging.getLogger("openmoshi.training.loop")  # what the run does: `openmoshi finetune` shows it


class RunError(UserError):
    """A run directory that cannot be used as asked."""


def train(cfg: TrainConfig) -> Path:
    """Runs (or, with cfg.resume, continues) a fine-tuning run; returns its last checkpoint."""
    d = setup(cfg.device)
    try:
        return _train(cfg, d)
    finally:
        teardown(d)


def _train(cfg: TrainConfig, d: Dist) -> Path:
    if cfg.batch_size % d.world:
        raise RunError(f"--batch-size {cfg.batch_size} is the batch of all {d.world} processes together: "
                       f"make it a multiple of {d.world}")
    run_dir = Path(cfg.run_dir)
    files = _resolve(cfg, d)
    record = _prepare_run_dir(run_dir, cfg, files, d)
    dtype = resolve_dtype(cfg.dtype, d.device)
    lm_cfg = files.config.lm
    if lm_cfg.dep_q == 0:
        raise RunError("this model has no depth transformer (a speech-to-text model): fine-tuning trains "
                       "models that speak (dep_q > 0)")

    tokenizer = load_text_tokenizer(files.tokenizer)
    data = _Data(cfg, files, d, tokenizer)
    train_set = data.load(cfg.manifest)
    eval_set = data.load(cfg.eval_data) if cfg.eval_data else None
    data.release()
    if d.main:
        log.info(f"{len(train_set)} training segments of {cfg.duration:g} s from {len(train_set.conversations)} "
                 "conversations" + (f", {len(eval_set)} for evaluation" if eval_set else ""))

    lm = _build_model(cfg, files, d, dtype)
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay)
    step = 0
    if cfg.resume:
        found = checkpoints.checkpoints(run_dir)
        if not found:
            raise RunError(f"--resume: {run_dir} has no checkpoint to continue from")
        step = checkpoints.restore(found[-1][1], lm, optimizer, d)
        if d.main:
            log.info(f"resuming {run_dir} at step {step}")
    model_config = _raw_config(files)
    lora = None if cfg.full else (cfg.lora_rank, cfg.lora_scaling)
    _write_run_record(run_dir, record, d)
    metrics = MetricsLog(run_dir, cfg.steps, step, d.main)
    autocast = torch.autocast(d.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    per_rank = cfg.batch_size // d.world
    last = None
    try:
        lm.train()
        while step < cfg.steps:
            start = time.perf_counter()
            indices = batch_indices(step, len(train_set), cfg.batch_size, cfg.seed)
            codes, conditions = train_set.batch(indices[d.rank * per_rank:(d.rank + 1) * per_rank])
            codes = codes.to(d.device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            with autocast:
                out = lm(codes, condition_sum=_condition(lm, conditions))
            sums = loss_sums(out, codes, cfg.first_codebook_weight, cfg.text_padding_weight)
            text, audio = sums.means(d.sum(sums.text_weight), d.sum(sums.audio_weight))
            ((text + audio) * d.world).backward()  # FSDP averages gradients over ranks
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            text, audio = d.sum(text), d.sum(audio)
            elapsed = time.perf_counter() - start
            metrics.log({"step": step, "loss": (text + audio).item(), "text_loss": text.item(),
                         "audio_loss": audio.item(), "lr": cfg.lr_at(step - 1), "grad_norm": grad_norm.item(),
                         "tokens_per_s": cfg.batch_size * codes.shape[1] * codes.shape[2] / elapsed,
                         "peak_mem_gb": peak_memory_gb(d.device)})
            if eval_set is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                metrics.log({"step": step, "eval": True, **_evaluate(lm, eval_set, cfg, d, autocast, per_rank)})
                lm.train()
            if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                last = checkpoints.save(run_dir, step, lm, optimizer, d, model_config, cfg.full, lora, dtype)
                metrics.note(f"saved {last}")
    finally:
        metrics.close()
    if last is None:  # resumed at the last step already
        last = checkpoints.checkpoint_dir(run_dir, step)
    if d.main:
        log.info(f"done: {last / 'consolidated'}")
    return last


# ----------------------------------------------------------------------------- set-up


def _resolve(cfg: TrainConfig, d: Dist) -> ModelFiles:
    """The model's files; rank 0 downloads what is missing before the others look in the cache."""
    def resolve():
        return resolve_files(cfg.hf_repo, cfg.moshi_weight, cfg.mimi_weight, cfg.tokenizer, cfg.config_path,
                             cfg.lora_weight, before_download=lambda config: _check_memory(cfg, config, d))

    files = error = None
    if d.main:
        try:
            files = resolve()
        except Exception as e:  # every rank must learn of it (see Dist.agree)
            error = e
    d.agree(error)
    return files if d.main else resolve()


def _check_memory(cfg: TrainConfig, config, d: Dist) -> None:
    """The frozen weights, what trains with its gradient and AdamW's two moments (float32), and
    Mimi (which encodes the data first) must fit; the activations are left to the margin."""
    dtype = resolve_dtype(cfg.dtype, d.device)
    model = budget.meta_lm(config.lm, torch.float32 if cfg.full else dtype, cfg.quantize, cfg.moshi_weight)
    if not cfg.full:
        add_lora(model, cfg.lora_rank, cfg.lora_scaling)
    frozen = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.requires_grad)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) * 16
    need = budget.Need({"frozen weights": frozen, "trained weights, gradients and AdamW": trained,
                        "Mimi": budget.mimi_bytes(streaming=False) + budget.MIMI_STEP_BYTES * 10})  # 10 s chunks
    ways = (["LoRA instead of --full"] if cfg.full else [f"a smaller --lora-rank than {cfg.lora_rank}"]) + \
        ([] if cfg.quantize or cfg.full else ["--quantize int8 or int4 (QLoRA)"]) + \
        (["--dtype bfloat16"] if dtype == torch.float32 else []) + ["more processes (--nproc) to shard the weights"]
    budget.check(need, d.device, "openmoshi finetune", ways, cfg.skip_memory_check)


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig, files: ModelFiles, d: Dist) -> dict:
    """Checks that the run folder can hold this run; returns the record to write in run.json."""
    record = {"config": cfg.to_dict(),
              "files": {k: None if v is None else str(v) for k, v in
                        (("moshi_weight", files.moshi_weight), ("mimi_weight", files.mimi_weight),
                         ("tokenizer", files.tokenizer), ("config_path", files.config_path),
                         ("lora_weight", files.lora_weight))}}
    error = None
    if d.main:
        try:
            _check_run_dir(run_dir, cfg, record)
        except Exception as e:  # every rank must learn of it (see Dist.agree)
            error = e
    d.agree(error)
    return record


def _check_run_dir(run_dir: Path, cfg: TrainConfig, record: dict) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"-o {run_dir} is a file, not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to {run_dir} ({e.strerror}): choose a writable folder with -o") from None
    existing = checkpoints.checkpoints(run_dir)
    run_file = run_dir / RUN_FILE
    if not cfg.resume:
        if existing:  # a run that saved nothing yet may start again from scratch
            raise RunError(f"{run_dir} already holds a run ({existing[-1][1].name}): pass --resume to "
                           "continue it, or choose another folder with -o")
    elif run_file.exists():
        before = json.loads(run_file.read_text())["config"]
        changed = [k for k in before if k not in RESUMABLE_CHANGES and before[k] != record["config"].get(k)]
        if changed:
            shown = ", ".join(f"{k}: {before[k]!r} -> {record['config'].get(k)!r}" for k in changed[:4])
            raise RunError(f"--resume with other options than the run started with ({shown}): a resumed run "
                           "continues the same training; start a new run with another -o to change them")


def _write_run_record(run_dir: Path, record: dict, d: Dist) -> None:
    """run.json: the options and the model's files, once data and model are ready (what `--resume`
    checks against and `export` loads the base model from)."""
    if d.main:
        (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2))


def _raw_config(files: ModelFiles) -> dict:
    """The model's config.json as published (the LM config of the legacy 7B when there is none)."""
    if files.config_path is not None:
        return json.loads(Path(files.config_path).read_text())
    return {k: v for k, v in files.config.lm.to_dict().items() if v is not None}


class _Data:
    """Manifests -> segments, encoding with Mimi (once, shared by both sets) what the cache lacks."""

    def __init__(self, cfg: TrainConfig, files: ModelFiles, d: Dist, tokenizer):
        self.cfg, self.files, self.d, self.tokenizer = cfg, files, d, tokenizer
        self.mimi = None
        self.fingerprint = fingerprint(files.mimi_weight)
        lm = files.config.lm
        self.model_codebooks, self.user_codebooks = lm.dep_q, lm.n_q - lm.dep_q
        self.num_codebooks = files.config.mimi_codebooks

    def load(self, manifest: str) -> SegmentData:
        entries = read_manifest(manifest)
        folder = Path(self.cfg.codes_cache) if self.cfg.codes_cache else Path(manifest).parent / ".openmoshi-codes"
        cache = CodesCache(folder, self.fingerprint, self.num_codebooks)
        stale = cache.stale(entries)
        if stale:
            error = None
            try:
                mine = stale[self.d.rank::self.d.world]
                if self.mimi is None:
                    self.mimi = load_mimi(self.files.mimi_weight, self.num_codebooks, self.d.device)
                if self.d.main:
                    log.info(f"encoding {len(stale)} conversation(s) with Mimi into {folder} (once; later runs read the cache)")
                cache.encode(mine, self.mimi, part=self.d.rank, log=log.info if self.d.main else None)
            except PermissionError:
                error = DataError(f"cannot write the codes cache in {folder}: pass a writable folder with --codes-cache")
            except Exception as e:  # every rank must learn of it (see Dist.agree)
                error = e
            self.d.agree(error)
            if self.d.main:
                cache.merge(self.d.world)
            self.d.barrier()
        index = cache.index()
        conversations = []
        for e in entries:
            cached = cache.get(index, e.path)
            alignment = read_alignments(e.path, cached.seconds)
            words = [(w.start, self.tokenizer.encode(w.text)) for w in alignment.words]
            if self.files.config.lm.conditioners and alignment.text_conditions is None:
                raise DataError(f"{e.path.with_suffix('.json')} has no 'text_conditions', which this "
                                "conditioned model needs")
            conversations.append(Conversation(cached, words, alignment.text_conditions))
        segment_frames = max(1, round(self.cfg.duration * FRAME_RATE))
        return SegmentData(cache, conversations, segment_frames, self.model_codebooks, self.user_codebooks)

    def release(self) -> None:
        self.mimi = None


def _build_model(cfg: TrainConfig, files: ModelFiles, d: Dist, dtype: torch.dtype) -> LMModel:
    """The LM with what trains in float32: every weight (--full) or LoRA adapters on a frozen model.
    Under torchrun, rank 0 reads the weights and the others start on the meta device."""
    lm_cfg = files.config.lm
    if d.main or not d.sharded:
        lm = load_lm(files.moshi_weight, lm_cfg, "cpu" if d.sharded else d.device, dtype,
                     lora=files.lora_weight, lora_scaling=files.config.lora_scaling, quantize=cfg.quantize)
    else:  # the same modules as load_lm builds, without their values
        header = read_header(files.moshi_weight)
        fmt = checkpoint_format(header)
        with torch.device("meta"):
            lm = LMModel(lm_cfg).to(dtype)
            fmt.prepare(header, lm)
            if cfg.quantize and not any(isinstance(m, QuantizedLinear) for m in lm.modules()):
                quantize_lm(lm, cfg.quantize)
        set_compute_dtype(lm, dtype)
        if lm.condition_provider is not None:
            lm.condition_provider.float()  # as load_lm keeps it
    torch.manual_seed(cfg.seed)  # the adapters' initial values
    if cfg.full:
        lm.float().requires_grad_(True)
    else:
        add_lora(lm, cfg.lora_rank, cfg.lora_scaling)
    if cfg.grad_checkpointing:
        checkpoint_layers(lm)
    if d.sharded:
        full_state = lm.state_dict() if d.main else None
        shard(lm, d, dtype)
        broadcast_weights(lm, d, full_state)
    return lm


def make_optimizer(params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (betas 0.9 / 0.95, as moshi-finetune), as one fused kernel per step: on a CPU it is
    8x faster than the per-tensor loop, which a full fine-tune's 32k-entry embeddings make a
    third of the step."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, fused=True)


def _condition(lm, conditions):
    if conditions is None or lm.condition_provider is None:
        return None
    return lm.condition_provider(conditions)


@torch.no_grad()
def _evaluate(lm, data: SegmentData, cfg: TrainConfig, d: Dist, autocast, per_rank: int) -> dict:
    """Losses over the whole evaluation set. Every rank runs the same number of forwards (the
    sharded model needs all of them); a rank without segments left runs one and counts nothing."""
    lm.eval()
    totals = torch.zeros(4, device=d.device)
    n = len(data)
    for first in range(0, n, cfg.batch_size):
        mine = list(range(first, min(n, first + cfg.batch_size)))[d.rank * per_rank:(d.rank + 1) * per_rank]
        codes, conditions = data.batch(mine or [0])
        codes = codes.to(d.device)
        with autocast:
            out = lm(codes, condition_sum=_condition(lm, conditions))
        s = loss_sums(out, codes, cfg.first_codebook_weight, cfg.text_padding_weight)
        totals += torch.stack([s.text, s.text_weight, s.audio, s.audio_weight]).float() * (1.0 if mine else 0.0)
    text_sum, text_w, audio_sum, audio_w = d.sum(totals).tolist()
    text, audio = text_sum / max(text_w, 1e-8), audio_sum / max(audio_w, 1e-8)
    return {"loss": text + audio, "text_loss": text, "audio_loss": audio}
