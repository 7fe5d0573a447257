"""Upgrades that keep data: the state directory's migration steps and `appliance upgrade`."""
