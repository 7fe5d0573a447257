"""The group mapping policy, without any directory or provider."""

import pytest
from appliance.security.group_mapping import GroupMapping, NotAllowed

from appliance.config.identity import GroupMappingSettings, IdentitySettings


def test_admin_groups_make_administrators_and_others_users():
    mapping = GroupMapping(GroupMappingSettings(admin_groups=["ops"]))
    assert mapping.map("ann", ["ops", "eng"]).role == "admin"
    assert mapping.map("bob", ["eng"]).role == "user"
    assert mapping.map("cid", []).role == "user"


def test_mapped_groups_grant_appliance_groups_and_unmapped_ones_are_kept_or_dropped():
    settings = GroupMappingSettings(groups={"cn=engineering": ["eng", "all"]})
    assert GroupMapping(settings).map("ann", ["cn=engineering", "sales"]).groups == (
        "all",
        "eng",
        "sales",
    )
    strict = settings.model_copy(update={"keep_unmapped": False})
    assert GroupMapping(strict).map("ann", ["cn=engineering", "sales"]).groups == ("all", "eng")


def test_allowed_groups_refuse_everyone_else():
    mapping = GroupMapping(GroupMappingSettings(allowed_groups=["appliance-users"]))
    assert mapping.map("ann", ["appliance-users"]).username == "ann"
    with pytest.raises(NotAllowed, match="bob"):
        mapping.map("bob", ["eng"])


def test_an_enabled_source_must_be_configured():
    with pytest.raises(ValueError, match=r"identity\.ldap\.url"):
        IdentitySettings(sources=["local", "ldap"])
    with pytest.raises(ValueError, match=r"identity\.oidc\.issuer"):
        IdentitySettings(sources=["oidc"])
    with pytest.raises(ValueError, match="twice"):
        IdentitySettings(sources=["local", "local"])
    assert IdentitySettings().sources == ["local"]
