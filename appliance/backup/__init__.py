"""Backups of the appliance's state: one encrypted file, verified and restored offline."""
