#!/usr/bin/env bash
# The prepared device run for issue 5: one call on an H100/H200 checks and times everything.
#   on the developer machine:  echo /.whl/ >> .git/info/exclude
#                              python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                                --implementation cp --platform manylinux_2_28_x86_64 -d .whl moshi==0.2.13 einops
#   device run (carry .whl):   bash benchmarks/gpu_check.sh [all|speed|finetune|serving|stt|latency|tts]   (writes everything under $OUT)
#   "all" (default) does every part; each part alone fits one 10-minute call (speed ~580 s, finetune ~300 s,
#   serving ~400 s); "stt", "latency" and "tts" (not in "all") run alone, ~500 s each.
# Same process, same config, same device for the official package and openmoshi: ratios are fair.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
PART=${1:-all}
if [ "$PART" = all ] || [ "$PART" = speed ]; then
# 1. equivalence on the GPU: CUDA-graph step == eager step (alone, in the server batcher and in offline
#    inference, seeded included), tinygemm int4 == reference
#    and the fused Triton kernels (tests/test_fused.py runs them on CUDA tensors when a GPU is there),
#    and forced tokens (personas) through captured graphs (tests/test_forced.py)
timeout 60 python3 -m pytest -q -m gpu tests/test_fast_paths.py tests/test_graphed_loops.py tests/test_forced.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
timeout 40 python3 -m pytest -q tests/test_fused.py 2>&1 | tail -3 | tee -a "$OUT/gpu_tests.txt"
# 2. the official loop and ours, 7B bf16, batch 1/32 (worst case of all timeouts: about 580 s)
timeout 200 python3 benchmarks/compare_official.py --config moshi_7b --batch-sizes 1,32 --steps 40 --warmup 10 \
  --device cuda --json "$OUT/compare_7b.json" 2>&1 | tee "$OUT/compare_7b.txt"
# 3. ours alone at batch 64 (peak memory at the full context), without the fused kernels, then int8 and int4
#    at batch 1 (the int4 run's peak memory is the "7B int4 at full context" number: the KV cache is preallocated)
timeout 80 python3 -m openmoshi bench --batch-sizes 64 --steps 40 --json "$OUT/bench_bf16.json" 2>&1 | tee "$OUT/bench.txt"
timeout 45 python3 -m openmoshi bench --no-mimi --no-fused --batch-sizes 1 --steps 40 --json "$OUT/bench_nofused.json" 2>&1 | tee -a "$OUT/bench.txt"
for q in int8 int4; do
  timeout 60 python3 -m openmoshi bench --no-mimi --quantize $q --batch-sizes 1 --steps 40 --json "$OUT/bench_$q.json" 2>&1 | tee -a "$OUT/bench.txt"
done
# 4. quantization quality: int8/int4 vs bf16 (and fp32 vs bf16) logits, full 7B, random weights, same inputs (not yet timed on a GPU)
timeout 75 python3 benchmarks/quant_quality.py --frames 300 --stream-frames 48 --json "$OUT/quant_quality.json" 2>&1 | tee "$OUT/quant_quality.txt"
fi
if [ "$PART" = all ] || [ "$PART" = finetune ]; then
# 5. fine-tuning (issue 9): a 7B LoRA step (batch 1, gradient checkpointing, bf16 weights), the official model's
#    forward + backward in the same process first, then ours alone at ranks 16/128 and 30/100 s segments
#    (their peak memory is what the on-paper table of `finetune_speed.py --paper` estimates)
timeout 150 python3 benchmarks/finetune_speed.py --config moshi_7b --device cuda --batch-size 1 --seconds 30 \
  --lora-rank 16 --grad-checkpointing --steps 3 --json "$OUT/finetune_7b_r16_30s.json" 2>&1 | tee "$OUT/finetune.txt"
for r in 16 128; do for s in 30 100; do
  timeout 35 python3 benchmarks/finetune_speed.py --config moshi_7b --device cuda --batch-size 1 --seconds $s \
    --lora-rank $r --grad-checkpointing --no-official --steps 2 --json "$OUT/finetune_7b_r${r}_${s}s.json" 2>&1 | tee -a "$OUT/finetune.txt"
