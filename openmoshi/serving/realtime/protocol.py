"""`/v1/realtime`'s wire protocol for one session: the OpenAI Realtime API over the server's shared
model slots (same seats in the model loop, waiting line, auth, limits and metrics as `/api/chat`):

    input_audio_buffer.append ──base64, G.711, 8->24 kHz──> PCM ──> session.push_pcm (whole frames)
                              └──> SpeechDetector (vad) ──> speech_started / speech_stopped / committed
    model frame ──> ModelTurns (turns) ──> response.created ... deltas ... response.done
                                           (the session's outbox, in order) ──sender──> websocket

Every server event goes through the session's one ordered outbox, so that no delta can follow its
response's `response.done`; audio deltas are the droppable items: a client that reads slowly loses
its oldest audio, never other events. Injected speech (issue 22): an assistant text item
(`conversation.item.create`, role assistant, text parts) or a `response.create` with `instructions`
(or text items in its `input`) makes Moshi say that text in its own voice (`lm.inject`, forced on its
inner monologue; `session.inject`): the text's first frame starts a response (ending the one in
progress), which answers that response.create (its metadata), and ends as any other does;
`response.cancel` drops the rest of its text. Things Moshi cannot do (session instructions, tools,
voices) are accepted and reported as `ignored` in `session.updated`, except on a PersonaPlex model,
where `instructions` and `voice` (a voice of `serve --voice-prompt-dir`) become its text and voice
prompts: Moshi's side restarts with that persona (its prompt phase, from the persona cache when it
has run before). A malformed event gets an `error` event and the session goes on. With a Kyutai STT
model beside Moshi (`serve --stt-model`), `audio.input.transcription` adds the user's words to their
input audio items (`transcription`); without one it is accepted and reported as ignored.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import TYPE_CHECKING, Mapping

import numpy as np

from openmoshi.lm.inject import InjectError
from openmoshi.serving.realtime import events as E
from openmoshi.serving.realtime.formats import AudioFormat, InputDecoder, OutputEncoder, parse_format
from openmoshi.serving.realtime.transcription import Transcriber, parse_setting
from openmoshi.serving.realtime.turns import ENDED, STARTED, ModelTurns
from openmoshi.serving.realtime.vad import SpeechDetector, TurnDetection
from openmoshi.serving.session import event

if TYPE_CHECKING:
    from openmoshi.serving.session import Session

SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL = "openai-insecure-api-key."  # browsers pass the key as a websocket subprotocol
MODEL_NAME = "moshi"
VOICE = "moshi"  # the one voice the loaded model has
MIN_COMMIT_MS = 100  # OpenAI refuses to commit less audio than this
MAX_TURN_MS = 60_000  # turn detection's durations: a minute of padding or silence is plenty
PAUSE_THRESHOLD = 0.6  # semantic_vad: the STT's pause head above this ends the user's turn (as Unmute)
SEMANTIC_TIMEOUT_MS = 4000  # semantic_vad: silence that ends a turn the pause head has not (OpenAI's "auto" cap)
MAX_ITEMS = 1024  # conversation items kept for retrieve; the oldest go first (a client cannot fill memory)
AUDIO_DELTA = "response.output_audio.delta"
# session.update fields that cannot apply to Moshi: accepted, reported as ignored.
_IGNORED_SESSION = ("instructions", "tools", "tool_choice", "max_output_tokens", "max_response_output_tokens",
                    "tracing", "prompt", "include", "truncation", "reasoning", "output_modalities", "modalities")


def realtime_auth(headers: Mapping[str, str]) -> tuple[dict, str | None]:
    """(headers with the key as `Authorization: Bearer` when a browser passed it as the
    `openai-insecure-api-key.KEY` subprotocol, the subprotocol to answer: 'realtime' or None)."""
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    out = {k.lower(): v for k, v in headers.items()}
    key = next((p[len(KEY_SUBPROTOCOL):] for p in offered if p.startswith(KEY_SUBPROTOCOL)), None)
    if key and not out.get("authorization"):
        out["authorization"] = f"Bearer {key}"
    answer = SUBPROTOCOL if SUBPROTOCOL in offered or key is not None else None
    return out, answer


TEXT_PARTS = ("input_text", "output_text", "text")  # content parts whose text an assistant item says


def _item_text(item: dict) -> str | None:
    """The text of a message item's text parts, joined by spaces; None when it has none."""
    content = item.get("content")
    if not isinstance(content, list):
        return None
    texts = [p["text"] for p in content if isinstance(p, dict) and p.get("type") in TEXT_PARTS
             and isinstance(p.get("text"), str) and p["text"].strip()]
    return " ".join(texts) if texts else None


