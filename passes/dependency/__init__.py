"""Channel dependency analysis: the groups of coupled channels that must shrink together; analysis only.

:func:`find_channel_groups` (:mod:`.analysis`) runs the graph once for shapes and follows each channel
space through it, node by node, with the rule the table of :mod:`.rules` gives each node (one file per op
family, helpers in :mod:`.layout`); spaces meet in a union-find (:mod:`.spaces`) and end as
:class:`ChannelGroup` records of :class:`Member` slices (:mod:`.records`).
"""

from passes.dependency.analysis import find_channel_groups, run_recording
from passes.dependency.records import ChannelGroup, Member

__all__ = [
    "find_channel_groups",
    "run_recording",
    "ChannelGroup",
    "Member",
]
