"""`openmoshi finetune` end to end on tiny random models and espeak-ng dialogues: what a run
writes, that the official package loads it and says what `openmoshi infer` says, that 2 processes
under torchrun split every batch and every weight in halves and train as 1 does (in float32, and
in bfloat16 with float32 masters), that a resumed run equals an uninterrupted one, that it learns
to answer each question, and that bad input is one clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune_probe
from finetune_utils import QA, make_dataset
from infer_utils import NAMES, _Collector, make_checkpoint
from openmoshi.audio import SAMPLE_RATE, load_audio, save_wav
from openmoshi.cli.main import main

RUN_ARGS = ["--steps", "6", "--batch-size", "2", "--duration", "4", "--lora-rank", "4", "--lr", "3e-2",
            "--save-every", "3", "--eval-every", "3", "--seed", "1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finetune") / "model"
    make_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("dialogues"), 3)


@pytest.fixture(scope="module")
def run(ckpt, data, tmp_path_factory) -> Path:
    """One process; what it trained on is recorded in run_dir/../probe (see finetune_probe)."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    with pytest.MonkeyPatch.context() as patch:
        finetune_probe.install(patch.setattr, run_dir.parent / "probe")
        assert main(["finetune", str(data), "-o", str(run_dir), "--hf-repo", str(ckpt), "--eval-data", str(data),
                     *RUN_ARGS]) == 0
    return run_dir


def _torchrun(probe: Path, *argv: str) -> None:
    """`torchrun --nproc-per-node 2 -m openmoshi ARGV`, each rank recording into `probe`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           finetune_probe.__file__, *argv]
    subprocess.run(cmd, env={**os.environ, "PROBE_DIR": str(probe)}, check=True, timeout=600)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _user_channel(data: Path, i: int = 0) -> torch.Tensor:
    return load_audio(data.parent / f"data_{i}.wav", mono=False)[1:2]


def test_run_writes_what_moshi_finetune_users_expect(run, ckpt):
    consolidated = run / "checkpoints" / "checkpoint_000006" / "consolidated"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint_000003", "checkpoint_000006"]
    assert sorted(p.name for p in consolidated.iterdir()) == ["config.json", "lora.safetensors"]
    config = json.loads(consolidated.read_text() if False else (consolidated / "config.json").read_text())
    base = json.loads((ckpt / "config.json").read_text())
    assert config == {**base, "lora": True, "lora_rank": 4, "lora_scaling": 2.0}
    lora = load_file(str(consolidated / "lora.safetensors"))
    assert "transformer.layers.0.self_attn.in_projs.0.lora_A.weight" in lora
    assert lora["depformer.layers.0.self_attn.in_projs.7.lora_B.weight"].abs().sum() > 0  # trained
    records = _metrics(run)
    train = [r for r in records if not r.get("eval")]
    evals = [r for r in records if r.get("eval")]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [3, 6]
    for r in train:
        assert set(r) == {"step", "loss", "text_loss", "audio_loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb"}
        assert r["loss"] == pytest.approx(r["text_loss"] + r["audio_loss"])
        assert r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0
    assert set(evals[0]) == {"step", "eval", "loss", "text_loss", "audio_loss"}
    assert train[0]["lr"] > train[-1]["lr"]  # cosine decay
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def _official(files: list[Path], config: Path, lora: Path | None, user: torch.Tensor):
    """The official offline loop, greedy, with the official loader's LoRA (fused)."""
    from moshi.models import loaders
    from moshi.run_inference import InferenceState, seed_all

    info = loaders.CheckpointInfo.from_hf_repo("unused/unused", *files, config, lora_weights=lora)
    lm = info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=True)
    seed_all(4242)
    state = InferenceState(info, info.get_mimi(device="cpu"), info.get_text_tokenizer(), lm, 1, 1.0, "cpu",
                           use_sampling=False, **info.lm_gen_config)
    state.printer = _Collector()
    with torch.no_grad():
        (text, pcm), = state.run(user.reshape(1, 1, -1))
    return [t for t in text.tolist() if t not in (0, 3)], pcm


