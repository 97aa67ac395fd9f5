"""The MQTT uplink: chosen topics bridged between the node and an MQTT broker.

Configured by ``NodeConfig.uplink`` (an :class:`UplinkConfig`, or the
``[uplink]`` section of the configuration file); docs/fleet.md says how
sites join a broker and what the uplink guarantees.

The parts, each in its own module:

* :mod:`.config` -- the settings and their checks (pure);
* :mod:`.topics` -- topic maps and MQTT topic matching (pure);
* :mod:`.queue` -- the bounded store-and-forward queue (pure);
* :mod:`.records` -- the disk spool's record format (pure);
* :mod:`.spool` -- the disk spool's segment files;
* :mod:`.client` -- one broker connection: paho-mqtt driven by the node's loop;
* :mod:`.node_view` -- the node's API as the uplink uses it (a typing Protocol);
* :mod:`.uplink` -- :class:`Uplink`, which the node starts and stops;
* :mod:`.bench` -- ``edgenode bench --only uplink`` (never imported by a node).

Importing this package loads none of them; :class:`Uplink` (and with it
the MQTT client library, the optional ``edgenode[mqtt]`` extra) loads
only when a node is configured with an uplink.
"""

from __future__ import annotations

from typing import Any

__all__ = ["InMap", "OutMap", "Uplink", "UplinkConfig"]


def __getattr__(name: str) -> Any:
    if name == "Uplink":
        from .uplink import Uplink

        return Uplink
    if name in ("UplinkConfig", "OutMap", "InMap"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
