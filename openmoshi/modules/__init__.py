"""Building blocks shared by the codec and the language model.

- `transformer`: the causal transformer of Mimi and the LM (RoPE, static KV cache, stacked
  per-step weights), its config and streaming state.
- `lora`: low-rank adapters on a weight (`LoRADelta`).

Offers: `transformer.Transformer`, `transformer.TransformerConfig`, `transformer.TransformerState`,
`lora.LoRADelta`.

May import: nothing.
"""
