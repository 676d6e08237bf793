"""What the runtime reads and changes on the host itself, below every other part: the VMM's host
cgroups and the figures of host processes (/proc). Nothing here knows about sandboxes or the CRI."""
