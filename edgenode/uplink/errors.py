"""The uplink's errors: why the broker connection is not up, as status shows it."""

from __future__ import annotations

from ..errors import EdgeNodeError


class UplinkError(EdgeNodeError):
    """The MQTT uplink could not do what it was configured to."""


class BrokerUnavailable(UplinkError):
    """The broker could not be reached, did not answer in time, or the connection was lost."""


class BrokerRefused(UplinkError):
    """The broker refused the connection (bad credentials, not authorised, bad client ID)."""


class BrokerUntrusted(UplinkError):
    """The broker's TLS certificate is not trusted, or TLS failed."""


class SpoolError(UplinkError):
    """The spool directory or a segment in it could not be used."""
