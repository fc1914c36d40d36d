"""SecondSite: continuous data protection for Kubernetes.

Block volumes are captured over NBD on the protected site, streamed to the recovery site, and
journaled there so that a group of volumes (a VPG) can be recovered to any consistent checkpoint.
"""

__version__ = "0.1.0"
