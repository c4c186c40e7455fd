"""Services a stage uses: DeepSpeed engine, checkpoints, telemetry, data streams, collectives.

``sdeseg.launch`` runs a stage with these; a stage imports only what is exported here.
"""

from sdeseg.runtime.checkpoint import Progress, TrainState
from sdeseg.runtime.context import StageContext, StageResult
from sdeseg.runtime.telemetry import StepMeter

__all__ = ["Progress", "StageContext", "StageResult", "StepMeter", "TrainState"]
