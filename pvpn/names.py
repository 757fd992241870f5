"""Every record's event name, ``category:name``, in one place.

The nodes, the adapters and the programs write these names into their records (see
:class:`pvpn.records.Record`), and ``pvpn trace`` reads the same constants back, so a name is
spelled once. The constants are plain strings, so a record's JSON is the same as before.
"""

from __future__ import annotations

from typing import Final


# node:
NODE_CLEANUP: Final = "node:cleanup"
NODE_ERROR: Final = "node:error"
NODE_RECOVER_FAILED: Final = "node:recover-failed"
NODE_RELOAD_FAILED: Final = "node:reload-failed"
NODE_RELOADED: Final = "node:reloaded"
NODE_STARTED: Final = "node:started"
NODE_STATE: Final = "node:state"
NODE_STATE_REFUSED: Final = "node:state-refused"
NODE_STATE_RESTORED: Final = "node:state-restored"
NODE_STOPPED: Final = "node:stopped"
NODE_STOPPING: Final = "node:stopping"
NODE_WARNING: Final = "node:warning"

# link:
LINK_CLOSED: Final = "link:closed"
LINK_DEAD: Final = "link:dead"
LINK_ERROR: Final = "link:error"
LINK_EVICTED: Final = "link:evicted"
LINK_OPENED: Final = "link:opened"
LINK_REFUSED: Final = "link:refused"

# auth:
AUTH_KEY_SKIPPED: Final = "auth:key-skipped"
AUTH_REFUSED: Final = "auth:refused"
AUTH_RENEWED: Final = "auth:renewed"
AUTH_REVOKED: Final = "auth:revoked"

# session:
SESSION_ATTACHED: Final = "session:attached"
SESSION_CLOSED: Final = "session:closed"
SESSION_CONNECTIONS_RESET: Final = "session:connections-reset"
SESSION_DETACHED: Final = "session:detached"
SESSION_HELD: Final = "session:held"
SESSION_NARROWED: Final = "session:narrowed"
SESSION_OPENED: Final = "session:opened"
SESSION_REATTACHED: Final = "session:reattached"
SESSION_RECOVERED: Final = "session:recovered"
SESSION_REGISTERED: Final = "session:registered"
SESSION_RESTORED: Final = "session:restored"
SESSION_RESUMED: Final = "session:resumed"

# splice:
SPLICE_CONNECTING: Final = "splice:connecting"

# packet:
PACKET_DROPPED: Final = "packet:dropped"

# capture:
CAPTURE_CLOSED: Final = "capture:closed"
CAPTURE_DELETED: Final = "capture:deleted"
CAPTURE_FAILED: Final = "capture:failed"
CAPTURE_OPENED: Final = "capture:opened"
CAPTURE_SKIPPED: Final = "capture:skipped"
CAPTURE_STOPPED: Final = "capture:stopped"

# slot:
SLOT_QUARANTINED: Final = "slot:quarantined"

# local:
LOCAL_ERROR: Final = "local:error"
LOCAL_REFUSED: Final = "local:refused"

#: Every name above.
ALL: Final = frozenset({
    NODE_CLEANUP, NODE_ERROR, NODE_RECOVER_FAILED, NODE_RELOAD_FAILED, NODE_RELOADED, NODE_STARTED,
    NODE_STATE, NODE_STATE_REFUSED, NODE_STATE_RESTORED, NODE_STOPPED, NODE_STOPPING, NODE_WARNING,
    LINK_CLOSED, LINK_DEAD, LINK_ERROR, LINK_EVICTED, LINK_OPENED, LINK_REFUSED, AUTH_KEY_SKIPPED,
    AUTH_REFUSED, AUTH_RENEWED, AUTH_REVOKED, SESSION_ATTACHED, SESSION_CLOSED,
    SESSION_CONNECTIONS_RESET, SESSION_DETACHED, SESSION_HELD, SESSION_NARROWED, SESSION_OPENED,
    SESSION_REATTACHED, SESSION_RECOVERED, SESSION_REGISTERED, SESSION_RESTORED, SESSION_RESUMED,
    SPLICE_CONNECTING, PACKET_DROPPED, CAPTURE_CLOSED, CAPTURE_DELETED, CAPTURE_FAILED,
    CAPTURE_OPENED, CAPTURE_SKIPPED, CAPTURE_STOPPED, SLOT_QUARANTINED, LOCAL_ERROR, LOCAL_REFUSED,
})
