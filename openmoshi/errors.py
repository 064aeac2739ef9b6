"""What a user can fix, as one type: `UserError`.

A `UserError` is raised for what the user caused and can put right: a missing or unreadable file,
a bad flag or option, a config, checkpoint, audio file, voice or data set that cannot be used, an
out-of-range value given to the library's public API (`openmoshi.load_*`, `openmoshi.inference`,
`SamplingConfig`, `Engine` arguments, ...). Its message says, in one line, what is wrong and, where
it can, what to do instead: the command line prints it as `openmoshi: error: ...` and exits 2.
Anything else raised is a bug (our own code passing a wrong shape, a broken invariant) and keeps
its traceback.

`UserError` is a `ValueError`, so code and tests that catch `ValueError` catch it as before. Each
kind has its subclass beside what it guards:

- `audio.AudioError`: an audio file or array that cannot be read or used;
- `lm.config.ConfigError`: a model config (config.json, its keys and values);
- `lm.conditioners.ConditionError`: a condition value a conditioned model cannot take;
- `lm.persona.PromptError`: a persona prompt (text or voice) the model cannot take;
- `loading.files.CheckpointError`: a checkpoint, adapter or tokenizer file that cannot be used;
- `loading.resolve.ResolveError`: a model file that cannot be found or fetched, a bad device;
- `loading.budget.MemoryCheckError`: a command that would not fit in the memory available;
- `loading.voices.VoiceError`: a PersonaPlex voice prompt, a Kyutai TTS voice;
- `lm.tts.TTSError`: a TTS model or input (voices, prefix, cfg coefficient) the generation cannot take;
- `inference.tts.RequestError`: a TTS request (a `moshi-tts` JSONL line);
- `training.manifest.DataError`: fine-tuning data (manifest, alignments, codes cache);
- `training.loop.RunError`: a run folder that cannot be used as asked;
- `training.annotate.ModelError`: the Whisper model of `openmoshi annotate`;
- `cli.common.UsageError`: what a command's handler finds wrong with its flags and files;
- `UnsupportedError` (here): a model or option this implementation does not run (yet).

May import: nothing.
"""

from __future__ import annotations


class UserError(ValueError):
    """An error the user can fix; the message says what is wrong (and what to do), in one line."""


class UnsupportedError(UserError, NotImplementedError):
    """A model or option that this implementation does not run (yet); also a NotImplementedError."""
