"""What a knowledge-base request answers when the store fails: the client's fault is a 4xx, the
server's storage a 5xx that names no path."""

from __future__ import annotations

import errno

from appliance.rag.errors import AccessDenied, KnowledgeBaseNotFound
from appliance.security.gocryptfs import VolumeError

from appliance.errors import ApplianceError
from appliance.gateway.knowledge import _request_error


def test_the_server_s_storage_is_not_the_request_s_fault():
    failed = _request_error(VolumeError("gocryptfs could not mount /srv/state/kb-mounts/kb-1"))
    assert failed.status == 503
    assert "/srv/state" not in failed.message


def test_a_full_disk_under_a_store_error_is_a_507():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise ApplianceError("could not save the document") from exc
    except ApplianceError as exc:
        assert _request_error(exc).status == 507


def test_the_request_s_own_faults_stay_4xx():
    assert _request_error(KnowledgeBaseNotFound("bob", "x")).status == 404
    assert _request_error(AccessDenied("bob", "alice-notes")).status == 403
    assert _request_error(ApplianceError("a name with a slash")).status == 400
