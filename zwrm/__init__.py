"""
zwrm runs apps as QEMU/KVM virtual machines across many worker hosts.
"""

__version__ = "0.1.0"