def _infer(tmp_path: Path, user: torch.Tensor, *model_flags: str):
    wav = tmp_path / "user.wav"
    save_wav(wav, user, SAMPLE_RATE, float32=True)
    out, transcript = tmp_path / "out.wav", tmp_path / "t.json"
    assert main(["infer", str(wav), "-o", str(out), "--transcript", str(transcript), "--greedy", "--device", "cpu",
                 "--dtype", "float32", "-q", *model_flags]) == 0
    return [p["id"] for p in json.loads(transcript.read_text())["pieces"]], load_audio(out)


def test_lora_loads_in_the_official_package_as_in_infer(run, ckpt, data, tmp_path):
    consolidated = run / "checkpoints" / "checkpoint_000006" / "consolidated"
    user = _user_channel(data)
    files = [ckpt / NAMES[k] for k in ("moshi_name", "mimi_name", "tokenizer_name")]
    ref_text, ref_pcm = _official(files, consolidated / "config.json", consolidated / "lora.safetensors", user)
    text, pcm = _infer(tmp_path, user, "--hf-repo", str(ckpt), "--lora-weight", str(consolidated / "lora.safetensors"),
                       "--config-path", str(consolidated / "config.json"))
    assert text == ref_text
    assert pcm.shape == ref_pcm.shape and (pcm - ref_pcm).abs().max() < 1e-4
    base_text, base_pcm = _infer(tmp_path, user, "--hf-repo", str(ckpt))
    assert base_text != text or (base_pcm - pcm).abs().max() > 1e-3  # the adapters change the model


def test_exports_load_everywhere(run, ckpt, data, tmp_path):
    consolidated = run / "checkpoints" / "checkpoint_000006" / "consolidated"
    user = _user_channel(data, 1)
    text, pcm = _infer(tmp_path, user, "--hf-repo", str(ckpt), "--lora-weight", str(consolidated / "lora.safetensors"),
                       "--config-path", str(consolidated / "config.json"))
    merged = tmp_path / "merged"
    assert main(["finetune", "export", str(run), "-o", str(merged), "--merge"]) == 0
    config = json.loads((merged / "config.json").read_text())
    assert config["lora"] is False and "lora_rank" not in config and config["moshi_name"] == "model.safetensors"
    assert "transformer.layers.0.self_attn.in_proj_weight" in load_file(str(merged / "model.safetensors"))
    files = [merged / config[k] for k in ("moshi_name", "mimi_name", "tokenizer_name")]
    ref_text, ref_pcm = _official(files, merged / "config.json", None, user)
    assert ref_text == text and (ref_pcm - pcm).abs().max() < 1e-4
    assert _infer(tmp_path, user, "--hf-repo", str(merged))[0] == text
    adapters = tmp_path / "adapters"  # without --merge: base weights + lora.safetensors named by the config
    assert main(["finetune", "export", str(run), "-o", str(adapters), "--step", "6"]) == 0
    assert json.loads((adapters / "config.json").read_text())["lora_name"] == "lora.safetensors"
    assert _infer(tmp_path, user, "--hf-repo", str(adapters))[0] == text


