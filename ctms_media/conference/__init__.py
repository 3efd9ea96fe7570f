"""The conference engine (sans-IO): who hears and sees whom, security policy and group keys.

``model`` holds the validated configuration values and group parameter sets, ``audio`` the
speaker tracking, ``video`` the CSRC mapping and display assignment, ``policy`` the
:class:`Conference` state machine the server drives, ``actions`` what it asks the server to do.
"""

from ctms_media.conference.actions import (
    Action,
    GroupsChanged,
    RemoveEndpoint,
    SendDowngrade,
    SendFir,
    SendGsp,
    SendPli,
)
from ctms_media.conference.model import (
    ConferenceConfig,
    EktGroupSpec,
    EndpointConfig,
    SecurityMismatch,
    StreamConfig,
    new_group,
)
from ctms_media.conference.policy import Conference

__all__ = [
    "Action",
    "Conference",
    "ConferenceConfig",
    "EktGroupSpec",
    "EndpointConfig",
    "GroupsChanged",
    "RemoveEndpoint",
    "SecurityMismatch",
    "SendDowngrade",
    "SendFir",
    "SendGsp",
    "SendPli",
    "StreamConfig",
    "new_group",
]
