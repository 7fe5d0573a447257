"""Who may read and change a knowledge base, and what refused users are told."""

from __future__ import annotations

import pytest
from appliance.rag.access import KnowledgeBaseACL, Principal, require_read, require_write
from appliance.rag.errors import AccessDenied, KnowledgeBaseNotFound
from pydantic import ValidationError

from appliance.config.rag import RagSettings

ACL = KnowledgeBaseACL("alice", readers=frozenset({"bob"}), groups=frozenset({"eng"}))


@pytest.mark.parametrize(
    ("principal", "read", "write"),
    [
        (Principal("alice"), True, True),
        (Principal("bob"), True, False),
        (Principal("carol", groups=frozenset({"eng", "ops"})), True, False),
        (Principal("dave", groups=frozenset({"ops"})), False, False),
        (Principal("root", admin=True), True, True),
    ],
)
def test_owner_and_admins_write_readers_and_group_members_read(principal, read, write):
    assert (ACL.can_read(principal), ACL.can_write(principal)) == (read, write)


def test_refusals_hide_knowledge_bases_the_user_may_not_read():
    dave = Principal("dave")
    for check in (require_read, require_write):
        with pytest.raises(KnowledgeBaseNotFound, match=r"^knowledge base 'kb' not found$"):
            check(dave, "kb", ACL)
        with pytest.raises(KnowledgeBaseNotFound, match=r"^knowledge base 'kb' not found$"):
            check(dave, "kb", None)
    with pytest.raises(AccessDenied, match=r"^user 'bob' may read but not change .* 'kb'$"):
        require_write(Principal("bob"), "kb", ACL)
    require_read(Principal("bob"), "kb", ACL)
    require_write(Principal("alice"), "kb", ACL)


def test_settings_need_an_overlap_smaller_than_half_a_chunk():
    assert RagSettings(chunk_chars=300, chunk_overlap_chars=149).chunk_overlap_chars == 149
    with pytest.raises(ValidationError, match="chunk_overlap_chars must be less than half"):
        RagSettings(chunk_chars=300, chunk_overlap_chars=150)
    with pytest.raises(ValidationError, match="Extra inputs"):
        RagSettings(chunk_size=3)
