"""Building blocks shared by the codec and the language model.

- `transformer`: the causal transformer of Mimi and the LM (RoPE, static KV cache, stacked
  per-step weights), its config and streaming state.
- `lora`: low-rank adapters on a weight (`LoRADelta`).
- `slots`: the base of every streaming state (`SlotState`): fields declare their batch axis and
  reset value once, and prefix views, move, reset, size and one slot's snapshot follow.

Offers: `transformer.Transformer`, `transformer.TransformerConfig`, `transformer.TransformerState`,
`lora.LoRADelta`, `slots.SlotState`, `slots.Snapshot`.

May import: nothing.
"""
