"""N virtual devices on one machine, running the same library code as real devices."""

from edgefed.simulation.clients import ClientSet, load_clients
from edgefed.simulation.run import Progress, SimulationSettings, simulate, summarize

__all__ = ["ClientSet", "Progress", "SimulationSettings", "load_clients", "simulate", "summarize"]
