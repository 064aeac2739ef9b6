"""`/api/chat`'s wire protocol (the official binary one, see `protocol`) for one session:

    websocket ──parse──> audio: Ogg/Opus ──OpusDecoder──> PCM ──> session.push_pcm (whole frames)
                         control restart: the model's side starts afresh; ping: ping back
                         inject (kind 7, openmoshi's own): the model says the text (session.inject)
    model frame ──> outbox: ("audio", pcm) droppable, ("text", piece) ──wire──> Opus pages, text messages

Bad messages get an error message (kind 5) and the conversation goes on (the session counts them),
an inject message the model cannot say (empty, too long, no word its tokenizer knows) too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from openmoshi.lm.inject import InjectError
from openmoshi.serving import protocol
from openmoshi.serving.opus import OpusDecoder, OpusEncoder, OpusError
from openmoshi.serving.session import event

if TYPE_CHECKING:
    from openmoshi.serving.loop import Frame
    from openmoshi.serving.session import Session


class ChatProtocol:
    def __init__(self):
        self.decoder = OpusDecoder()
        self.encoder = OpusEncoder()
        self.session: Session | None = None
        self.injects = 0  # inject messages taken (each one's tag)

    def attach(self, session: "Session") -> None:
        self.session = session

    refusal = staticmethod(protocol.encode_error)

    def greeting(self) -> bytes:
        return protocol.encode_handshake()

    def place_in_line(self, position: int, length: int) -> bytes:
        return protocol.encode_queue_position(position, length)

    async def while_waiting(self, data: bytes | str) -> None:
        """A message while waiting for a slot. Pings are answered; audio goes through the decoder,
        to keep its Ogg stream in step, and is dropped: it would be stale by the start."""
        if isinstance(data, str):
            return
        try:
            m = protocol.parse(data)
            if m.kind == protocol.KIND_AUDIO:
                self.decoder.decode(m.data)
            elif m.kind == protocol.KIND_PING:
                await self.session.send(protocol.encode_ping())
        except (protocol.ProtocolError, OpusError):
            pass  # the conversation has not started: nothing to report yet

    async def report(self, message: str, kind: str, **details) -> None:
        await self.session.send(protocol.encode_error(message))

    async def handle(self, data: bytes | str) -> None:
        s = self.session
        if isinstance(data, str):
            await s.error("text websocket frames are not part of the protocol: send binary messages", "protocol")
            return
        try:
            msg = protocol.parse(data)
        except protocol.ProtocolError as e:
            await s.error(str(e), "protocol")
            return
        if msg.kind == protocol.KIND_AUDIO:
            try:
                pcm = self.decoder.decode(msg.data)
            except OpusError as e:
                await s.error(str(e), "opus")
                return
            s.push_pcm(pcm)
        elif msg.kind == protocol.KIND_CONTROL:
            if msg.data == protocol.CONTROL_RESTART:
                s.restart()
            event("control", peer=s.peer, code=protocol.CONTROL_NAMES[msg.data])
        elif msg.kind == protocol.KIND_PING:
            await s.send(protocol.encode_ping())  # answered at once: the UI measures the round trip
        elif msg.kind == protocol.KIND_INJECT:
            try:
                s.inject(msg.data, self.injects + 1)
            except InjectError as e:
                await s.error(f"cannot say this text: {e}", "inject")
                return
            self.injects += 1
            event("inject", peer=s.peer, chars=len(msg.data))
        elif msg.kind in (protocol.KIND_TEXT, protocol.KIND_ERROR):
            await s.error(f"{msg.name} messages go from server to client only", "protocol")
        # Handshake and metadata from the client need no answer.

    def frame(self, frame: Frame) -> None:
        self.session.emit(("audio", frame.pcm), droppable=True)
        if frame.text:
            self.session.emit(("text", frame.text))

    def wire(self, item) -> bytes | None:
        kind, value = item
        if kind == "audio":
            self.session.frames_out += 1
            ogg = self.encoder.encode(value)
            return protocol.encode_audio(ogg) if ogg else None
        return protocol.encode_text(value)
