"""kvmsandbox: a container runtime that runs every pod in its own lightweight virtual machine.

This package is also copied into the guest image (only ``kvmsandbox.agent``), so importing it
must stay free of host-only dependencies.
"""

__version__ = "0.1.0"
