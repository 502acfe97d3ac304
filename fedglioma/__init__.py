"""The ``fedglioma`` command line and the reference (centralized / local-only) training."""
