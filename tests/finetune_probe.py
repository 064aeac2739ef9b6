"""`openmoshi ARGS` with a record of what each rank did inside the training loop, which no file a
run writes shows: which segments it trained on, how much of each parameter it holds, and the
dtypes it computed and kept its weights in. For tests only.

    torchrun --standalone --nproc-per-node 2 tests/finetune_probe.py finetune data.jsonl -o run ...

(as `torchrun ... -m openmoshi finetune ...`) writes $PROBE_DIR/rank-{rank}.json:
- "segments": per training step, [conversation, first frame] of each segment this rank took;
- "shards": per parameter, [the shape this rank holds, the parameter's whole shape];
- "compute_dtypes": the dtypes that the transformer layers' trainable weights have inside their
  forward (FSDP's gathered copies);
- "trained_dtypes", "moment_dtypes": the dtypes of what trains (the kept, sharded values) and of
  AdamW's moments, at the last checkpoint.
`install(setattr, folder)` does the same in this process (setattr: e.g. a pytest MonkeyPatch's).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def install(setattr_, folder) -> None:
    from openmoshi.modules.transformer import Transformer
    from openmoshi.training import checkpoints, loop
    from openmoshi.training.segments import SegmentData

    record = {"segments": [], "shards": {}, "compute_dtypes": [], "trained_dtypes": [], "moment_dtypes": []}
    seen = set()
    rank = int(os.environ.get("RANK", "0"))
    path = Path(folder) / f"rank-{rank}.json"
    evaluating = [False]

    def write():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))

    batch, evaluate, shard, save = SegmentData.batch, loop._evaluate, loop.shard, checkpoints.save

    def probed_batch(self, indices):
        if not evaluating[0]:
            record["segments"].append([[self.segments[i].conversation, self.segments[i].start] for i in indices])
        return batch(self, indices)

    def probed_evaluate(*args, **kwargs):
        evaluating[0] = True
        try:
            return evaluate(*args, **kwargs)
        finally:
            evaluating[0] = False

    def probed_shard(model, d, dtype):
        shard(model, d, dtype)
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            record["shards"][name] = [list(local.shape), list(p.shape)]
        # Registered after fully_shard's own pre-forward hook, so this one sees the gathered weights.
        for m in model.modules():
            if isinstance(m, Transformer):
                for layer in m.layers:
                    layer.register_forward_pre_hook(see_weights)

    def see_weights(module, _):
        seen.update(str(p.dtype) for p in module.parameters() if p.requires_grad)
        record["compute_dtypes"] = sorted(seen)

    def probed_save(run_dir, step, model, optimizer, *args, **kwargs):
        record["trained_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
        record["moment_dtypes"] = sorted({str(v.dtype) for s in optimizer.state.values() for k, v in s.items()
                                          if k in ("exp_avg", "exp_avg_sq")})
        write()
        return save(run_dir, step, model, optimizer, *args, **kwargs)

    setattr_(SegmentData, "batch", probed_batch)
    setattr_(loop, "_evaluate", probed_evaluate)
    setattr_(loop, "shard", probed_shard)
    setattr_(checkpoints, "save", probed_save)


def read(folder, world: int) -> list[dict]:
    return [json.loads((Path(folder) / f"rank-{r}.json").read_text()) for r in range(world)]


if __name__ == "__main__":
    from openmoshi.cli.main import main

    install(setattr, os.environ["PROBE_DIR"])
    sys.exit(main(sys.argv[1:]))