class _Response:
    def __init__(self, metadata, input_frames: int, inject: int | None = None):
        self.id, self.item_id = E.new_id("resp"), E.new_id("item")
        self.inject = inject  # the tag of the injected text it says (None: the model's own words)
        self.metadata = metadata
        self.transcript: list[str] = []
        self.audio_ms = 0.0
        self.frames = 0
        self.words = 0
        self.input_frames_at_start = input_frames


class RealtimeProtocol:
    """The Realtime API's side of one session (see the module doc)."""

    fills_silence = True  # a Realtime client may send no audio (text turns, push-to-talk) and still hears Moshi

    def __init__(self, query: Mapping[str, str] | None = None, stt=None):
        """`stt`: the host's STT server (`server.MoshiServer` of a Kyutai STT model), None without one."""
        self.session: Session | None = None
        self.session_id = E.new_id("sess")
        self.model = (query or {}).get("model") or MODEL_NAME
        self.input_format = self.output_format = AudioFormat()
        self.decode, self.encode = InputDecoder(self.input_format), OutputEncoder(self.output_format)
        self.turn_detection = TurnDetection()
        self.vad: SpeechDetector | None = None  # made on the first audio (loads its model)
        self.voice, self.instructions = VOICE, ""
        self.turns = ModelTurns()
        self.response: _Response | None = None
        self.pending_create: dict | None = None  # a response.create waiting for the model to speak
        self.injects: dict[int, dict | None] = {}  # injected texts not yet heard: tag -> their response.create
        self.inject_tags = 0
        self.items: dict[str, dict] = {}
        self.last_item_id: str | None = None
        self.user_item_id: str | None = None  # the user's speech item being heard (VAD)
        self.vad_origin_ms = 0  # input audio before the detector was made (its times start there)
        self.speech_heard_ms = 0  # input audio when the current speech was detected
        self.turn_ended = False  # the STT's pause head ended the turn: the detector listens afresh
        self.buffered_ms = 0.0  # appended audio since the last commit or clear
        self.frames_pushed = 0
        self.stt = stt
        self.transcription: dict | None = None  # the session's setting (None: off)
        self.transcriber: Transcriber | None = None
        self.samples_in = 0  # input samples appended (24 kHz), the transcripts' clock

    def attach(self, session: "Session") -> None:
        self.session = session

    def session_ended(self) -> None:
        """The session has ended: its transcription stream leaves its seat."""
        if self.transcriber is not None:
            self.transcriber.close()

    # ------------------------------------------------------------------ the session's protocol

    @staticmethod
    def refusal(message: str) -> str:
        return json.dumps(E.error(message, "session_refused", kind="server_error"))

    def greeting(self) -> str:
        return json.dumps(E.server_event("session.created", session=self.describe()))

    def place_in_line(self, position: int, length: int) -> None:
        return None  # the Realtime API has no such event: a waiting client hears nothing until session.created

    async def while_waiting(self, data) -> None:
        pass  # audio sent before the session starts would be stale: dropped

    def describe(self) -> dict:
        fmt_in, fmt_out = self.input_format.to_dict(), self.output_format.to_dict()
        return {"type": "realtime", "object": "realtime.session", "id": self.session_id, "model": self.model,
                "output_modalities": ["audio"], "instructions": self.instructions,
                "audio": {"input": {"format": fmt_in, "transcription": self.transcription, "noise_reduction": None,
                                    "turn_detection": self.turn_detection.to_dict()},
                          "output": {"format": fmt_out, "voice": self.voice, "speed": 1.0}},
                "tools": [], "tool_choice": "auto", "max_output_tokens": "inf", "tracing": None, "prompt": None,
                "include": None, "expires_at": 0}

    # ------------------------------------------------------------------ output

    def emit(self, event: dict) -> None:
        self.session.emit(event, droppable=event["type"] == AUDIO_DELTA)

    def wire(self, queued: dict) -> str:
        """An outbox event as its JSON text (the session's sender sends it)."""
        if queued["type"] == AUDIO_DELTA:
            self.session.frames_out += 1
        return json.dumps(queued)

    def frame(self, frame) -> None:
        """One frame of the model (a `loop.Frame`, on the event loop): responses start and end here.
        The first frame of an injected text starts its own response (ending the one in progress)."""
        if frame.inject in self.injects:
            create = self.injects.pop(frame.inject)
            if self.response is not None:
                self._finish("completed")
            self.turns.begin()
            self._start_response(create, frame.inject)
        transition, frames = self.turns.step(frame.pcm, frame.text)
        if transition == STARTED:
            self._start_response()
        if self.response is not None:  # None for the rest of a stretch whose response was cancelled
            for frame_pcm, frame_text in frames:
                self._frame(frame_pcm, frame_text)
            if transition == ENDED:
                self._finish("completed")

    def _start_response(self, create: dict | None = None, inject: int | None = None) -> None:
        if create is None:  # the request waiting for the model's next words, if any
            create, self.pending_create = self.pending_create, None
        metadata = (create or {}).get("metadata")
        r = self.response = _Response(metadata, self.frames_pushed, inject)
        item = E.assistant_item(r.item_id, "in_progress", None)
        item["content"] = []
        self.emit(E.server_event("response.created", response=self._response_object(r, "in_progress", [])))
        self.emit(E.server_event("response.output_item.added", response_id=r.id, output_index=0, item=item))
        self.emit(E.server_event("conversation.item.added", previous_item_id=self.last_item_id, item=item))
        self.last_item_id = r.item_id
        self.emit(E.server_event("response.content_part.added", response_id=r.id, item_id=r.item_id,
                                 output_index=0, content_index=0, part={"type": "audio", "transcript": ""}))

    def _frame(self, pcm: np.ndarray, text: str | None) -> None:
        r = self.response
        ids = dict(response_id=r.id, item_id=r.item_id, output_index=0, content_index=0)
        if text:
            if not r.transcript:
                text = text.lstrip()
            r.transcript.append(text)
            r.words += 1
            # The inner monologue leads the voice: its time is where the frame falls in the response's audio.
            self.emit(E.server_event("response.output_audio_transcript.delta", **ids, delta=text,
                                     start_time=round(r.audio_ms / 1000.0, 3)))
        data = self.encode(pcm)
        r.audio_ms += self.encode.ms(len(data))
        r.frames += 1
        self.emit(E.server_event(AUDIO_DELTA, **ids, delta=E.b64(data)))

    def _finish(self, status: str) -> None:
        r, self.response = self.response, None
        transcript = "".join(r.transcript)
        ids = dict(response_id=r.id, item_id=r.item_id, output_index=0, content_index=0)
        item = E.assistant_item(r.item_id, "completed" if status == "completed" else "incomplete", transcript)
        self._keep(r.item_id, item)
        self.emit(E.server_event("response.output_audio.done", **ids))
        self.emit(E.server_event("response.output_audio_transcript.done", **ids, transcript=transcript))
        self.emit(E.server_event("response.content_part.done", **ids, part={"type": "audio", "transcript": transcript}))
        self.emit(E.server_event("response.output_item.done", response_id=r.id, output_index=0, item=item))
        self.emit(E.server_event("conversation.item.done", item=item))
        self.emit(E.server_event("response.done", response=self._response_object(r, status, [item])))

    def _response_object(self, r: _Response, status: str, output: list) -> dict:
        details = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": "client_cancelled"}
        usage = None
        if status != "in_progress":
            usage = E.usage(r.words, r.frames, self.frames_pushed - r.input_frames_at_start)
        return {"object": "realtime.response", "id": r.id, "status": status, "status_details": details,
                "output": output, "conversation_id": "conv_" + self.session_id[5:], "output_modalities": ["audio"],
                "max_output_tokens": "inf", "audio": {"output": {"format": self.output_format.to_dict(),
                                                                 "voice": self.voice}},
                "usage": usage, "metadata": r.metadata}

    # ------------------------------------------------------------------ input

    async def report(self, message: str, kind: str, code: str = "invalid_value", param: str | None = None,
                     client_event_id: str | None = None) -> None:
        """An `error` event (the session goes on); the server also reports (kind "idle") right
        before closing an idle session."""
        self.emit(E.error(message, "idle_timeout" if kind == "idle" else code, param, client_event_id))
        if kind == "idle" or self.session.errors >= self.session.server.config.max_errors:
            await asyncio.sleep(0.05)  # the sender says why before the close

    async def handle(self, data: bytes | str) -> None:
        client_event_id = None
        try:
            ev = E.parse_client_event(data)
            client_event_id = ev.get("event_id")
            await getattr(self, "_on_" + ev["type"].replace(".", "_"))(ev)
        except E.EventError as e:
            await self.session.error(e.message, "realtime", code=e.code, param=e.param,
                                     client_event_id=client_event_id)

    async def _on_session_update(self, ev: dict) -> None:
        s = ev.get("session")
        if not isinstance(s, dict):
            raise E.EventError("session.update needs a 'session' object", "missing_required_parameter", "session")
        ignored = [k for k in _IGNORED_SESSION if k in s]
        audio = s.get("audio") if isinstance(s.get("audio"), dict) else {}
        a_in = audio.get("input") if isinstance(audio.get("input"), dict) else {}
        a_out = audio.get("output") if isinstance(audio.get("output"), dict) else {}
        # GA places first, then the beta API's flat names.
        fmt_in = a_in.get("format", s.get("input_audio_format"))
        fmt_out = a_out.get("format", s.get("output_audio_format"))
        turn = a_in["turn_detection"] if "turn_detection" in a_in else s.get("turn_detection", ...)
        voice = a_out.get("voice", s.get("voice"))
        transcription = (parse_setting(a_in["transcription"], "session.audio.input.transcription")
                         if "transcription" in a_in else
                         parse_setting(s["input_audio_transcription"], "session.input_audio_transcription")
                         if "input_audio_transcription" in s else ...)
        try:
            new_in = parse_format(fmt_in) if fmt_in is not None else self.input_format
            new_out = parse_format(fmt_out) if fmt_out is not None else self.output_format
        except ValueError as e:
            raise E.EventError(str(e), "invalid_value", "session.audio.format") from None
        new_turn = self.turn_detection if turn is ... else self._turn_detection(turn)
        sampling = self._sampling(s)
        persona = await self._persona(s.get("instructions"), voice)
        # Everything checked: apply.
        if new_in != self.input_format:
            self.input_format, self.decode = new_in, InputDecoder(new_in)
        if new_out != self.output_format and self.response is None:
            self.output_format, self.encode = new_out, OutputEncoder(new_out)
        elif new_out != self.output_format:
            raise E.EventError("the output format cannot change during a response", "invalid_value",
                               "session.audio.output.format")
        if new_turn != self.turn_detection:
            self.turn_detection, self.vad = new_turn, None
        if persona is not None:  # a PersonaPlex model: instructions and voice are its prompts
            ignored = [k for k in ignored if k != "instructions"]
            self._start_persona(*persona)
            if voice is not None:
                self.voice = voice
        elif voice is not None and voice != VOICE:
            ignored.append("voice")
        if transcription is not ... and self.stt is None:
            if transcription is not None:
                ignored.append("transcription")  # no STT model beside Moshi: no transcripts
        elif transcription is not ...:
            self._transcribe(transcription)
        if "noise_reduction" in a_in or "input_audio_noise_reduction" in s:
            ignored.append("noise_reduction")
        if isinstance(s.get("instructions"), str):
            self.instructions = s["instructions"]
        if sampling is not None:
            self.session.configure(sampling)
        self.emit(E.server_event("session.updated", session=self.describe(), ignored=ignored))

    def _transcribe(self, setting: dict | None) -> None:
        """Transcription on (a stream on the STT server, unless one runs) or off."""
        self.transcription = setting
        running = self.transcriber is not None and not self.transcriber.stopped
        if setting is None and running:
            self.transcriber.close()
        if setting is not None and not running:
            self.transcriber = Transcriber(self.stt, self, self.samples_in)
            self.transcriber.start()

    async def _persona(self, instructions, voice) -> tuple | None:
        """On a PersonaPlex model, (prompt, cache key) of session.update's `instructions` (the text
        prompt) and `voice` (a voice of --voice-prompt-dir), None when they leave the persona as
        it is or the model takes no prompts; EventError for a prompt it cannot use."""
        if not self.session.server.takes_personas:
            return None
        text = instructions if isinstance(instructions, str) and instructions.strip() else None
        voice = voice if isinstance(voice, str) and voice != VOICE else None
        if text == (self.instructions or None) and voice == (self.voice if self.voice != VOICE else None):
            return None
        if text is None and voice is None:
            return None
        query = {k: v for k, v in (("text_prompt", text), ("voice_prompt", voice)) if v is not None}
        try:
            return await self.session.server.personas.prompt(query)
        except ValueError as e:
            raise E.EventError(f"cannot use this persona: {e}", "invalid_value",
                               "session.voice" if voice and "voice" in str(e) else "session.instructions") from None

    def _start_persona(self, prompt, key) -> None:
        """Moshi's side restarts as the persona: the slot runs the prompt phase (no audio in or
        out meanwhile, any response ends), then the conversation goes on with the new persona."""
        if self.response is not None:
            self._finish("incomplete")
        self.turns = ModelTurns()
        self.injects.clear()  # the restart drops the texts queued for the model
        self.session.restart(prompt, key)
        event("realtime_persona", peer=self.session.peer, frames=prompt.frames)

    def _turn_detection(self, turn) -> TurnDetection:
        if turn is None or turn is False:
            return TurnDetection(None)
        if not isinstance(turn, dict) or turn.get("type", "server_vad") not in ("server_vad", "semantic_vad"):
            raise E.EventError("turn_detection must be null or of type server_vad or semantic_vad", "invalid_value",
                               "session.audio.input.turn_detection")
        base = TurnDetection(turn.get("type", "server_vad"))
        param = "session.audio.input.turn_detection."
        threshold = E.number(turn.get("threshold", base.threshold), param + "threshold", 0.0, 1.0)
        padding = E.number(turn.get("prefix_padding_ms", base.prefix_padding_ms), param + "prefix_padding_ms",
                           0, MAX_TURN_MS, integer=True)
        silence = E.number(turn.get("silence_duration_ms", base.silence_duration_ms), param + "silence_duration_ms",
                           0, MAX_TURN_MS, integer=True)
        return replace(base, threshold=threshold, prefix_padding_ms=padding, silence_duration_ms=silence)

    def _sampling(self, s: dict):
        """`temperature` (the beta session field) sets the audio temperature and scales the text
        one by the same factor; None when the update has none."""
        t = s.get("temperature")
        if t is None:
            return None
        t = E.number(t, "session.temperature", 0.0, 2.0)
        base = self.session.server.sampling
        scale = t / base.temp if base.temp > 0 else 1.0
        return replace(self.session.join.sampling, temp=float(t), temp_text=base.temp_text * scale)

    async def _on_input_audio_buffer_append(self, ev: dict) -> None:
        pcm = self.decode(E.audio_payload(ev))
        if not pcm.size:
            return
        self.buffered_ms += 1000.0 * pcm.size / 24000
        self.frames_pushed += self.session.push_pcm(pcm)
        self.samples_in += pcm.size
        if self.transcriber is not None:
            self.transcriber.push(pcm)
        if self.turn_detection.type is None:
            return
        if self.vad is None:
            self.vad = await asyncio.to_thread(SpeechDetector, self.turn_detection)
            self.vad_origin_ms = round(1000 * (self.samples_in - pcm.size) / 24000)
        if self.turn_ended:
            self.vad.end_speech()
            self.turn_ended = False
        semantic = (self.turn_detection.type == "semantic_vad" and self.transcriber is not None
                    and not self.transcriber.stopped)  # else the pause head never comes: silence ends turns
        self.vad.config = replace(self.turn_detection, silence_duration_ms=max(
            self.turn_detection.silence_duration_ms, SEMANTIC_TIMEOUT_MS)) if semantic else self.turn_detection
        for kind, ms in await asyncio.to_thread(self.vad.feed, pcm):
            ms += self.vad_origin_ms
            if kind == "speech_started":
                self.speech_heard_ms = round(1000 * self.samples_in / 24000)
                self.user_item_id = E.new_id("item")
                self.emit(E.server_event("input_audio_buffer.speech_started", audio_start_ms=ms,
                                         item_id=self.user_item_id))
            elif self.user_item_id is not None:
                item_id, self.user_item_id = self.user_item_id, None
                self.emit(E.server_event("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=item_id))
                self._commit(item_id)

    def heard_pause(self, probability: float, ms: int) -> None:
        """One STT step's pause probability (`prs[2]`, as Unmute reads it) for the input audio at
        `ms`: with semantic_vad, above PAUSE_THRESHOLD in the user's speech, their turn ends there."""
        if (self.turn_detection.type != "semantic_vad" or self.user_item_id is None
                or probability <= PAUSE_THRESHOLD or ms <= self.speech_heard_ms):
            return
        item_id, self.user_item_id = self.user_item_id, None
        self.turn_ended = True
        self.emit(E.server_event("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=item_id))
        self._commit(item_id)

    def _commit(self, item_id: str) -> None:
        item = E.user_item(item_id)
        self._keep(item_id, item)
        previous, self.last_item_id = self.last_item_id, item_id
        self.buffered_ms = 0.0
        self.emit(E.server_event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id))
        self.emit(E.server_event("conversation.item.added", previous_item_id=previous, item=item))
        self.emit(E.server_event("conversation.item.done", previous_item_id=previous, item=item))
        if self.transcriber is not None:
            self.transcriber.commit(item_id)

    async def _on_input_audio_buffer_commit(self, ev: dict) -> None:
        if self.buffered_ms < MIN_COMMIT_MS:
            raise E.EventError(f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, but the buffer "
                               f"only has {self.buffered_ms:.2f} ms", "input_audio_buffer_commit_empty")
        item_id = self.user_item_id or E.new_id("item")
        self.user_item_id = None
        self._commit(item_id)

    async def _on_input_audio_buffer_clear(self, ev: dict) -> None:
        # The model has heard it already (it listens all the time): only the buffer's count restarts.
        self.buffered_ms = 0.0
        if self.transcriber is not None:
            self.transcriber.clear()
        self.emit(E.server_event("input_audio_buffer.cleared"))

    async def _on_conversation_item_create(self, ev: dict) -> None:
        item = ev.get("item")
        if not isinstance(item, dict) or item.get("type") not in ("message", "function_call", "function_call_output"):
            raise E.EventError("conversation.item.create needs an 'item' of type message, function_call or "
                               "function_call_output", "invalid_value", "item")
        item_id = item.get("id") or E.new_id("item")
        if not isinstance(item_id, str):
            raise E.EventError("'item.id' must be a string", "invalid_type", "item.id")
        if item_id in self.items:
            raise E.EventError(f"Item with item_id '{item_id}' already exists", "item_create_duplicate_item_id",
                               "item.id")
        # Moshi hears audio only; an assistant's text it says in its own voice (`_inject`); any other
        # item is kept in the conversation's list, its content unread.
        text = _item_text(item) if item.get("type") == "message" and item.get("role") == "assistant" else None
        if text is not None:
            self._inject(text, None, "item.content")
        item = {**item, "id": item_id, "object": "realtime.item", "status": "completed"}
        self._keep(item_id, item)
        previous = ev.get("previous_item_id", self.last_item_id)
        self.last_item_id = item_id
        self.emit(E.server_event("conversation.item.added", previous_item_id=previous, item=item))
        self.emit(E.server_event("conversation.item.done", previous_item_id=previous, item=item))

    def _keep(self, item_id: str, item: dict) -> None:
        self.items[item_id] = item
        while len(self.items) > MAX_ITEMS:
            del self.items[next(iter(self.items))]

    def _item_id(self, ev: dict) -> str:
        item_id = ev.get("item_id")
        if not isinstance(item_id, str):
            raise E.EventError(f"{ev['type']} needs 'item_id'", "missing_required_parameter", "item_id")
        return item_id

    async def _on_conversation_item_truncate(self, ev: dict) -> None:
        item_id = self._item_id(ev)
        end = ev.get("audio_end_ms")
        if isinstance(end, bool) or not isinstance(end, int) or end < 0:
            raise E.EventError("'audio_end_ms' must be an integer >= 0", "invalid_value", "audio_end_ms")
        self.emit(E.server_event("conversation.item.truncated", item_id=item_id,
                                 content_index=ev.get("content_index", 0), audio_end_ms=end))

    async def _on_conversation_item_delete(self, ev: dict) -> None:
        item_id = self._item_id(ev)
        self.items.pop(item_id, None)
        self.emit(E.server_event("conversation.item.deleted", item_id=item_id))

    async def _on_conversation_item_retrieve(self, ev: dict) -> None:
        item_id = self._item_id(ev)
        if item_id not in self.items:
            raise E.EventError(f"Item with item_id '{item_id}' not found", "item_not_found", "item_id")
        self.emit(E.server_event("conversation.item.retrieved", item=self.items[item_id]))

    async def _on_response_create(self, ev: dict) -> None:
        response = ev.get("response") or {}
        if not isinstance(response, dict):
            raise E.EventError("'response' must be an object", "invalid_type", "response")
        metadata = response.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise E.EventError("'response.metadata' must be an object", "invalid_type", "response.metadata")
        # Text to say (instructions, or the text of input items): the response says it, starting now.
        text, param = response.get("instructions"), "response.instructions"
        if not (isinstance(text, str) and text.strip()) and isinstance(response.get("input"), list):
            texts = [t for it in response["input"] if isinstance(it, dict) and (t := _item_text(it))]
            text, param = " ".join(texts), "response.input"
        if isinstance(text, str) and text.strip():
            self._inject(text, response, param)
            return
        # Moshi decides when it speaks: the next stretch of its speech (after the current one, if it
        # is speaking) answers this request. A later request replaces an unanswered one.
        self.pending_create = response

    def _inject(self, text: str, create: dict | None, param: str) -> None:
        """Moshi says `text` in its own voice (`session.inject`), after any text queued before; its
        first frame starts a response that answers `create` (or the pending response.create)."""
        self.inject_tags += 1
        try:
            self.session.inject(text, self.inject_tags)
        except InjectError as e:
            raise E.EventError(f"cannot say this text: {e}", "invalid_value", param) from None
        self.injects[self.inject_tags] = create
        event("realtime_inject", peer=self.session.peer, chars=len(text))

    async def _on_response_cancel(self, ev: dict) -> None:
        r = self.response
        if r is None and self.injects and ev.get("response_id") is None:
            # Texts asked for but not yet heard: none will be said.
            for tag in self.injects:
                self.session.cancel_inject(tag)
            self.injects.clear()
            return
        if r is None or ev.get("response_id") not in (None, r.id):
            raise E.EventError("Cancellation failed: no active response found", "response_cancel_not_active")
        # Its audio not yet sent is dropped. The rest of the model's current stretch of speech is not
        # sent either: a response starts only where a stretch starts (`turns`).
        self.session.discard(lambda q: not (q["type"] == AUDIO_DELTA and q.get("response_id") == r.id))
        if r.inject is not None:  # the rest of its text is not said
            self.session.cancel_inject(r.inject)
        self._finish("cancelled")
