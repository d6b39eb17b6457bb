"""Data owners and the key holder: everything that runs on a participant's own machine."""
