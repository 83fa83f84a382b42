"""mini-PAB: a procedural pedestrian-anomaly benchmark written in PAB's exact format.

Articulated people (joint-angle skeletons, 14 appearance factors), 10 normal and 10 anomalous
actions with their props, five scenes, and natural captions; see docs/minipab.md.
"""

from .pose import ACTIONS, ANOMALY_ACTIONS, NORMAL_ACTIONS
from .writer import SynthSummary, generate, identity_plan

__all__ = ["generate", "SynthSummary", "identity_plan", "ACTIONS", "NORMAL_ACTIONS", "ANOMALY_ACTIONS"]
