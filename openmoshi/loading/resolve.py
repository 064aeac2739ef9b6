"""Model resolution shared by every command: which files make a model and where they come from.

    files = resolve_files(hf_repo="kyutai/moshiko-pytorch-bf16")     # ModelFiles, local paths
    model = loading.model.load_model(files, device="cpu")             # LoadedModel

Each file argument is a local path, `file://path` (always local) or `hf://owner/repo/file` (that
file of another Hugging Face repo), as the official tools accept. Files not given explicitly come
from `--hf-repo`: a Hugging Face repo id (downloaded through `huggingface_hub`, with its cache and
progress bar) or a local folder laid out like one. The repo's `config.json` names the files
(`moshi_name`, `mimi_name`, `tokenizer_name`, ...); a repo without it is a legacy Moshi 7B
(`MOSHI_7B` and the default file names), or NVIDIA's PersonaPlex 7B (`PERSONAPLEX_7B`) when the
repo or folder name says "personaplex", as `nvidia/personaplex-7b-v1` (published without one). When the Hub cannot be reached (HF_HUB_OFFLINE=1, no
network) and a file is not in the cache, `ResolveError` names the files needed and the flags that
take local copies.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from openmoshi.errors import UserError

if TYPE_CHECKING:
    from openmoshi.lm.config import ModelConfig


DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"
CONFIG_NAME = "config.json"
DTYPES = ("float32", "bfloat16", "float16")
log = logging.getLogger("openmoshi.loading.resolve")  # the command line shows its warnings as one line each

# Command-line flag of each file, for error messages.
_FLAGS = {"config": "--config-path", "moshi": "--moshi-weight", "mimi": "--mimi-weight",
          "tokenizer": "--tokenizer", "lora": "--lora-weight", "mimi_config": "--hf-repo DIR"}


class ResolveError(UserError):
    """A model file that cannot be found or fetched; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelFiles:
    """Local paths of every file of a model, and its configuration."""

    config: ModelConfig
    moshi_weight: Path
    mimi_weight: Path | None  # None (with tokenizer) when resolved with lm_only=True
    tokenizer: Path | None
    lora_weight: Path | None = None
    mimi_config: Path | None = None  # official Mimi config JSON, None for the released Mimi
    config_path: Path | None = None  # None: legacy repo, MOSHI_7B
    hf_repo: str | None = None

    @property
    def model_type(self) -> str:
        return self.config.model_type


# ----------------------------------------------------------------------------- resolution


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


