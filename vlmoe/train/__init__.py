"""Training: the LightningModule, callbacks and routing pictures."""
from .module import FinalCheckpoint, LIMoEModule
from ..eval.pictures import routing_picture
from .strategy import ExpertParallelMonitor, ExpertParallelStrategy

__all__ = ["ExpertParallelMonitor", "ExpertParallelStrategy", "FinalCheckpoint", "LIMoEModule", "routing_picture"]
