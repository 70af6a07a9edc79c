"""Training objectives. Adding one = a module here and a line in :data:`METHODS`."""

from __future__ import annotations

from latentlm.config import Config
from latentlm.methods.base import Method
from latentlm.methods.cocomix import Cocomix, PauseInsert
from latentlm.methods.kd import KD, KDPause
from latentlm.methods.loop import Loop
from latentlm.methods.ntp import NTP
from latentlm.methods.pause import Pause
from latentlm.methods.ponder import Ponder
from latentlm.methods.ponderlm import PonderLM
from latentlm.model.transformer import Transformer

METHODS: dict[str, type[Method]] = {
    "ntp": NTP,
    "ponder": Ponder,
    "pause": Pause,
    "loop": Loop,
    "ponderlm": PonderLM,
    "kd": KD,
    "cocomix": Cocomix,
    "pause_insert": PauseInsert,
    "kd_pause": KDPause,
}


def build_method(cfg: Config) -> Method:
    """The configured method around a freshly initialised core model."""
    return METHODS[cfg.train.method](Transformer(cfg.model), cfg)
