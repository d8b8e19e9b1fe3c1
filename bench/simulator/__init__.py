"""The fleet simulator: thousands of simulated devices on a few asyncio worker processes.

Import :class:`SimulatedFleet` and :class:`DeviceIdentity` from here; ``python -m
bench.simulator`` provisions a fleet (import or bootstrap) and connects it, reporting the
connect rate and failures.
"""

from bench.simulator.device import AsyncDevice
from bench.simulator.fleet import FleetReport, SimulatedFleet
from bench.simulator.identity import DeviceIdentity, identities_from_credentials_csv

__all__ = ["AsyncDevice", "DeviceIdentity", "FleetReport", "SimulatedFleet",
           "identities_from_credentials_csv"]
