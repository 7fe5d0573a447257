"""`appliance backup DEST`, `appliance backup verify SRC` and `appliance restore SRC`."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.audit import record
from appliance.cli.context import CliContext, pass_ctx

PASSPHRASE = click.option(
    "--passphrase-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Seal (or open) with the passphrase in this file instead of the key-encryption key.",
)
_KEY_FILE = click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The key-encryption key to open the backup with (default: store.key_file, else "
    "<state_dir>/keys/kek.key).",
)


class _BackupGroup(click.Group):
    """`backup DEST` runs `backup create DEST`; `backup verify SRC` is the subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["create", *args]
        return super().parse_args(ctx, args)


def key_source(ctx: CliContext, passphrase_file: Path | None, key_file: Path | None = None):
    """The key a backup is sealed (or opened) with: the passphrase file's, else the KEK."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.backup.archive import BackupError, KeySource
    from appliance.security.keys import KeyEncryptionKey
    from appliance.security.secret_files import SecretFileError

    if passphrase_file is not None:
        try:
            passphrase = passphrase_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise BackupError(f"cannot read {passphrase_file}: {exc.strerror}") from None
        if not passphrase:
            raise BackupError(f"{passphrase_file} holds no passphrase")
        return KeySource(passphrase=passphrase)
    path = key_file or ctx.settings.kek_file
    try:
        return KeySource(kek=KeyEncryptionKey.from_key_file(path))
    except SecretFileError as exc:
        raise BackupError(
            f"{exc}: the backup is sealed with the key-encryption key (`appliance store init` "
            "makes one; give it with --key-file), or give --passphrase-file"
        ) from None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _print_contents(manifest) -> None:
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.backup.manifest import contents

    for name, count in contents(manifest).items():
        click.echo(f"  {name:<14} {count['files']:>6} files  {_size(count['bytes']):>10}")


@click.group("backup", cls=_BackupGroup)
def backup_group() -> None:
    """Back up the appliance's state into one encrypted file, while it runs; `backup verify`
    checks one."""


@backup_group.command("create")
@click.argument("dest", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--with-models",
    is_flag=True,
    help="Also the encrypted weights of models fine-tuning did not make (large; re-importable).",
)
@PASSPHRASE
@pass_ctx
def create(ctx: CliContext, dest: Path, with_models: bool, passphrase_file: Path | None) -> None:
    """Write a backup to DEST: accounts, keys and sessions, the audit log, knowledge bases,
    conversations, fine-tuning, the model store's metadata and keys, usage, configuration."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.backup.snapshot import write_backup

    source = key_source(ctx, passphrase_file)
    manifest = write_backup(ctx.settings, dest, source, with_models=with_models)
    record(ctx, "backup", str(dest), files=len(manifest.files), with_models=with_models)
    click.echo(f"backup written to {dest}:")
    _print_contents(manifest)


@backup_group.command("verify")
@click.argument("src", type=click.Path(path_type=Path, dir_okay=False))
@PASSPHRASE
@_KEY_FILE
@pass_ctx
def verify(ctx: CliContext, src: Path, passphrase_file: Path | None, key_file: Path | None) -> None:
    """Decrypt SRC and check every chunk and every file against its manifest; writes nothing."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.backup.restore import read_backup

    header, manifest = read_backup(src, key_source(ctx, passphrase_file, key_file))
    click.echo(f"backup intact: {len(manifest.files)} files, made {header['created_at']}")
    _print_contents(manifest)


@click.command("restore")
@click.argument("src", type=click.Path(path_type=Path, dir_okay=False))
@PASSPHRASE
@_KEY_FILE
@pass_ctx
def restore(
    ctx: CliContext, src: Path, passphrase_file: Path | None, key_file: Path | None
) -> None:
    """Restore the backup SRC into the (empty or new) state directory; checked before anything
    is put in place. Then start the stack as usual (`appliance up`)."""
    # Imported when the command runs: `appliance` starts without loading the stack.
    from appliance.backup.restore import restore_backup

    ctx.stamp_fresh = False  # the restored data keeps the schema version its backup recorded
    manifest = restore_backup(ctx.settings, src, key_source(ctx, passphrase_file, key_file))
    if "audit" in manifest.parts:
        record(ctx, "restore", str(src), files=len(manifest.files))
    click.echo(f"restored {len(manifest.files)} files into {ctx.settings.state_dir}:")
    _print_contents(manifest)
    if "config" in manifest.parts:
        click.echo(f"the backup's configuration file is in {ctx.settings.state_dir}/restored/")


COMMANDS = [backup_group, restore]
