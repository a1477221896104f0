"""Training: the LightningModule, callbacks and routing pictures."""
from .module import FinalCheckpoint, LIMoEModule
from .pictures import routing_picture

__all__ = ["FinalCheckpoint", "LIMoEModule", "routing_picture"]
