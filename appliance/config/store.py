"""Configuration of the model store: where encrypted models live, their keys, and who may load."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class StoreSettings(BaseModel):
    """The model store: encrypted, loading-optimised checkpoints on each node."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    root: Path | None = None
    """Directory of the store on every node (local disk or shared storage). Default:
    <state_dir>/store."""

    key_file: Path | None = None
    """Key-encryption key: 32 random bytes, mode 0600, the same file on every node that serves
    encrypted models (`appliance store init` makes one). Default: <state_dir>/keys/kek.key. When
    the file is absent, the passphrase in APPLIANCE_STORE_PASSPHRASE is used instead (Argon2id)."""

    signing_key_file: Path | None = None
    """Ed25519 key that signs load policies (mode 0600; keep it on the admin host only).
    Default: <state_dir>/keys/policy-signing.key."""

    trusted_signers: list[str] = Field(default_factory=list)
    """Public keys (hex) whose signed policies loaders accept, besides the signing key's own
    public key when that key file is present."""

    encrypt: bool = True
    """Encrypt models on import. Turn off only for public models you do not need to protect."""

    chunk_mib: int = Field(default=4, ge=1, le=256)
    """Encryption chunk size in MiB: each chunk has its own GCM tag."""

    load_user: str = "appliance"
    """The identity model instances load as, checked against each model's policy."""

    load_roles: list[str] = Field(default_factory=lambda: ["serving"])
    """Roles model instances load with, checked against each model's policy."""

    loader_threads: int = Field(default=0, ge=0, le=256)
    """Threads that read and decrypt a model; 0: one per CPU core, at most 16."""

    gpu_decrypt: bool = True
    """Decrypt on the GPU a model is loaded onto: the ciphertext is copied and decrypted in
    device memory, so plaintext never exists in host memory, and the load runs as fast as a
    plaintext one. Falls back to CPU threads where NVRTC (shipped with torch's CUDA build) is
    missing."""

    host_cache_gib: float = Field(default=0.0, ge=0)
    """Budget of a node's host-memory tier (decrypted models in page-locked memory, evicted least
    recently used first). 0 disables the tier."""

    service_port: int = Field(default=8101, ge=1, le=65535)
    """Port of the store service on each node (`appliance store serve`), which the gateway asks
    what each node holds when it places an instance."""

    services: dict[str, str] = Field(default_factory=dict)
    """Store service URL per node name, where it is not https://<node address>:<service_port>
    (http:// with serving.tls off; e.g. several simulated nodes on one host)."""