def test_two_processes_train_as_one(run, ckpt, data, tmp_path):
    """torchrun with 2 gloo processes (FSDP2): each rank trains on its own half of every batch and
    holds half of every weight, and together they train as 1 process with the whole batch does."""
    two = tmp_path / "two"
    _torchrun(tmp_path / "probe", "finetune", str(data), "-o", str(two), "--hf-repo", str(ckpt),
              "--eval-data", str(data), *RUN_ARGS)
    one, = finetune_probe.read(run.parent / "probe", 1)
    ranks = finetune_probe.read(tmp_path / "probe", 2)
    assert len(one["segments"]) == 6 and all(len(r["segments"]) == 6 for r in ranks)
    for step, whole in enumerate(one["segments"]):
        mine, theirs = (r["segments"][step] for r in ranks)
        assert len(mine) == len(theirs) == len(whole) // 2, step
        assert not {tuple(s) for s in mine} & {tuple(s) for s in theirs}, step  # no segment twice
        assert sorted(mine + theirs) == sorted(whole), step
    assert not one["shards"] and ranks[0]["shards"].keys() == ranks[1]["shards"].keys() != set()
    for name, (held, shape) in ranks[0]["shards"].items():
        other = ranks[1]["shards"][name][0]
        rows = shape[0]  # FSDP2 cuts dim 0 as torch.chunk does: the first rank takes the odd row
        assert [held, other] == [[(rows + 1) // 2, *shape[1:]], [rows // 2, *shape[1:]]], name

    ref, got = _metrics(run), _metrics(two)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for key in ("loss", "text_loss", "audio_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    name = "checkpoints/checkpoint_000006/consolidated/lora.safetensors"
    a, b = load_file(str(run / name)), load_file(str(two / name))
    assert a.keys() == b.keys()
    for k in a:  # Adam turns float noise in near-zero gradients into updates: far below lr (3e-2)
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-3)


def test_bf16_under_fsdp2_computes_in_bf16_and_keeps_float32_masters(ckpt, data, tmp_path):
    """--dtype bfloat16 with 2 processes (FSDP2's mixed precision, over gloo on CPU): the layers
    compute with bfloat16 copies of what trains, while the kept shards and AdamW's moments stay
    float32; the steps are those of 1 process in bfloat16 (no FSDP) to bfloat16's precision, and
    the loss goes down. Every step trains on all 6 segments, so the losses compare step by step."""
    args = ["--hf-repo", str(ckpt), "--dtype", "bfloat16", "--steps", "4", "--batch-size", "6", "--duration", "4",
            "--lora-rank", "4", "--lr", "1e-2", "--save-every", "0", "--seed", "1"]
    _torchrun(tmp_path / "probe", "finetune", str(data), "-o", str(tmp_path / "two"), *args)
    for r in finetune_probe.read(tmp_path / "probe", 2):
        assert r["compute_dtypes"] == ["torch.bfloat16"]
        assert r["trained_dtypes"] == r["moment_dtypes"] == ["torch.float32"]
        assert sum(len(s) for s in r["segments"]) == 4 * 3  # half of each batch
    assert main(["finetune", str(data), "-o", str(tmp_path / "one"), *args]) == 0
    one, two = ([r["loss"] for r in _metrics(tmp_path / name)] for name in ("one", "two"))
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-3)
    assert all(b < a for a, b in zip(two, two[1:])), two  # the same data at every step: down each time


def test_nproc_reruns_the_command_under_torchrun(monkeypatch, ckpt, data, tmp_path):
    """`--nproc 2` (the tests above run torchrun themselves, to record each rank)."""
    from openmoshi.cli import finetune

    ran = []
    monkeypatch.setattr(finetune.subprocess, "run", lambda cmd: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["finetune", str(data), "-o", str(tmp_path / "run"), "--nproc", "2", "--hf-repo", str(ckpt), "--steps", "3"]
    assert main(argv) == 0
    assert ran == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    "-m", "openmoshi", "finetune", str(data), "-o", str(tmp_path / "run"), "--hf-repo", str(ckpt),
                    "--steps", "3"]]