class _Fetcher:
    """Fetches files by name from one repo; remembers what could not be fetched."""

    def __init__(self, hf_repo: str | None):
        self.hf_repo = hf_repo
        self.local_dir = Path(hf_repo) if hf_repo and Path(hf_repo).is_dir() else None

    def uri(self, spec: str | os.PathLike, kind: str) -> Path:
        """An explicit file argument: local path, file://, hf://owner/repo/file."""
        spec = str(spec)
        if spec.startswith("hf://"):
            parts = spec[len("hf://"):].split("/")
            if len(parts) < 3 or not all(parts):
                raise ResolveError(f"{_FLAGS[kind]} {spec}: expected hf://OWNER/REPO/FILE")
            return self.download("/".join(parts[:2]), "/".join(parts[2:]), kind)
        path = Path(spec[len("file://"):] if spec.startswith("file://") else spec).expanduser()
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a file"
            raise ResolveError(f"{_FLAGS[kind]} {spec}: {path} {what}")
        return path

    def named(self, name: str, kind: str) -> Path:
        """A file of the --hf-repo repo (or local folder), by name."""
        if self.local_dir is not None:
            path = self.local_dir / name
            if not path.is_file():
                raise ResolveError(f"{name} not found in {self.local_dir}; pass it with {_FLAGS[kind]} PATH")
            return path
        if self.hf_repo is None:
            raise ResolveError(f"no {name}: pass {_FLAGS[kind]} PATH or --hf-repo")
        return self.download(self.hf_repo, name, kind)

    def download(self, repo: str, name: str, kind: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
        try:
            return Path(hf_hub_download(repo, name))
        except LocalEntryNotFoundError:
            raise _Unreachable(repo, name, kind) from None
        except EntryNotFoundError:
            raise ResolveError(f"Hugging Face repo {repo} has no file {name}") from None
        except RepositoryNotFoundError:
            raise ResolveError(f"Hugging Face repo {repo} not found (or it is private and no token "
                               "was given: run 'hf auth login')") from None
        except RevisionNotFoundError as e:
            raise ResolveError(f"Hugging Face repo {repo}: {e}") from None
        except (OSError, ValueError) as e:  # network errors, bad repo ids
            if "Repo id" in str(e) or "repo_id" in str(e):
                raise ResolveError(f"bad Hugging Face repo id {repo!r}: use OWNER/NAME or a local folder") from None
            raise _Unreachable(repo, name, kind) from None


class _Unreachable(ResolveError):
    """The Hub could not be reached and the file is not in the local cache."""

    def __init__(self, repo: str, name: str, kind: str):
        self.repo, self.name, self.kind = repo, name, kind
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the Hugging Face Hub could not be reached"
        super().__init__(f"cannot get {name} from {repo}: {why} and it is not in the local cache")


def _needed_files_message(err: _Unreachable, config: ModelConfig | None, lm_only: bool = False) -> str:
    from openmoshi.lm.config import MOSHI_7B, ModelConfig

    names = [(CONFIG_NAME, "config")] if config is None else []
    cfg = config or ModelConfig(lm=MOSHI_7B)
    names += [(cfg.moshi_name, "moshi")]
    if not lm_only:
        names += [(cfg.mimi_name, "mimi"), (cfg.tokenizer_name, "tokenizer")]
    listing = ", ".join(f"{n} ({_FLAGS[k]})" for n, k in names)
    return (f"{err}. The model needs {listing}: download them where the Hub is reachable and pass "
            f"the local copies with those flags, or put them in a folder and pass --hf-repo FOLDER")


def _cached_legacy(repo: str) -> bool:
    """Whether the local hub cache knows that `repo` has no config.json (a legacy repo), offline."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    from openmoshi.lm.config import MOSHI_7B, ModelConfig

    if try_to_load_from_cache(repo, CONFIG_NAME) is _CACHED_NO_EXIST:
        return True
    # Files put into the cache by hand: the snapshot holds the legacy LM file but no config.json.
    return isinstance(try_to_load_from_cache(repo, ModelConfig(lm=MOSHI_7B).moshi_name), str)


def legacy_lm(repo: str | None):
    """The LM config of a repo or folder without config.json (see the module doc)."""
    from openmoshi.lm.config import MOSHI_7B, PERSONAPLEX_7B

    return PERSONAPLEX_7B if repo and "personaplex" in str(repo).lower() else MOSHI_7B


def _legacy_name(repo: str | None) -> str:
    return "PersonaPlex 7B" if legacy_lm(repo).depformer_user_slots else "legacy Moshi 7B"


def resolve_files(hf_repo: str | None = DEFAULT_REPO, moshi_weight=None, mimi_weight=None,
                  tokenizer=None, config_path=None, lora_weight=None, lm_only: bool = False,
                  before_download=None) -> ModelFiles:
    """Finds (downloading if needed) every file of a model. See the module docstring. `lm_only`:
    the config, LM and LoRA files alone (mimi_weight and tokenizer are None). `before_download`:
    called with the ModelConfig once it is known, before any weight is fetched (a command checks
    there that the model fits the machine)."""
    from openmoshi.lm.config import ModelConfig, load_model_config

    fetch = _Fetcher(hf_repo)
    config: ModelConfig | None = None
    cfg_file: Path | None = None
    try:
        if config_path is not None:
            cfg_file = fetch.uri(config_path, "config")
        elif fetch.local_dir is not None:
            cfg_file = fetch.local_dir / CONFIG_NAME
            if not cfg_file.is_file():
                cfg_file = None
                log.warning(f"{fetch.local_dir} has no {CONFIG_NAME}: assuming the {_legacy_name(hf_repo)}")
        elif hf_repo is not None:
            given = (moshi_weight,) if lm_only else (moshi_weight, mimi_weight, tokenizer)
            cfg_file = _repo_config(fetch, hf_repo, explicit=None not in given)
        config = ModelConfig(lm=legacy_lm(hf_repo)) if cfg_file is None else load_model_config(cfg_file)
        if before_download is not None:
            before_download(config)

        def pick(explicit, name: str | None, kind: str) -> Path | None:
            if explicit is not None:
                return fetch.uri(explicit, kind)
            return None if name is None else fetch.named(name, kind)

        moshi = pick(moshi_weight, config.moshi_name, "moshi")
        mimi = None if lm_only else pick(mimi_weight, config.mimi_name, "mimi")
        tok = None if lm_only else pick(tokenizer, config.tokenizer_name, "tokenizer")
        lora = pick(lora_weight, config.lora_name if config.lora else None, "lora")
        mimi_cfg = None if lm_only else pick(None, config.mimi_config_name, "mimi_config")
    except _Unreachable as e:
        raise ResolveError(_needed_files_message(e, config, lm_only)) from None
    return ModelFiles(config=config, moshi_weight=moshi, mimi_weight=mimi, tokenizer=tok,
                      lora_weight=lora, mimi_config=mimi_cfg, config_path=cfg_file, hf_repo=hf_repo)


def _repo_config(fetch: _Fetcher, repo: str, explicit: bool) -> Path | None:
    """The repo's config.json; None for a legacy repo without one."""
    try:
        return fetch.download(repo, CONFIG_NAME, "config")
    except _Unreachable:
        # Offline: legacy if the cache says so, or if every weight is given locally (as the
        # official loader does); otherwise the caller lists what is needed.
        if _cached_legacy(repo) or explicit:
            log.warning(f"no {CONFIG_NAME} for {repo} (offline): assuming the {_legacy_name(repo)}; pass "
                        "--config-path for another model")
            return None
        raise
    except ResolveError as e:
        if f"has no file {CONFIG_NAME}" not in str(e):
            raise
        log.warning(f"{repo} has no {CONFIG_NAME}: assuming the {_legacy_name(repo)}")
        return None


# ----------------------------------------------------------------------------- device and dtype


def resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ResolveError(f"bad --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ResolveError(f"--device {name} asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str | None, device):
    import torch

    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ResolveError(f"bad --dtype {name!r}, expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)
