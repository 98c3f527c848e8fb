"""Textual messages the workers post (``post_message`` is thread-safe); each wraps one engine event."""

from __future__ import annotations

from textual.message import Message

from tui import events as E


class EngineMessage(Message):
    """Base: ``event`` is the engine dataclass."""

    def __init__(self, event) -> None:
        super().__init__()
        self.event = event


class ModelLoaded(EngineMessage):
    pass


class EngineStatus(EngineMessage):
    pass


class TokenGenerated(EngineMessage):
    pass


class LayerParity(EngineMessage):
    pass


class ShadowMoved(EngineMessage):
    pass


class GenerationDone(EngineMessage):
    pass


class EngineFailed(EngineMessage):
    pass


class GateResult(EngineMessage):
    pass


class L1Measured(EngineMessage):
    pass


class BisectDone(EngineMessage):
    pass


MESSAGE_FOR = {E.Loaded: ModelLoaded, E.Status: EngineStatus, E.Token: TokenGenerated, E.Parity: LayerParity,
               E.ShadowProgress: ShadowMoved,
               E.Done: GenerationDone, E.Failed: EngineFailed, E.GateRow: GateResult, E.L1Reading: L1Measured,
               E.Bisected: BisectDone}


def wrap(event) -> EngineMessage:
    """The message for an engine event."""
    return MESSAGE_FOR[type(event)](event)