def test_resumed_run_equals_uninterrupted(run, ckpt, data, tmp_path):
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint_000003", resumed / "checkpoints" / "checkpoint_000003")
    shutil.copy(run / "run.json", resumed / "run.json")
    kept = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 3]
    (resumed / "metrics.jsonl").write_text("\n".join(kept) + "\n" + '{"step": 4, "loss": 0}\n')  # a lost step
    assert main(["finetune", str(data), "-o", str(resumed), "--hf-repo", str(ckpt), "--eval-data", str(data),
                 "--resume", *RUN_ARGS]) == 0
    name = "checkpoints/checkpoint_000006/consolidated/lora.safetensors"
    a, b = load_file(str(run / name)), load_file(str(resumed / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got, want = _metrics(resumed), _metrics(run)
    assert len(got) == len(want)  # the lost step's line replaced, nothing missing or repeated
    assert [set(r) for r in got] == [set(r) for r in want]
    timing = ("tokens_per_s", "peak_mem_gb")  # the only values that may differ between the runs
    assert [{k: v for k, v in r.items() if k not in timing} for r in got] == \
        [{k: v for k, v in r.items() if k not in timing} for r in want]


def test_yaml_config_and_flags(ckpt, data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"hf_repo: {ckpt}\nlora_rank: 2\nsteps: 3\nbatch_size: 1\nduration: 2\nsave_every: 0\n")
    out = tmp_path / "run"
    assert main(["finetune", str(data), "-o", str(out), "--config", str(recipe), "--steps", "1"]) == 0
    config = json.loads((out / "checkpoints" / "checkpoint_000001" / "consolidated" / "config.json").read_text())
    assert config["lora_rank"] == 2 and len(_metrics(out)) == 1


def test_full_finetune_loads_in_the_official_package(ckpt, data, tmp_path):
    out = tmp_path / "full"
    assert main(["finetune", str(data), "-o", str(out), "--hf-repo", str(ckpt), "--full", "--steps", "2",
                 "--batch-size", "2", "--duration", "4", "--lr", "1e-3", "--save-every", "0"]) == 0
    consolidated = out / "checkpoints" / "checkpoint_000002" / "consolidated"
    assert sorted(p.name for p in consolidated.iterdir()) == ["config.json", "consolidated.safetensors"]
    assert json.loads((consolidated / "config.json").read_text())["lora"] is False
    user = _user_channel(data)
    files = [consolidated / "consolidated.safetensors", ckpt / NAMES["mimi_name"], ckpt / NAMES["tokenizer_name"]]
    ref_text, ref_pcm = _official(files, consolidated / "config.json", None, user)  # strict official load
    text, pcm = _infer(tmp_path, user, "--hf-repo", str(ckpt), "--moshi-weight", str(files[0]))
    assert text == ref_text and (pcm - ref_pcm).abs().max() < 1e-4


def test_checkpointing_and_qlora_train_the_same_adapters(run, ckpt, data, tmp_path):
    """--grad-checkpointing recomputes what was computed; --quantize int8 (QLoRA) trains adapters
    with the official names over int8 weights, which load on the float model."""
    runs = {}
    for name, flags in (("plain", []), ("ckpt", ["--grad-checkpointing"]), ("q8", ["--quantize", "int8"])):
        runs[name] = tmp_path / name
        assert main(["finetune", str(data), "-o", str(runs[name]), "--hf-repo", str(ckpt), "--steps", "2",
                     "--batch-size", "2", "--duration", "4", "--lora-rank", "4", "--lr", "1e-2", "--save-every", "0",
                     *flags]) == 0
    lora = {k: load_file(str(v / "checkpoints/checkpoint_000002/consolidated/lora.safetensors")) for k, v in runs.items()}
    for k in lora["plain"]:
        torch.testing.assert_close(lora["ckpt"][k], lora["plain"][k], rtol=0, atol=1e-6)
    assert lora["q8"].keys() == lora["plain"].keys()
    assert _metrics(runs["q8"])[0]["loss"] == pytest.approx(_metrics(runs["plain"])[0]["loss"], rel=1e-2)
    consolidated = runs["q8"] / "checkpoints/checkpoint_000002/consolidated"
    _infer(tmp_path, _user_channel(data), "--hf-repo", str(ckpt), "--lora-weight", str(consolidated / "lora.safetensors"),
           "--config-path", str(consolidated / "config.json"))


def test_conditioned_model_trains_on_text_conditions(data, tmp_path, capsys):
    """A Hibiki-like model with a LUT conditioner: each conversation's text_conditions condition it,
    the adapters cover the conditioner's linear too, and the official loader takes them."""
    from infer_utils import MOSHI

    folder = tmp_path / "cond"
    cond = {"conditioners": {"description": {"type": "lut", "lut": {
        "n_bins": 31, "dim": 16, "tokenizer": "noop", "possible_values": ["very_bad", "very_good"]}}},
        "fuser": {"sum": ["description"]}}
    make_checkpoint(folder, "hibiki", seed=2, lm_kwargs=dict(MOSHI, **cond))
    manifest = _broken_dataset(tmp_path / "data", data)
    for i, value in enumerate(["very_good", "very_bad", "very_good"]):
        path = manifest.parent / f"data_{i}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "text_conditions": {"description": value}}))
    out = tmp_path / "run"
    assert main(["finetune", str(manifest), "-o", str(out), "--hf-repo", str(folder), "--steps", "2",
                 "--batch-size", "3", "--duration", "4", "--lora-rank", "2", "--save-every", "0"]) == 0
    consolidated = out / "checkpoints/checkpoint_000002/consolidated"
    lora = load_file(str(consolidated / "lora.safetensors"))
    assert "condition_provider.conditioners.description.output_proj.lora_A.weight" in lora
    from moshi.models import loaders

    config = json.loads((consolidated / "config.json").read_text())
    kwargs = {k: v for k, v in config.items() if k not in ("moshi_name", "mimi_name", "tokenizer_name", "model_type")}
    loaders.get_moshi_lm(folder / NAMES["moshi_name"], lm_kwargs=kwargs, device="cpu", dtype=torch.float32,
                         lora_weights=consolidated / "lora.safetensors", fuse_lora=True)
    (manifest.parent / "data_1.json").write_text(json.dumps({"alignments": []}))  # no text_conditions
    _fails(capsys, ["finetune", str(manifest), "-o", str(tmp_path / "run2"), "--hf-repo", str(folder), "--steps", "1"],
           "text_conditions")


def _fails(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("openmoshi: error:") and "Traceback" not in "\n".join(err), err
    for w in words:
        assert w in err[-1], err[-1]


def _broken_dataset(folder: Path, data: Path) -> Path:
    """A copy of the dataset with its codes cache (still valid: it names wavs relative to itself)."""
    shutil.copytree(data.parent, folder)
    return folder / data.name


@pytest.mark.parametrize("case,words", [
    ("missing manifest", ["does not exist"]),
    ("mono wav", ["channel", "stereo"]),
    ("missing json", ["no alignment file", "openmoshi annotate"]),
    ("malformed json", ["not valid JSON"]),
    ("word outside the audio", ["outside the audio"]),
    ("bad lora", ["does not fit"]),
    ("unwritable run dir", ["-o"]),
])
def test_bad_input_is_one_clear_error(ckpt, data, tmp_path, capsys, case, words):
    manifest = _broken_dataset(tmp_path / "data", data)
    out = tmp_path / "run"
    extra = []
    if case == "missing manifest":
        manifest = tmp_path / "nope.jsonl"
    elif case == "mono wav":
        pcm = load_audio(manifest.parent / "data_1.wav")
        save_wav(manifest.parent / "data_1.wav", pcm, SAMPLE_RATE)
    elif case == "missing json":
        (manifest.parent / "data_2.json").unlink()
    elif case == "malformed json":
        (manifest.parent / "data_2.json").write_text('{"alignments": [')
    elif case == "word outside the audio":
        a = json.loads((manifest.parent / "data_0.json").read_text())
        a["alignments"].append(["late", [60.0, 60.5], "SPEAKER_MAIN"])
        (manifest.parent / "data_0.json").write_text(json.dumps(a))
    elif case == "bad lora":
        lora = tmp_path / "lora.safetensors"
        save_file({"transformer.layers.0.gating.linear_in.lora_A.weight": torch.zeros(2, 3),
                   "transformer.layers.0.gating.linear_in.lora_B.weight": torch.zeros(5, 2)}, str(lora))
        extra = ["--lora-weight", str(lora)]
    elif case == "unwritable run dir":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run"
    _fails(capsys, ["finetune", str(manifest), "-o", str(out), "--hf-repo", str(ckpt), "--steps", "1",
                    "--batch-size", "1", "--duration", "2", "--lora-rank", "2", *extra], *words)
    if out.is_dir():  # nothing that looks like a run or a finished checkpoint
        assert not (out / "run.json").exists() and not (out / "checkpoints").exists()


def test_existing_run_needs_resume(run, ckpt, data, capsys):
    _fails(capsys, ["finetune", str(data), "-o", str(run), "--hf-repo", str(ckpt), *RUN_ARGS], "--resume")
    _fails(capsys, ["finetune", str(data), "-o", str(run), "--hf-repo", str(ckpt), "--resume", *RUN_ARGS[:-2], "--seed", "9"],
           "seed")


@pytest.mark.slow
def test_it_learns_to_answer_each_question(ckpt, tmp_path):
    """Two questions, each with its own answer 0.4 s after it: a tiny model with LoRA, trained on
    them, gives each question its own answer (greedy, its own voice fed back, as `openmoshi infer`
    runs it), which the untrained model does not. A model that ignored the user could say one
    answer at most."""
    from openmoshi.loading.tokenizer import load_text_tokenizer

    manifest = make_dataset(tmp_path / "data", len(QA), pairs=QA)
    run_dir = tmp_path / "run"
    assert main(["finetune", str(manifest), "-o", str(run_dir), "--hf-repo", str(ckpt), "--steps", "100",
                 "--batch-size", "2", "--duration", "5", "--lora-rank", "16", "--lr", "2e-2", "--warmup", "0.05",
                 "--first-codebook-weight", "1", "--save-every", "0"]) == 0
    lora = run_dir / "checkpoints" / "checkpoint_000100" / "consolidated" / "lora.safetensors"
    tok = load_text_tokenizer(ckpt / NAMES["tokenizer_name"])
    answers = [[t for word in answer.split() for t in tok.encode(word)] for _, answer in QA]
    users = [load_audio(manifest.parent / f"data_{i}.wav", mono=False)[1] for i in range(len(QA))]

    def answers_each(said: list[list[int]]) -> bool:
        """Each question's answer said (90% of its tokens in order), and little of the other's."""
        return all(_in_order(want, got) >= 0.9 * len(want) and
                   all(_in_order(other, got) < 0.5 * len(other) for other in answers if other is not want)
                   for want, got in zip(answers, said))

    trained = _says(ckpt, lora, users)
    assert answers_each(trained), [tok.decode(t) for t in trained]
    untrained = _says(ckpt, None, users)
    assert not answers_each(untrained), [tok.decode(t) for t in untrained]


def _says(ckpt: Path, lora: Path | None, users: list[torch.Tensor]) -> list[list[int]]:
    """The text tokens the model says to each user channel [N] (greedy, as `openmoshi infer`
    generates, without decoding the audio: its own audio codes are fed back all the same)."""
    from openmoshi.lm import generate as G
    from openmoshi.lm.config import TEXT_END_PADDING_ID, TEXT_PADDING_ID
    from openmoshi.lm.sampling import SamplingConfig
    from openmoshi.loading.lm import load_lm
    from openmoshi.loading.mimi import load_mimi
    from openmoshi.loading.resolve import resolve_files

    files = resolve_files(str(ckpt))
    lm = load_lm(files.moshi_weight, files.config.lm, dtype=torch.float32, lora=lora)
    mimi = load_mimi(files.mimi_weight, files.config.mimi_codebooks)
    n = max(len(u) for u in users) + SAMPLE_RATE  # and a second of silence after the longest
    pcm = torch.stack([torch.nn.functional.pad(u, (0, n - len(u))) for u in users])[:, None]  # [B, 1, N]
    with torch.no_grad():
        codes = mimi.encode(pcm)  # [B, Ku, T]
        state = G.init_state(lm, len(users), SamplingConfig.greedy())
        text = [G.step(lm, state, codes[:, :, t]) for t in range(codes.shape[2])]
        text = torch.stack([out.text for out in text if out.valid.all()], dim=1)  # [B, T']
    return [[t for t in row.tolist() if t not in (TEXT_PADDING_ID, TEXT_END_PADDING_ID)] for row in text]


def _in_order(want: list[int], said: list[int]) -> int:
    """How many of `want` appear in `said` in order (longest common subsequence)."""
    row = [0] * (len(said) + 1)
    for w in want:
        prev = 0
        for j, s in enumerate(said):
            prev, row[j + 1] = row[j + 1], prev + 1 if w == s else max(row[j + 1], row[j])
    return row[-1]