done; done
#    the training tests on CUDA tensors: LoRA parity and gradients against the official model
timeout 60 python3 -m pytest -q tests/test_finetune_model.py 2>&1 | tail -3 | tee -a "$OUT/finetune.txt"
fi
if [ "$PART" = all ] || [ "$PART" = serving ]; then
# 6. occupancy (issue 12): the 7B server's frame time against occupied slots on servers sized 1, 8 and 64,
#    bf16 then int4, eagerly, with every slot computed (as before) in the same run for comparison
for q in none int4; do
  flag=$([ $q = none ] || echo "--quantize $q")
  timeout 100 python3 benchmarks/server_load.py --config moshi_7b --device cuda --mimi full $flag --sizes 1 8 64 \
    --occupied 1 8 64 --frames 15 --warmup 3 --all-slots --json "$OUT/server_load_7b_$q.json" 2>&1 | tee -a "$OUT/server_load.txt"
done
# 7. the start-up self-check (issue 14) on the 7B: the fused kernels' relative error and the graphed step's
#    token agreement against the reference (what serve/infer check before they start), and its time
timeout 120 python3 benchmarks/self_check.py --config moshi_7b --device cuda --json "$OUT/self_check_7b.json" 2>&1 | tee "$OUT/self_check.txt"
#    and the serving tests that take the CUDA path (text shaping keys the graphs on a new flag)
timeout 90 python3 -m pytest -q tests/test_self_check.py tests/test_text_shaping.py tests/test_graphed_loops.py 2>&1 | tail -3 | tee -a "$OUT/self_check.txt"
fi
if [ "$PART" = stt ]; then
# 8. Kyutai STT (issue 21): streams per step at real time, the server's STT tick against the official LMGen loop
#    (both with CUDA graphs), on stt-1b's transformer with random weights; Kyutai's claim: 400 streams on one H100.
#    And the STT parity tests on this machine (CPU tensors: a check of the install there).
timeout 420 python3 benchmarks/stt_streams.py --device cuda --dtype bfloat16 --config stt_1b \
  --batch-sizes 1 64 256 400 --steps 30 --warmup 8 --json "$OUT/stt_streams_1b.json" 2>&1 | tee "$OUT/stt_streams.txt"
timeout 150 python3 -m pytest -q tests/test_stt.py 2>&1 | tail -3 | tee -a "$OUT/stt_streams.txt"
fi

if [ "$PART" = latency ]; then
# 9. latency as a client hears it (issue 20): the official server and ours in one run, then ours with 8 and 32
#    conversations at staggered phases (phase groups), on CUDA with graphs; the small LM and real-size Mimi
#    (the 7B rows need a 7B random checkpoint on disk: not prepared yet, about 15 GB to write).
timeout 560 python3 benchmarks/latency.py --device cuda --dtype bfloat16 --lm small --conversations 1,8,32 \
  --seconds 15 --json "$OUT/latency_small.json" 2>&1 | tee "$OUT/latency.txt"
fi

if [ "$PART" = tts ]; then
# 10. Kyutai TTS (issue 21): the offline loop against the official TTSModel.generate, then /api/tts_streaming as
#     clients see it (time to first audio, RTF) with 1, 16 and 32 streams beside the official model loop; the small
#     random TTS (dim 256, 6 layers; the 1.6B's layout). Kyutai's claim: 220 ms to first audio, 32 batched on an L40S.
timeout 250 python3 benchmarks/tts_speed.py --config small --streams 1,16,32 --device cuda --repeats 1 \
  --json "$OUT/tts_speed.json" 2>&1 | tee "$OUT/tts.txt"
timeout 300 python3 benchmarks/tts_serving.py --config small --streams 1,16,32 --device cuda \
  --json "$OUT/tts_serving.json" 2>&1 | tee -a "$OUT/tts.txt"
fi
