"""Who signs policies on this appliance: the signing key's public half beside it, and the signers
the configuration trusts besides (model loads and the data volume check both against them)."""

from __future__ import annotations

from pathlib import Path

from appliance.config import ApplianceSettings


def public_key_file(settings: ApplianceSettings) -> Path:
    return settings.signing_key_file.with_suffix(".pub")


def trusted_signers(settings: ApplianceSettings) -> list[str]:
    signers = [s.lower() for s in settings.store.trusted_signers]
    pub = public_key_file(settings)
    if pub.exists():
        signers.append(pub.read_text().strip().lower())
    return signers
