"""What the runtime reads and changes on the host itself, below every other part: the VMM's host
cgroups, the figures of host processes (/proc) and the versions of host tools. Nothing here knows
about sandboxes or the CRI."""
