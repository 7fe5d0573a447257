"""cgroup.conf's settings: jobs get only the cores, memory and GPUs Slurm gave them.

Standard library only, so the installer renders it before any package is installed.
"""

CGROUP_CONF_BODY = (
    "CgroupPlugin=autodetect\n"
    "ConstrainCores=yes\n"
    "ConstrainRAMSpace=yes\n"
    "ConstrainSwapSpace=yes\n"
    "# A job sees only the GPUs it was given (the device files of the others are denied).\n"
    "ConstrainDevices=yes\n"
)
